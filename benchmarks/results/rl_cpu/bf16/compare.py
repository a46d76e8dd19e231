"""Redraw compare.png and the tables of README.md from the metrics.jsonl files beside this script:
fp32 against bf16 GRPO runs (`relsum train --precision`), per seed."""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RUNS = {  # file: (label, colour, line style)
    "../metrics.jsonl": ("seed 0, fp32", "tab:blue", "-"),  # the committed fp32 run (rl_cpu/)
    "seed0-bf16.jsonl": ("seed 0, bf16", "tab:red", "-"),
    "seed1-fp32.jsonl": ("seed 1, fp32", "tab:blue", "--"),
    "seed1-bf16.jsonl": ("seed 1, bf16", "tab:red", "--"),
    "seed1-bf16-autocast-sampling.jsonl": ("seed 1, bf16, autocast sampling", "tab:orange", ":"),
    "seed2-fp32.jsonl": ("seed 2, fp32", "tab:blue", "-."),
    "seed2-bf16.jsonl": ("seed 2, bf16", "tab:red", "-."),
}


def events(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == "train"], [r for r in rows if r["event"] == "eval"]


def main() -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("eval", "reward_novelty", "validation novelty (greedy)"),
              ("eval", "reward_faithfulness", "validation faithfulness (greedy)"),
              ("train", "entropy", "training entropy per token (mean of 5 steps)"),
              ("train", "kl", "training KL to the reference (mean of 5 steps)")]
    for name, (label, colour, style) in RUNS.items():
        path = HERE / name
        if not path.is_file():
            continue
        train, evals = events(path)
        print(f"\n{label}: {len(train)} steps")
        print("| step | " + " | ".join(str(e["step"]) for e in evals) + " |")
        print("|---|" + "---|" * len(evals))
        for key in ("reward", "reward_faithfulness", "reward_novelty"):
            print(f"| {key} | " + " | ".join(f"{e[key]:.3f}" for e in evals) + " |")
        for ax, (event, key, title) in zip(axes.flat, panels):
            rows = evals if event == "eval" else train
            xs, ys = [r["step"] for r in rows], [r[key] for r in rows]
            if event == "train":
                xs = xs[4:]
                ys = [statistics.mean(ys[i - 4:i + 1]) for i in range(4, len(ys))]
            ax.plot(xs, ys, color=colour, linestyle=style, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("GRPO on ESCI-150q, SmolLM2-135M: fp32 against bf16 (project CPU)")
    fig.tight_layout()
    fig.savefig(HERE / "compare.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
