"""Pseudo warm-up with validation every N steps; saves the final warm-up as a checkpoint."""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.optimization import get_linear_schedule_with_warmup

from relsum_core.data import group_by_query, load_dataset, split_queries
from relsum_core.precision import resolve_precision
from relsum_core.ranker import CrossEncoder
from relsum_core.text import PrefixSampler
from relsum_core.trainers import ranker as R

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=0)
p.add_argument("--name", required=True)
p.add_argument("--steps", type=int, default=240)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--head-lr", type=float, default=1e-3)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--eval-every", type=int, default=40)
p.add_argument("--attr-prob", type=float, default=0.5)
a = p.parse_args()
root = Path("/work/rexp/s12")
R._seed_all(a.seed)
base = R.default_base()
dtype = resolve_precision("auto", torch.device("cpu"))
catalog, judgments = load_dataset(None)
by_query = group_by_query(judgments)
train_q, val_q = split_queries(list(by_query), 0.2, 0)
tok = AutoTokenizer.from_pretrained(base)
val = R.ValSet(by_query, val_q, catalog, tok)
log = open(root / f"{a.name}_seed{a.seed}.jsonl", "w")


def w(**kv):
    kv["time"] = time.time()
    log.write(json.dumps(kv) + "\n")
    log.flush()
    print(kv, flush=True)


model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
ce = CrossEncoder.from_model(model, tok, max_length=144)
predict = R._predictor(ce, 64)
sampler = PrefixSampler(tok, 64, seed=a.seed)
rng = random.Random(a.seed + 1)
opt = torch.optim.AdamW(R._param_groups(model, a.lr, a.head_lr, 0.01))
sched = get_linear_schedule_with_warmup(opt, round(0.1 * a.steps), a.steps)
model.train()
groups = []
for step in range(1, a.steps + 1):
    if len(groups) < a.batch_size:
        groups = R.make_pseudo_groups(by_query, train_q, catalog, 8, rng)
    batch, groups = groups[: a.batch_size], groups[a.batch_size :]
    pairs = R.pseudo_pairs(batch, catalog, sampler, rng, a.attr_prob)
    scores = R._train_scores(ce, pairs, dtype).view(len(batch), -1)
    loss = torch.nn.functional.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.long))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if step % 20 == 0:
        w(ev="pseudo", step=step, loss=loss.item())
    if step % a.eval_every == 0 or step == a.steps:
        m = val.evaluate_pairs(predict)
        w(ev="eval", step=step, t=m["title/ndcg@10"], t64=m["title+64/ndcg@10"], t64_5=m["title+64/ndcg@5"])
model.save_pretrained(root / f"warm_{a.name}_seed{a.seed}")
tok.save_pretrained(root / f"warm_{a.name}_seed{a.seed}")
