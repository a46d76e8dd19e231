import re

import numpy as np
import torch
from transformers import AutoTokenizer

from relsum_core.baselines import bm25_scores
from relsum_core.data import group_by_query, load_dataset, split_queries
from relsum_core.metrics import per_query_ndcg
from relsum_core.ranker import CrossEncoder
from relsum_core.trainers import ranker as R

torch.set_num_threads(1)
catalog, judg = load_dataset(None)
bq = group_by_query(judg)
rows = []
for sp in (0, 1, 2):
    ck = f"/work/rexp/s12/cli_new_split{sp}/best"
    tr, va = split_queries(list(bq), 0.2, sp)
    tok = AutoTokenizer.from_pretrained(ck)
    ce = CrossEncoder.from_pretrained(ck)
    vs = R.ValSet(bq, va, catalog, tok)
    texts = vs.texts["title+64"]
    flat = R._predictor(ce, 64)([(vs.queries[q], t) for q in va for t in texts[q]])
    sc, i = {}, 0
    for q in va:
        n = len(vs.grades[q])
        sc[q] = np.asarray(flat[i : i + n])
        i += n
    bm = {q: bm25_scores(vs.queries[q], texts[q]) for q in va}
    a = per_query_ndcg(sc, vs.grades, 10, "esci")
    b = per_query_ndcg(bm, vs.grades, 10, "esci")
    for q in va:
        rows.append((a[q] - b[q], sp, vs.queries[q], a[q], b[q]))
rows.sort()
for r in rows:
    print(f"{r[0]:+.3f} split{r[1]} {r[3]:.3f} {r[4]:.3f} {r[2]}")
d = np.array([r[0] for r in rows])
dig = np.array([bool(re.search(r"\d", r[2])) for r in rows])
print("mean", d.mean(), "digit queries", dig.sum(), d[dig].mean(), "others", d[~dig].mean())
