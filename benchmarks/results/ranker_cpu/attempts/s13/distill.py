"""Session-13 probe: warm up the cross-encoder by distilling the untuned bi-encoder's cosine
(label-free: train queries' candidates in random groups), then the usual graded phase. CV fold split."""

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.optimization import get_linear_schedule_with_warmup

from relsum_core.baselines import CosineScorer
from relsum_core.data import fold_queries, group_by_query, load_dataset
from relsum_core.precision import resolve_precision
from relsum_core.ranker import CrossEncoder
from relsum_core.text import PrefixSampler
from relsum_core.trainers import ranker as R

p = argparse.ArgumentParser()
p.add_argument("--fold", type=int, default=0)
p.add_argument("--tau", type=float, default=0.03)
p.add_argument("--warm-steps", type=int, default=240)
p.add_argument("--pseudo", action="store_true", help="add the pseudo-query loss each step too")
p.add_argument("--name", default="cosdistill")
a = p.parse_args()
torch.set_num_threads(2)
root = Path("/work/rexp/s13")
R._seed_all(0)
base = R.default_base()
dtype = resolve_precision("auto", torch.device("cpu"))
catalog, judgments = load_dataset(None)
bq = group_by_query(judgments)
train_q, val_q = fold_queries(list(bq), 5, a.fold, 0)
tok = AutoTokenizer.from_pretrained(base)
val = R.ValSet(bq, val_q, catalog, tok)
teacher = CosineScorer(AutoModel.from_pretrained(base), tok)
log = open(root / f"{a.name}_fold{a.fold}.jsonl", "w")


def w(**kv):
    kv["time"] = round(time.time(), 1)
    log.write(json.dumps(kv) + "\n")
    log.flush()
    print(kv, flush=True)


model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
ce = CrossEncoder.from_model(model, tok, max_length=144)
predict = R._predictor(ce, 64)
sampler = PrefixSampler(tok, 64, seed=0)
rng = random.Random(1)
cfg = R.RankerTrainConfig(out="/tmp/x")


def evaluate(step, phase):
    model.eval()
    m = val.evaluate_pairs(predict)
    model.train()
    w(ev="eval", phase=phase, step=step, t=round(m["title/ndcg@10"], 4), t64=round(m["title+64/ndcg@10"], 4))


def random_groups():
    out = []
    for q in train_q:
        c = list(bq[q])
        rng.shuffle(c)
        out += [c[i : i + 8] for i in range(0, len(c) - 7, 8)]
    rng.shuffle(out)
    return out


model.train()
opt = torch.optim.AdamW(R._param_groups(model, 1e-4, 1e-3, 0.01))
sched = get_linear_schedule_with_warmup(opt, round(0.1 * a.warm_steps), a.warm_steps)
groups, pgroups, prng = [], [], random.Random(2)
for step in range(1, a.warm_steps + 1):
    if len(groups) < 4:
        groups = random_groups()
    batch, groups = groups[:4], groups[4:]
    texts = [[sampler.sample(catalog[j.product_id]) for j in g] for g in batch]
    with torch.no_grad():
        tgt = torch.tensor(
            np.stack([teacher.scores(g[0].query, t) for g, t in zip(batch, texts)]), dtype=torch.float32
        )
    pairs = [(g[0].query, x) for g, t in zip(batch, texts) for x in t]
    s = R._train_scores(ce, pairs, dtype).view(len(batch), -1).float()
    loss = -(torch.softmax(tgt / a.tau, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    if a.pseudo:
        if len(pgroups) < 4:
            pgroups = R.make_pseudo_groups(bq, train_q, catalog, 8, prng)
        pb, pgroups = pgroups[:4], pgroups[4:]
        ps = R._train_scores(ce, R.pseudo_pairs(pb, catalog, sampler, prng, 0.0), dtype).view(len(pb), -1)
        loss = loss + torch.nn.functional.cross_entropy(ps, torch.zeros(len(pb), dtype=torch.long))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if step % 20 == 0:
        w(ev="warm", step=step, loss=round(loss.item(), 4))
evaluate(0, "after warm-up")
# graded phase: the trainer's defaults after a warm-up
opt = torch.optim.AdamW(R._param_groups(model, 2e-5, 1e-4, 0.01))
grng = random.Random(1000)
gpe = len(R.make_groups(bq, train_q, 8, random.Random(0)))
total = 2 * math.ceil(gpe / 4)
sched = get_linear_schedule_with_warmup(opt, round(0.1 * total), total)
step = 0
for epoch in range(2):
    gs = R.make_groups(bq, train_q, 8, grng)
    for b in range(0, len(gs), 4):
        batch = gs[b : b + 4]
        flat = [j for g in batch for j in g]
        scores = R._train_scores(ce, [(j.query, sampler.sample(catalog[j.product_id])) for j in flat], dtype)
        loss = R.listwise_loss(
            scores,
            torch.tensor([j.grade for j in flat]),
            torch.tensor([i for i, g in enumerate(batch) for _ in g]),
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
    evaluate(step, f"graded epoch {epoch + 1}")
