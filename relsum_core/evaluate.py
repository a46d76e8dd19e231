"""Does a summary help the ranker?  ``relsum evaluate``: ranking metrics of product-text variants.

The frozen ranker scores every judged (query, product) pair of the evaluated queries once per text
variant, and each variant gets the numbers ReLSum reports:

* ``title``: the title alone (what a summary must improve on);
* ``title+descK``: the title plus the first K tokens (ranker tokenizer) of bullets + description,
  the "just truncate the description" baseline at the summary's budget;
* one ``title+<name>`` per summaries file (or per policy, summarised here first): the title plus
  that summary, joined exactly as the reward joins them.  A product the file skipped (no text) keeps
  its title alone;
* Doc2Query: one ``title+<name>`` per ``doc2query`` policy, the title plus search queries the policy
  wrote for the product (same budget), the expansion ReLSum compares summaries with.

Metrics: NDCG@5 and NDCG@10 (ESCI gains, mean over queries) and recall at 90% precision (pairs graded
E are positives; one score threshold over all pairs, as a serving cut-off would be).  Each comes
with a 95% bootstrap interval over queries, and each variant's NDCG with the paired difference to
``title`` and its interval (the same resampled queries for both), since 22 queries make the
unpaired intervals wide.
Beside them, each variant's mean doc-side length in ranker tokens (the serving cost) and each
summary's mean length in words (``text.word_count``).

Output folder: ``report.json``, ``report.md``, ``ndcg.png`` and, for ``--policy`` / ``--doc2query``
entries, ``summaries-<name>.jsonl`` (resumable, like ``relsum summarize``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from relsum_core.data import group_by_query, load_dataset, split_queries
from relsum_core.io import atomic_write_bytes, atomic_write_text, json_report, read_json_object
from relsum_core.metrics import POSITIVE_GRADE, PRECISION_TARGET, ndcg_at_k, recall_at_precision
from relsum_core.policy import SUMMARY_BUDGET, SUMMARY_PRODUCT_TOKENS
from relsum_core.precision import resolve_device, resolve_precision
from relsum_core.summarize import summarize_catalog, summary_files
from relsum_core.text import (
    attributes_text,
    cut_to_tokens,
    encode_texts,
    join_title,
    product_text,
    summary_text,
    word_count,
)

N_BOOTSTRAP = 1000
# validation: the held-out part of --split-seed's split; heldout: every query the records say no
# model trained on (the ranker not on it, no policy on one of its products); all: every query
SPLITS = ("validation", "heldout", "all")


def read_summaries(path: str | Path, catalog: Mapping | None = None) -> dict[str, str]:
    """product_id -> summary from a ``relsum summarize`` JSONL (or its shards, see `summary_files`);
    skipped products map to ``""``.

    With ``catalog`` (product id -> Product), a row whose ``title`` differs from the catalog's for
    its id is an error: summaries of another catalog whose ids happen to coincide. So are two rows
    of one id with different summaries (files of two runs put together): neither can be chosen.
    """
    out: dict[str, str] = {}
    where: dict[str, str] = {}
    for part in summary_files(path):
        _read_summary_rows(part, catalog, out, where)
    return out


def _read_summary_rows(path: Path, catalog: Mapping | None, out: dict[str, str],
                       where: dict[str, str]) -> None:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("product_id"), str):
                raise ValueError(f"{path}:{n}: a row needs a string 'product_id'")
            summary = row.get("summary", "" if "skipped" in row else None)
            if not isinstance(summary, str):
                raise ValueError(f"{path}:{n}: a row needs a string 'summary' (or 'skipped')")
            pid, title = row["product_id"], row.get("title")
            ours = catalog[pid].title if catalog is not None and pid in catalog else None
            if isinstance(title, str) and ours is not None and ours != title:
                raise ValueError(f"{path}:{n}: product {pid} is titled {title!r} here but {ours!r} in the "
                                 "data: summaries of another catalog?")
            if pid in out and out[pid] != summary:
                raise ValueError(f"{path}:{n}: product {pid} has another summary at {where[pid]}: "
                                 "rows of two runs put together?")
            out[pid] = summary
            where.setdefault(pid, f"{path}:{n}")


def parse_named(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} entries are NAME=PATH, got {item!r}")
        if name in out:
            raise ValueError(f"{what} name {name!r} given twice")
        out[name] = value
    return out


class Evaluation:
    """Judged pairs of the evaluated queries, scored per variant; metrics with bootstrap intervals."""

    def __init__(self, scorer, judgments, *, queries: Sequence[str], seed: int = 0):
        by_query = group_by_query(judgments)
        missing = [q for q in queries if q not in by_query]
        if missing:
            raise ValueError(f"no judgments for {len(missing)} queries, e.g. {missing[:3]}")
        if not queries:
            raise ValueError("no queries to evaluate")
        self.scorer = scorer
        self.queries = list(queries)
        self.pairs = [j for q in self.queries for j in by_query[q]]
        self.product_ids = sorted({j.product_id for j in self.pairs})
        bounds = np.cumsum([0] + [len(by_query[q]) for q in self.queries])
        self.slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.grades = np.array([j.grade for j in self.pairs])
        if not (self.grades > 0).any():  # every grade above I has a positive ESCI gain
            raise ValueError("no evaluated query has a candidate graded above irrelevant: NDCG is undefined")
        rng = np.random.default_rng(seed)
        self.resamples = rng.integers(0, len(self.queries), size=(N_BOOTSTRAP, len(self.queries)))

    def score(self, texts: Mapping[str, str]) -> np.ndarray:
        """Ranker scores of every evaluated pair, the product's text taken from ``texts``."""
        return np.asarray(self.scorer([(j.query, texts[j.product_id]) for j in self.pairs]), dtype=np.float64)

    def _per_query_ndcg(self, scores: np.ndarray, k: int) -> np.ndarray:
        return np.array([ndcg_at_k(scores[s], self.grades[s], k) for s in self.slices])

    def _recall(self, scores: np.ndarray, queries: np.ndarray) -> float:
        rows = np.concatenate([np.arange(self.slices[q].start, self.slices[q].stop) for q in queries])
        return recall_at_precision(scores[rows], self.grades[rows] >= POSITIVE_GRADE, PRECISION_TARGET)

    def metrics(self, scores: np.ndarray, base: np.ndarray | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in (5, 10):
            v = self._per_query_ndcg(scores, k)
            defined = ~np.isnan(v)
            boot = [np.nanmean(v[r]) for r in self.resamples if defined[r].any()]
            out[f"ndcg@{k}"] = float(np.nanmean(v))
            out[f"ndcg@{k}_lo"], out[f"ndcg@{k}_hi"] = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
            if base is not None:
                d = v - self._per_query_ndcg(base, k)
                boot = [np.nanmean(d[r]) for r in self.resamples if defined[r].any()]
                out[f"ndcg@{k}_delta"] = float(np.nanmean(d))
                lo, hi = np.percentile(boot, [2.5, 97.5])
                out[f"ndcg@{k}_delta_lo"], out[f"ndcg@{k}_delta_hi"] = float(lo), float(hi)
        every = np.arange(len(self.queries))
        out["recall@p90"] = self._recall(scores, every)
        boot = [self._recall(scores, r) for r in self.resamples]
        lo, hi = np.nanpercentile(boot, [2.5, 97.5])
        out["recall@p90_lo"], out["recall@p90_hi"] = float(lo), float(hi)
        return out


def _markdown(report: dict) -> str:
    head = (f"Ranking with the frozen ranker `{report['ranker']}` on {report['n_queries']} {report['split']} "
            f"queries ({report['n_pairs']} judged pairs, {report['n_products']} products). 95% bootstrap "
            f"intervals over queries ({N_BOOTSTRAP} resamples); delta = paired difference to `title`.")
    if report.get("ranker_trained_queries"):
        head += f" The ranker trained on {report['ranker_trained_queries']} of these queries."
    for name, n in (report.get("policy_trained_products") or {}).items():
        if n:
            head += f" The policy behind `{name}` trained on {n} of these products."
        elif n is None:
            head += (f" `{name}` has no policy training record (relsum_policy.json), so its products were "
                     "not checked against what it trained on.")
    lines = [head, "",
             "| text | NDCG@5 | NDCG@10 | NDCG@10 delta vs title | recall@P90 | mean summary words "
             "| mean doc tokens |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["variants"].items():
        delta = (f"{m['ndcg@10_delta']:+.4f} [{m['ndcg@10_delta_lo']:+.4f}, {m['ndcg@10_delta_hi']:+.4f}]"
                 if "ndcg@10_delta" in m else "")
        words = f"{m['mean_words']:.1f}" if "mean_words" in m else ""
        lines.append(f"| {name} | {m['ndcg@5']:.4f} [{m['ndcg@5_lo']:.3f}, {m['ndcg@5_hi']:.3f}] | "
                     f"{m['ndcg@10']:.4f} [{m['ndcg@10_lo']:.3f}, {m['ndcg@10_hi']:.3f}] | {delta} | "
                     f"{m['recall@p90']:.3f} [{m['recall@p90_lo']:.3f}, {m['recall@p90_hi']:.3f}] | "
                     f"{words} | {m['mean_doc_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def _policy_record(summaries_file) -> dict[str, str] | None:
    """The training record of the policy that wrote a ``relsum summarize`` file, found where its
    ``.settings.json`` says the policy was; None when unknown (no settings, or the folder is gone)."""
    from relsum_core.policy import read_training_record

    policies = set()
    for part in summary_files(summaries_file):  # a sharded file: every shard's record
        settings = Path(str(part) + ".settings.json")
        if not settings.is_file():
            return None
        try:
            policies.add(read_json_object(settings).get("policy"))
        except ValueError:
            return None
    if len(policies) > 1:
        raise ValueError(f"the shards of {summaries_file} were written by different policies "
                         f"({sorted(map(str, policies))}): summaries of one policy only")
    policy = policies.pop()
    if policy == "default":
        return {}
    if not isinstance(policy, str) or not Path(policy).is_dir():
        return None
    return read_training_record(policy)


def _plot(report: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    x = np.arange(len(names))
    for i, k in enumerate((5, 10)):
        m = [report["variants"][n] for n in names]
        mid = np.array([v[f"ndcg@{k}"] for v in m])
        err = np.array([[mid[j] - v[f"ndcg@{k}_lo"], v[f"ndcg@{k}_hi"] - mid[j]] for j, v in enumerate(m)]).T
        ax.bar(x + (i - 0.5) * 0.38, mid, 0.38, yerr=err, capsize=3, label=f"NDCG@{k}")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("NDCG (95% bootstrap interval)")
    ax.set_title(f"{report['n_queries']} {report['split']} queries")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def evaluate_summaries(out: str | Path, *, ranker: str, data: str | None = None,
                       summaries: Mapping[str, str] | None = None, policies: Mapping[str, str] | None = None,
                       doc2query: Mapping[str, str] | None = None, split: str = "validation",
                       val_fraction: float = 0.2, split_seed: int = 0,
                       desc_tokens: Sequence[int] = (32,), budget: int = SUMMARY_BUDGET,
                       max_product_tokens: int = SUMMARY_PRODUCT_TOKENS,
                       batch_size: int = 16, device=None, progress: bool = True, plot: bool = True,
                       precision: str = "auto") -> dict:
    """Score the variants and write report.json / report.md (/ ndcg.png); returns the report.

    ``summaries``: name -> a ``relsum summarize`` JSONL; ``policies``: name -> policy folder
    (``"default"`` = the packaged SmolLM2) to summarise the evaluated products with first, greedily,
    under ``budget`` tokens from ``max_product_tokens`` of product text (use the run's own settings);
    ``doc2query``: name -> policy folder that writes search queries for each product instead.
    ``precision``: the policies' sampling dtype (`relsum_core.summarize.summarize_catalog`); the ranker
    always scores in fp32.
    """
    from relsum_core.policy import read_prompt_settings, read_training_record
    from relsum_core.ranker import CrossEncoder, read_ranker_settings

    summaries, policies, doc2query = dict(summaries or {}), dict(policies or {}), dict(doc2query or {})
    names = list(summaries) + list(policies) + list(doc2query)
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"names used for more than one of summaries files / policies / doc2query: {clash}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if any(k < 1 for k in desc_tokens):
        raise ValueError(f"description prefixes need >= 1 token, got {list(desc_tokens)}")
    taken = sorted(set(names) & {f"desc{k}" for k in desc_tokens})
    if taken:  # title+descK is the description-prefix baseline's row
        raise ValueError(f"names {taken} would replace the description-prefix baseline's rows; "
                         "rename them")
    # resolved here so a bad value fails before any scoring; summarize_catalog resolves it alike
    device = resolve_device(device)
    sampling_dtype = str(resolve_precision(precision, device, auto_on_cuda=False)).removeprefix("torch.")
    for name, path in summaries.items():
        if Path(path).is_dir():
            raise FileNotFoundError(f"summaries {name!r}: {path} is a directory, not a JSONL file")
        try:
            summary_files(path)  # the file, or its complete set of shards
        except FileNotFoundError as e:
            raise FileNotFoundError(f"summaries {name!r}: {e}") from None
    # Read the given files before any policy runs, so a bad row fails in seconds, not after
    # minutes of summarising.
    out = Path(out)
    catalog, judgments = load_dataset(data)
    given = {name: read_summaries(path, catalog) for name, path in summaries.items()}
    text = {j.query_id: j.query for j in judgments}
    queries = sorted(text)
    if split == "validation":
        queries = split_queries(queries, val_fraction=val_fraction, seed=split_seed, query_texts=text)[1]
    trained = read_ranker_settings(ranker).get("train_queries")  # train-ranker records {id: text}
    if trained is not None and not isinstance(trained, dict):
        raise ValueError(f"{ranker}: relsum_ranker.json's train_queries is not an object of query id: text")
    seen = [q for q in queries if trained and trained.get(q) == text[q]]
    # The policies' records: a product counts as trained on when id and title match (another
    # dataset's coinciding ids do not).
    records = {name: _policy_record(summaries_file=path) for name, path in summaries.items()}
    records |= {name: read_training_record(None if path == "default" else path)
                for name, path in {**policies, **doc2query}.items()}

    for name, path in {**policies, **doc2query}.items():  # summarised here under this run's budgets
        trained_with = read_prompt_settings(None if path == "default" else path)
        used = {"budget": budget, "max_product_tokens": max_product_tokens}
        differ = {k: (v, used[k]) for k, v in trained_with.items() if v != used[k]}
        if differ:
            warnings.warn(f"policy {name!r} was trained with " + ", ".join(
                f"{k} {a}" for k, (a, _) in differ.items()) + "; it is evaluated with " + ", ".join(
                f"{k} {b}" for k, (_, b) in differ.items()) + " (pass them to match)", stacklevel=2)
    unknown = sorted(name for name, r in records.items() if r is None)
    if unknown and split != "all":
        warnings.warn(f"no policy training record (relsum_policy.json) for {', '.join(unknown)}: the "
                      f"{split} split cannot leave out the products those policies trained on", stacklevel=2)

    def policy_trained(products) -> dict[str, list[str]]:
        return {name: [p for p in products if r.get(p) == catalog[p].title]
                for name, r in records.items() if r}

    candidates = {q: [] for q in queries}
    for j in judgments:
        if j.query_id in candidates:
            candidates[j.query_id].append(j.product_id)
    if split == "heldout":
        if trained is None:
            raise ValueError(f"--split heldout needs the ranker's record of its training queries, and "
                             f"{ranker} has none (relsum_ranker.json from `relsum train-ranker`)")
        trained_here = set(seen)
        queries = [q for q in queries if q not in trained_here
                   and not any(policy_trained(candidates[q]).values())]
        seen = []
        if not queries:
            raise ValueError(f"the ranker {ranker} or the policies trained on every query of this data "
                             "(the ranker on the query, a policy on one of its products): none is held out")
    if seen and split == "validation":
        raise ValueError(f"the ranker {ranker} trained on {len(seen)} of the {len(queries)} validation "
                         f"queries (e.g. {seen[:3]}): it was trained on another split (--max-queries, "
                         "--folds, another --split-seed / --val-fraction, or a relsum from before one "
                         "query text under two ids was kept on one side); evaluate with the split it "
                         "trained with, --split heldout for every query no model trained on, or --split "
                         "all to score every query knowingly")
    if split == "validation":
        evaluated = sorted({p for q in queries for p in candidates[q]})
        for name, got in policy_trained(evaluated).items():
            if got:
                raise ValueError(
                    f"the policy behind {name!r} trained on {len(got)} of the {len(evaluated)} validation "
                    f"products (e.g. {got[:3]}): it was trained on another split (--split-seed / "
                    "--val-fraction); evaluate with the split it trained with, --split heldout for every "
                    "query no model trained on, or --split all to score every query knowingly")
    ce = CrossEncoder.from_pretrained(ranker, device=device)
    ev = Evaluation(ce.predict, judgments, queries=queries)

    for name, got in given.items():
        lacking = [p for p in ev.product_ids if p not in got]
        if lacking:
            raise ValueError(f"summaries {name!r} ({summaries[name]}) lack {len(lacking)} of the "
                             f"{len(ev.product_ids)} evaluated products, e.g. {lacking[:3]}: summarise the "
                             "whole catalog into it, or pass --policy NAME=DIR to summarise just the "
                             "evaluated products here")

    out.mkdir(parents=True, exist_ok=True)
    tasks = [(name, policy, "summary") for name, policy in policies.items()]
    tasks += [(name, policy, "doc2query") for name, policy in doc2query.items()]
    for name, policy, task in tasks:
        path = out / f"summaries-{name}.jsonl"
        summarize_catalog(path, policy=None if policy == "default" else policy, catalog=data, budget=budget,
                          batch_size=batch_size, max_product_tokens=max_product_tokens,
                          product_ids=ev.product_ids, num_shards=1, shard=0, device=device, progress=progress,
                          task=task, precision=precision)
        summaries[name] = str(path)
        given[name] = read_summaries(path, catalog)  # every evaluated product (skipped ones map to "")

    titles = {p: product_text(catalog[p], ce.tokenizer, 0) for p in ev.product_ids}  # capped as in training
    variants: dict[str, dict] = {"title": {"texts": titles}}
    for k in desc_tokens:
        variants[f"title+desc{k}"] = {"texts": {p: join_title(titles[p], cut_to_tokens(
            attributes_text(catalog[p]), ce.tokenizer, k)) for p in ev.product_ids}}
    for name, got in given.items():
        variants[f"title+{name}"] = {
            "texts": {p: summary_text(catalog[p].title, got[p], ce.tokenizer) for p in ev.product_ids},
            "mean_words": float(np.mean([word_count(got[p]) for p in ev.product_ids]))}

    base = ev.score(variants["title"]["texts"])
    policy_seen = policy_trained(ev.product_ids)
    report = {"ranker": str(ranker), "split": split, "n_queries": len(ev.queries),
              "query_ids": list(ev.queries), "n_pairs": len(ev.pairs),
              "n_products": len(ev.product_ids),
              "ranker_trained_queries": len(seen) if trained is not None else None,  # None: no record
              "policy_trained_products": {name: len(policy_seen.get(name, ()))
                                          if records.get(name) is not None else None for name in given},
              "positive_grade": POSITIVE_GRADE, "precision_target": PRECISION_TARGET, "summaries": summaries,
              "sampling_dtype": {name: sampling_dtype for name, _, _ in tasks},
              "variants": {}}
    for name, v in variants.items():
        scores = base if name == "title" else ev.score(v["texts"])
        m = ev.metrics(scores, None if name == "title" else base)
        if "mean_words" in v:
            m["mean_words"] = v["mean_words"]
        # What each variant costs the ranker: its doc side in the ranker's tokens (before the pair's
        # max_length cut), the serving latency's driver.
        m["mean_doc_tokens"] = float(np.mean([len(e.ids) for e in encode_texts(
            ce.tokenizer, [v["texts"][p] for p in ev.product_ids])]))
        report["variants"][name] = m
    atomic_write_text(out / "report.json", json_report(report))
    atomic_write_text(out / "report.md", _markdown(report))
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # the reports are written; only the figure needs the plot extra
            warnings.warn("matplotlib is not installed (pip install 'relsum[plot]'): no ndcg.png",
                          RuntimeWarning, stacklevel=2)
        else:
            _plot(report, out / "ndcg.png")
    return report
