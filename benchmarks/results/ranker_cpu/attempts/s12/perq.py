import sys

import numpy as np

from relsum_core.baselines import bm25_scores
from relsum_core.data import group_by_query, load_dataset, split_queries
from relsum_core.metrics import mean_ndcg
from relsum_core.ranker import CrossEncoder
from relsum_core.trainers import ranker as R

catalog, judgments = load_dataset(None)
by_query = group_by_query(judgments)
_, val_q = split_queries(list(by_query), 0.2, 0)
ce = CrossEncoder.from_pretrained(sys.argv[1])
val = R.ValSet(by_query, val_q, catalog, ce.tokenizer)
rows = []
for q in val_q:
    out = []
    for name in ("title", "title+64"):
        texts = val.texts[name][q]
        s_ce = np.asarray(ce.predict([(val.queries[q], t) for t in texts]))
        s_bm = np.asarray(bm25_scores(val.queries[q], texts))
        out += [
            mean_ndcg({q: s_ce}, {q: val.grades[q]}, 10)[0],
            mean_ndcg({q: s_bm}, {q: val.grades[q]}, 10)[0],
        ]
    g = val.grades[q]
    rows.append(
        (out[2] - out[3], q, val.queries[q][:40], len(g), sum(x == 3 for x in g), *[round(x, 3) for x in out])
    )
rows.sort()
print("diff(ce-bm25,t64) qid query n nE | ce_t bm_t ce_t64 bm_t64")
for r in rows:
    print(f"{r[0]:+.3f}", *r[1:])
