"""Before/after summaries of a `relsum train` run, from its metrics.jsonl.

The trainer's "eval" rows hold greedy summaries of a fixed set of validation products; this
prints the first (the initial policy) beside the last (the trained one) for N products, with
per-product reward components when the rows carry them, and style statistics that show prose
turning into attribute lists: words per summary, stopword share, list separators per summary,
and the share of content words that merely repeat the title.

    python benchmarks/rl_before_after.py runs/grpo/metrics.jsonl --n 10 --out before_after.md
"""

from __future__ import annotations

import argparse
import statistics

from relsum_core.io import atomic_write_text
from relsum_core.plots import read_events
from relsum_core.rewards import COMPONENTS, STOPWORDS, content_words, words


def style(texts: list[str], titles: list[str]) -> dict[str, float]:
    all_words = [words(t) for t in texts]
    content = [content_words(t) for t in texts]
    title_sets = [set(content_words(title)) for title in titles]
    title_share = [sum(w in ts for w in c) / max(len(c), 1) for c, ts in zip(content, title_sets)]
    n_words = [len(w) for w in all_words]
    stop = [sum(x in STOPWORDS for x in w) / max(len(w), 1) for w in all_words]
    seps = [t.count(",") + t.count(";") + t.count("|") + t.count("\n") for t in texts]
    # an attribute list is short items between separators; prose is long runs of words
    per_item = [n / (s + 1) for n, s in zip(n_words, seps)]
    return {"words": statistics.mean(n_words), "stopword_share": statistics.mean(stop),
            "separators": statistics.mean(seps), "words_per_item": statistics.mean(per_item),
            "title_word_share": statistics.mean(title_share)}


def _one_line(text: str) -> str:
    # newlines inside a summary would break the markdown list: show them as " / "
    return " / ".join(part.strip() for part in text.splitlines() if part.strip()) or "(empty)"


def report(metrics: str, n: int) -> str:
    evals = [r for r in read_events(metrics).get("eval", []) if r.get("samples")]
    if len(evals) < 2:
        raise SystemExit(f"{metrics}: needs at least two eval rows with samples")
    first, last = evals[0], evals[-1]
    before = {s["product_id"]: s for s in first["samples"]}
    after = {s["product_id"]: s for s in last["samples"]}
    common = [p for p in before if p in after]
    lines = [f"# Greedy summaries of validation products: step {first['step']} vs step {last['step']}", ""]
    lines.append("| | step {} | step {} |".format(first["step"], last["step"]))
    lines.append("|---|---|---|")
    for key in ("reward", *(f"reward_{c}" for c in COMPONENTS), "summary_tokens"):
        if key in first and key in last:
            lines.append(f"| mean {key} ({len(common)} products) | {first[key]:.4f} | {last[key]:.4f} |")
    titles = [before[p]["title"] for p in common]
    sb = style([before[p]["summary"] for p in common], titles)
    sa = style([after[p]["summary"] for p in common], titles)
    for key in sb:
        lines.append(f"| mean {key} | {sb[key]:.3f} | {sa[key]:.3f} |")
    lines.append("")
    for p in common[:n]:
        lines += [f"### {before[p]['title']}", "", f"- before: {_one_line(before[p]['summary'])}",
                  f"- after: {_one_line(after[p]['summary'])}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    text = report(args.metrics, args.n)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
