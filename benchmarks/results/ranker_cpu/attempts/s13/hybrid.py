"""BM25, untuned cosine and their per-query z-score blend over all 110 queries (label-free teachers)."""

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from relsum_core.baselines import CosineScorer, bm25_scores
from relsum_core.data import group_by_query, load_dataset
from relsum_core.metrics import per_query_ndcg
from relsum_core.trainers import ranker as R

torch.set_num_threads(1)
catalog, judg = load_dataset(None)
bq = group_by_query(judg)
base = R.default_base()
tok = AutoTokenizer.from_pretrained(base)
vs = R.ValSet(bq, list(bq), catalog, tok)
enc = CosineScorer(AutoModel.from_pretrained(base), tok, device=torch.device("cpu"))
z = lambda x: (x - x.mean()) / (x.std() + 1e-9)
for variant in ("title", "title+64"):
    t = vs.texts[variant]
    bm = {q: np.asarray(bm25_scores(vs.queries[q], t[q])) for q in vs.query_ids}
    co = {q: np.asarray(enc.scores(vs.queries[q], t[q])) for q in vs.query_ids}
    res = {"bm25": bm, "cos": co}
    for w in (0.25, 0.5, 1.0):
        res[f"cos+{w}bm25"] = {q: z(co[q]) + w * z(bm[q]) for q in vs.query_ids}
    for name, s in res.items():
        v = np.array([x for x in per_query_ndcg(s, vs.grades, 10).values() if not np.isnan(x)])
        print(variant, name, round(v.mean(), 4), len(v), flush=True)
