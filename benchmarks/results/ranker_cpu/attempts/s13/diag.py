import sys

import numpy as np
import torch
from transformers import AutoTokenizer

from relsum_core.baselines import bm25_scores
from relsum_core.data import group_by_query, load_dataset, split_queries
from relsum_core.metrics import per_query_ndcg
from relsum_core.ranker import CrossEncoder
from relsum_core.trainers import ranker as R

torch.set_num_threads(2)
ck = sys.argv[1]
split = int(sys.argv[2])
catalog, judg = load_dataset(None)
bq = group_by_query(judg)
tr, va = split_queries(list(bq), 0.2, split)
tok = AutoTokenizer.from_pretrained(ck)
ce = CrossEncoder.from_pretrained(ck)
pred = R._predictor(ce, 64)
for name, qs in (("train", tr), ("val", va)):
    vs = R.ValSet(bq, qs, catalog, tok)
    texts = vs.texts["title+64"]
    pairs = [(vs.queries[q], t) for q in qs for t in texts[q]]
    flat = pred(pairs)
    sc = {}
    i = 0
    for q in qs:
        n = len(vs.grades[q])
        sc[q] = np.asarray(flat[i : i + n])
        i += n
    bm = {q: bm25_scores(vs.queries[q], texts[q]) for q in qs}
    z = lambda x: (x - x.mean()) / (x.std() + 1e-9)
    for nm, s in (("ce", sc), ("bm25", bm), ("hyb", {q: z(sc[q]) + 0.5 * z(bm[q]) for q in qs})):
        v = per_query_ndcg(s, vs.grades, 10, "esci")
        print(name, nm, round(float(np.nanmean(list(v.values()))), 4), flush=True)
