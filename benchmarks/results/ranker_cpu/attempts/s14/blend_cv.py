"""Session-14: does the fine-tuned cross-encoder carry what the untuned cosine lacks?  Per fold of a
saved cross-validation run, score the fold's validation queries with the fold's checkpoint and with
the cosine, blend them per query (z-scores, equal weights fixed in advance), pool over folds.

usage: python blend_cv.py CV_DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from relsum_core.baselines import CosineScorer
from relsum_core.data import group_by_query, load_dataset
from relsum_core.metrics import paired_difference, per_query_ndcg
from relsum_core.ranker import CrossEncoder
from relsum_core.trainers import ranker as R

torch.set_num_threads(2)
cv = Path(sys.argv[1])
catalog, judgments = load_dataset(None)
by_query = group_by_query(judgments)
base = R.default_base()
tok = AutoTokenizer.from_pretrained(base)
cosine = CosineScorer(AutoModel.from_pretrained(base), tok)
z = lambda x: (np.asarray(x) - np.mean(x)) / (np.std(x) + 1e-9)
pooled: dict[str, dict[str, dict[str, float]]] = {}
for fold_dir in sorted(cv.glob("fold*")):
    report = json.loads((fold_dir / "report.json").read_text())
    val = R.ValSet(by_query, report["split"]["val_query_ids"], catalog, tok)
    ce = CrossEncoder.from_pretrained(fold_dir / "best")
    ranker = val.score_pairs(R._predictor(ce, 64))
    cos = val.score_per_query(cosine.scores)
    for variant, _ in R.EVAL_VARIANTS:
        scorers = {"ranker": ranker[variant], "cosine": cos[variant],
                   "blend": {q: z(ranker[variant][q]) + z(cos[variant][q]) for q in val.query_ids}}
        for name, scores in scorers.items():
            pooled.setdefault(variant, {}).setdefault(name, {}).update(per_query_ndcg(scores, val.grades, 10))
    print(fold_dir.name, {v: {n: round(np.nanmean([s[q] for q in val.query_ids]), 4) for n, s in d.items()}
                          for v, d in pooled.items()}, flush=True)
for variant, d in pooled.items():
    means = {n: round(float(np.nanmean(list(s.values()))), 4) for n, s in d.items()}
    print(variant, "NDCG@10", means)
    for other in ("ranker", "cosine"):
        p = paired_difference(d["blend"], d[other])
        print(f"  blend - {other}: {p['mean']:+.4f} ± {p['se']:.4f} ({p['wins']}/{p['ties']}/{p['losses']})")
