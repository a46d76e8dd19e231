"""K-fold cross-validation of ``train-ranker`` (``relsum train-ranker --folds K``).

Why: one 80/20 split of ~100 labelled queries validates on ~20, where per-query NDCG differences
between two scorers spread by ~0.17, so a recipe can look 0.03 ahead of BM25 or 0.03 behind it by
the luck of the split.  K folds validate every query exactly once; the per-query values of all
folds pool into one table and one paired difference per baseline, with a standard error over
every query.

Output directory::

    fold<i>/         one train-ranker run each (best/, metrics.jsonl, report.json, report.md)
    cv_report.json   pooled means, paired differences, the per-fold rows
    cv_report.md     the same in markdown

A fold whose ``report.json`` already exists with the same settings (as the run resolved them: base,
learning rates) and the same validation queries is reused, not retrained, so a stopped
cross-validation (about an hour on a 2-core CPU) resumes where it stopped.  A finished fold with
other settings is refused, as train-ranker refuses an earlier run, unless ``overwrite`` (then every
fold is retrained); an unfinished one (no report) is trained again in place.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from relsum_core.data import data_digest, group_by_query, load_dataset
from relsum_core.io import atomic_write_text, json_report
from relsum_core.records import changed_settings, dataclass_defaults, describe, weight_files, weights_differ
from relsum_core.trainers.ranker import (
    RANKER,
    SELECT_VARIANT,
    RankerTrainConfig,
    default_base,
    format_metric,
    graded_rates,
    paired_ndcg10,
    query_split,
    train_ranker,
)

# A saved fold is reused when every setting matches, except these, which do not change what is
# trained.  A setting the saved report lacks was added later, at a default that keeps the old
# behaviour.
_IGNORED = {"progress", "out", "overwrite", "log_every", "eval_batch_size"}
# Paths whose content a report records (the bases' weight files, the data's digest): compared by
# content when it is recorded, so the same base or data under another path is reused.
_SOURCE_PATHS = {"base", "cosine_base", "data"}


def _resolved(cfg: RankerTrainConfig) -> dict:
    """The settings as train_ranker's report records them (base, cosine base, rates resolved)."""
    settings = asdict(cfg)
    settings["base"] = cfg.base or default_base()
    settings["cosine_base"] = cfg.cosine_base or settings["base"]
    settings["lr"], settings["head_lr"] = graded_rates(cfg)
    return settings


def _sources(cfg: RankerTrainConfig) -> dict:
    """What train_ranker records as the report's sources: the bases' weight files."""
    settings = _resolved(cfg)
    return {"base_weights": weight_files(settings["base"]),
            "cosine_base_weights": weight_files(settings["cosine_base"])}


def _changed_settings(saved: dict, cfg: RankerTrainConfig, ignore=frozenset()) -> dict:
    # None stays a value to compare (no step limit, the bundled data), except for the device: a fold
    # run where the device was left to choose is reused wherever it ran.
    now = _resolved(cfg)
    if now["device"] is None:
        del now["device"]
    return changed_settings(saved, now, defaults=dataclass_defaults(RankerTrainConfig),
                            ignore=_IGNORED | ignore)


def _null_to_nan(obj):
    if obj is None:
        return math.nan
    return {k: _null_to_nan(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


def _fold_report(cfg: RankerTrainConfig, val_query_ids: list[str], digest: str, log=print) -> dict:
    path = Path(cfg.out) / "report.json"
    saved = None
    if path.exists() and not cfg.overwrite:
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = None
    if saved and "per_query_ndcg" in saved:  # a finished fold
        for key in ("per_query_ndcg", "table"):  # json_report wrote their NaNs as null
            saved[key] = _null_to_nan(saved[key])
        saved_sources = saved.get("sources")
        by_content = isinstance(saved_sources, dict) and "data_digest" in saved["split"]
        changed = _changed_settings(saved["config"], cfg, _SOURCE_PATHS if by_content else frozenset())
        differs = [f"settings ({describe(changed)})"] if changed else []
        if by_content:
            differs += [f"{key.removesuffix('_weights').replace('_', ' ')} weights (rewritten since, or "
                        "another checkpoint)" for key, value in _sources(cfg).items()
                        if weights_differ(saved_sources.get(key), value)]
        if saved["split"].get("val_query_ids") != val_query_ids:
            differs.append("validation queries")
        elif saved["split"].get("data_digest", digest) != digest:  # (a report from before the digest)
            differs.append("data (judgments or product texts)")
        if not differs:
            log(f"fold {cfg.fold}: reusing {path}")
            return saved
        raise FileExistsError(f"{cfg.out} holds a finished fold trained with other {'; '.join(differs)}; "
                              "pass --overwrite to retrain every fold, or choose a new --out")
    log(f"fold {cfg.fold} of {cfg.folds}: training into {cfg.out}")
    return train_ranker(replace(cfg, overwrite=True))  # overwrite asked, or an unfinished fold


def pool_folds(reports: list[dict]) -> dict:
    """Pool per-query NDCG of every fold: means over all queries and paired differences."""
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    for report in reports:
        for scorer, by_metric in report["per_query_ndcg"].items():
            for metric, values in by_metric.items():
                merged = per_query.setdefault(scorer, {}).setdefault(metric, {})
                overlap = set(merged) & set(values)
                if overlap:
                    raise ValueError(f"folds overlap on validation queries {sorted(overlap)[:3]}")
                merged.update(values)
    if RANKER not in per_query:
        raise ValueError(f"no '{RANKER}' rows in the fold reports")
    table = {
        scorer: {metric: _nanmean(values) for metric, values in by_metric.items()}
        | {"n_queries": sum(not math.isnan(v) for v in by_metric[f"{SELECT_VARIANT}/ndcg@10"].values())}
        for scorer, by_metric in per_query.items()
    }
    paired = paired_ndcg10(per_query)
    fold_rows = [
        {
            "fold": r["split"].get("fold"),
            "val_queries": r["split"]["val_queries"],
            "kept_step": r["best"]["step"],
            "steps": r["steps"],
            **{f"{scorer}/{SELECT_VARIANT}/ndcg@10": row[f"{SELECT_VARIANT}/ndcg@10"]
               for scorer, row in r["table"].items()},
        }
        for r in reports
    ]
    return {"table": table, "paired_ndcg@10": paired, "fold_rows": fold_rows}


def _nanmean(values: dict[str, float]) -> float:
    defined = [v for v in values.values() if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def cv_markdown(pooled: dict, folds: int) -> str:
    table = pooled["table"]
    metrics = [m for m in next(iter(table.values())) if m != "n_queries"]
    n = table[RANKER]["n_queries"]
    lines = [
        f"{folds}-fold cross-validation: every one of {n} queries validated once "
        "(NDCG with ESCI gains, each fold's checkpoint selected on its own validation fold).",
        "",
        "| scorer | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for scorer, row in table.items():
        lines.append(f"| {scorer} | " + " | ".join(format_metric(row[m]) for m in metrics) + " |")
    lines += ["", "Per query, fine-tuned minus baseline "
              "(NDCG@10, mean ± standard error; better / tied / worse):"]
    for scorer, by_variant in pooled["paired_ndcg@10"].items():
        for variant, d in by_variant.items():
            mean, se = format_metric(d["mean"], signed=True), format_metric(d["se"])
            lines.append(f"- {scorer}, {variant}: {mean} ± {se}; "
                         f"{d['wins']} / {d['ties']} / {d['losses']} of {d['n']}")
    scorers = list(table)
    lines += ["", f"Per fold, {SELECT_VARIANT} NDCG@10:", "",
              "| fold | queries | kept step | " + " | ".join(scorers) + " |",
              "|---|---|---|" + "---|" * len(scorers)]
    for f in pooled["fold_rows"]:
        cells = [format_metric(f[f"{s}/{SELECT_VARIANT}/ndcg@10"]) for s in scorers]
        lines.append(f"| {f['fold']} | {f['val_queries']} | {f['kept_step']} of {f['steps']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cross_validate_ranker(cfg: RankerTrainConfig, folds: int, log=print) -> dict:
    """Run (or reuse) ``train_ranker`` on each of ``folds`` folds into ``cfg.out/fold<i>`` and pool them."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    out = Path(cfg.out)
    # The queries each fold validates, as train_ranker draws them, and a digest of its data: a
    # saved fold whose queries, grades or product texts changed since is refused.
    catalog, judgments = load_dataset(cfg.data)
    by_query = group_by_query(judgments)
    fold_cfgs = [replace(cfg, out=str(out / f"fold{i}"), folds=folds, fold=i) for i in range(folds)]
    reports = []
    for c in fold_cfgs:
        train_q, val_q = query_split(by_query, c)
        reports.append(_fold_report(c, val_q, data_digest(by_query, catalog, train_q + val_q), log))
    pooled = pool_folds(reports)
    report = {"folds": folds, "split_seed": cfg.split_seed, **pooled,
              "config": reports[0]["config"] | {"fold": None}}
    atomic_write_text(out / "cv_report.json", json_report(report))
    atomic_write_text(out / "cv_report.md", cv_markdown(pooled, folds))
    return report
