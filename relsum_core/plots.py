"""PNG (or PDF, SVG) curves of a training run's ``metrics.jsonl`` (``relsum plot``).

Summarizer runs (events "train"/"eval"): reward per step (train samples, and greedy validation),
the reward components, KL to the reference and summary length.  Ranker runs (events "train"/"eval"
with NDCG): training loss and validation NDCG@10.
"""

from __future__ import annotations

import json
from pathlib import Path

from relsum_core.io import atomic_write_bytes
from relsum_core.rewards import COMPONENTS

PLOT_FORMATS = ("png", "pdf", "svg")


def read_events(path: str | Path) -> dict[str, list[dict]]:
    """Rows of a metrics JSONL grouped by their "event"; a cut-off last line is skipped."""
    events: dict[str, list[dict]] = {}
    lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 is text
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run killed mid-write
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        events.setdefault(row.get("event", "?"), []).append(row)
    return events


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


SHORT_RUN_POINTS = 20  # fewer points than this: dots on the lines as well


def plot_metrics(metrics: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Write the run's curves to ``out`` (atomically) in the format its suffix names: .png, .pdf or
    .svg (any other suffix, or none, is a ValueError); returns its path."""
    import io

    out = Path(out)
    fmt = out.suffix.lower().removeprefix(".")
    if fmt not in PLOT_FORMATS:  # checked first: matplotlib would otherwise write PNG bytes under any name
        raise ValueError(f"{out}: plot suffix must be one of {', '.join('.' + f for f in PLOT_FORMATS)}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or relsum[plot])") from None
    events = read_events(metrics)
    train, evals = events.get("train", []), events.get("eval", [])
    if not train and not evals:
        raise ValueError(f"{metrics}: no 'train' or 'eval' rows to plot")
    summarizer = any("reward" in r for r in train + evals)
    if summarizer:
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        ax = axes[0, 0]
        x, y = _series(train, "reward")
        ax.plot(x, y, alpha=0.3, color="C0", label="train samples")
        ax.plot(x, _smooth(y, 10), color="C0", label="train (mean of 10 steps)")
        x, y = _series(evals, "reward")
        ax.plot(x, y, "o-", color="C3", label="validation (greedy)")
        ax.set_title("reward")
        ax.legend(fontsize=8)
        ax = axes[0, 1]
        for i, comp in enumerate(COMPONENTS):
            x, y = _series(evals, f"reward_{comp}")
            ax.plot(x, y, "o-", color=f"C{i}", label=comp)
        ax.set_title("validation reward components")
        ax.legend(fontsize=8)
        ax = axes[1, 0]
        x, y = _series(train, "kl")
        ax.plot(x, y, color="C2", alpha=0.4)
        ax.plot(x, _smooth(y, 10), color="C2")
        ax.set_title("KL to the reference (k3, per token)")
        if any(r.get("beta") != train[0].get("beta") for r in train):  # adaptive: show the weight too
            x, y = _series(train, "beta")
            twin = ax.twinx()
            twin.plot(x, y, color="C7", linestyle="--")
            twin.set_ylabel("beta (dashed)")
        ax = axes[1, 1]
        x, y = _series(train, "summary_tokens")
        ax.plot(x, y, color="C4", alpha=0.4, label="train samples")
        x, y = _series(evals, "summary_tokens")
        ax.plot(x, y, "o-", color="C4", label="validation")
        ax.set_title("summary length (tokens)")
        ax.legend(fontsize=8)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        x, y = _series(train, "loss")
        axes[0].plot(x, y)
        axes[0].set_title("training loss")
        for i, key in enumerate(k for k in (evals[0] if evals else {}) if k.endswith("ndcg@10")):
            x, y = _series(evals, key)
            axes[1].plot(x, y, "o-", color=f"C{i}", label=key)
        axes[1].set_title("validation NDCG@10")
        axes[1].legend(fontsize=8)
    for ax in fig.axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for line in ax.get_lines():  # a short run's curves: a line through one point draws nothing
            if len(line.get_xdata()) < SHORT_RUN_POINTS and line.get_marker() in (None, "None", "", " "):
                line.set_marker(".")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
