import sys

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from relsum_core.data import group_by_query, load_dataset, split_queries
from relsum_core.ranker import CrossEncoder
from relsum_core.trainers import ranker as R

paths = sys.argv[1:]
catalog, judgments = load_dataset(None)
by_query = group_by_query(judgments)
train_q, val_q = split_queries(list(by_query), 0.2, 0)
tok = AutoTokenizer.from_pretrained(paths[0])
val = R.ValSet(by_query, val_q, catalog, tok)
models = [AutoModelForSequenceClassification.from_pretrained(p) for p in paths]
sds = [m.state_dict() for m in models]
soup = {
    k: sum(sd[k].float() for sd in sds) / len(sds) if sds[0][k].is_floating_point() else sds[0][k]
    for k in sds[0]
}
m = models[0]
m.load_state_dict(soup)
ce = CrossEncoder.from_model(m, tok, max_length=144)
r = val.evaluate_pairs(R._predictor(ce, 64))
print("soup", {k: round(v, 4) for k, v in r.items() if "ndcg" in k})
