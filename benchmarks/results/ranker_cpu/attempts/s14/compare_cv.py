"""Session-14: two cross-validation runs of train-ranker on the same folds, paired per query.

usage: python compare_cv.py BASELINE_CV_DIR CANDIDATE_CV_DIR (compared on the candidate's finished folds)
Prints each run's pooled ranker NDCG@10, the candidate minus the baseline per query (mean ± standard
error, better / tied / worse), and per fold: the warm-up's validation (step 0), the last eval and the
kept checkpoint's value.
"""

import json
import math
import sys
from pathlib import Path

from relsum_core.metrics import paired_difference
from relsum_core.trainers.ranker import EVAL_VARIANTS, RANKER


def fold_reports(cv_dir: Path, folds: list[int]) -> list[dict]:
    return [json.loads((cv_dir / f"fold{i}" / "report.json").read_text()) for i in folds]


def finished_folds(cv_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("fold")) for p in cv_dir.glob("fold*/report.json"))


def pooled(reports: list[dict], scorer: str = RANKER) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in reports:
        for metric, values in r["per_query_ndcg"][scorer].items():
            out.setdefault(metric, {}).update(values)
    return out


def _nanmean(values: dict[str, float]) -> float:
    defined = [v for v in values.values() if not math.isnan(v)]
    return sum(defined) / len(defined)


def evals(cv_dir: Path, fold: int) -> list[dict]:
    lines = (cv_dir / f"fold{fold}" / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "eval"]


def main(base_dir: str, cand_dir: str) -> None:
    base, cand = Path(base_dir), Path(cand_dir)
    folds = finished_folds(cand)  # a stopped candidate run is compared on the folds it finished
    print(f"folds {folds}")
    rb, rc = fold_reports(base, folds), fold_reports(cand, folds)
    if [r["split"]["val_query_ids"] for r in rb] != [r["split"]["val_query_ids"] for r in rc]:
        raise SystemExit("the two runs do not share their folds")
    pb, pc = pooled(rb), pooled(rc)
    for name, _ in EVAL_VARIANTS:
        m = f"{name}/ndcg@10"
        d = paired_difference(pc[m], pb[m])
        mean_b, mean_c = _nanmean(pb[m]), _nanmean(pc[m])
        print(f"{m}: baseline {mean_b:.4f}  candidate {mean_c:.4f}  candidate - baseline "
              f"{d['mean']:+.4f} ± {d['se']:.4f} ({d['wins']}/{d['ties']}/{d['losses']} of {d['n']})")
    print("\nper fold, title+64 NDCG@10: warm-up (step 0) / last eval / kept")
    for i in folds:
        for label, d in (("baseline", base), ("candidate", cand)):
            e = evals(d, i)
            kept = max(e, key=lambda x: x["title+64/ndcg@10"])
            print(f"fold {i} {label:9s} {e[0]['title+64/ndcg@10']:.4f} / {e[-1]['title+64/ndcg@10']:.4f} / "
                  f"{kept['title+64/ndcg@10']:.4f} (step {kept['step']})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
