"""Session-13 experiments: graded-phase variants from a cached (current-code) warm-up per split."""

import argparse
import json
import math
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
p.add_argument("--split", type=int, default=0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--name", required=True)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--lr", type=float, default=2e-5)
p.add_argument("--head-lr", type=float, default=1e-4)
p.add_argument("--targets", default="grade")
p.add_argument("--group-size", type=int, default=8)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--pointwise", type=float, default=0.0)
p.add_argument("--no-warm", action="store_true")
p.add_argument("--pseudo-mix", type=float, default=0.0)
a = p.parse_args()
torch.set_num_threads(2)
root = Path("/work/rexp/s13")
R._seed_all(a.seed)
base = R.default_base()
dtype = resolve_precision("auto", torch.device("cpu"))
catalog, judgments = load_dataset(None)
by_query = group_by_query(judgments)
train_q, val_q = split_queries(list(by_query), 0.2, a.split)
tok = AutoTokenizer.from_pretrained(base)
val = R.ValSet(by_query, val_q, catalog, tok)
trv = R.ValSet(by_query, train_q[:22], catalog, tok)
cfg = R.RankerTrainConfig(out="/tmp/x", seed=a.seed, progress=False)
log = open(root / f"{a.name}_split{a.split}_seed{a.seed}.jsonl", "w")


def w(**kv):
    kv["time"] = round(time.time(), 1)
    log.write(json.dumps(kv) + "\n")
    log.flush()
    print(kv, flush=True)


warm = root / f"warm_split{a.split}_seed{a.seed}"
if a.no_warm:
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
else:
    if not warm.exists():
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        ce = CrossEncoder.from_model(model, tok, max_length=144)
        sampler = PrefixSampler(tok, 64, seed=a.seed)
        model.train()

        class L:
            def write(self, ev, **kv):
                pass

        t = time.time()
        R.pseudo_warmup(ce, by_query, train_q, catalog, sampler, cfg, torch.device("cpu"), dtype, L())
        model.save_pretrained(warm)
        tok.save_pretrained(warm)
        w(ev="warm", s=round(time.time() - t, 1))
    model = AutoModelForSequenceClassification.from_pretrained(warm, num_labels=1)
ce = CrossEncoder.from_model(model, tok, max_length=144)
predict = R._predictor(ce, 64)
# same streams as train_ranker after the warm-up (it continues one rng; here a fixed offset)
sampler = PrefixSampler(tok, 64, seed=a.seed + 1000)
rng = random.Random(a.seed + 1000)
opt = torch.optim.AdamW(R._param_groups(model, a.lr, a.head_lr, 0.01))
gpe = len(R.make_groups(by_query, train_q, a.group_size, random.Random(0)))
total = a.epochs * math.ceil(gpe / a.batch_size)
sched = get_linear_schedule_with_warmup(opt, round(0.1 * total), total)


def evaluate(step, epoch):
    model.eval()
    t = time.time()
    m = val.evaluate_pairs(predict)
    tm = trv.evaluate_pairs(predict)
    w(
        ev="eval",
        step=step,
        epoch=epoch,
        t=round(m["title/ndcg@10"], 4),
        t64=round(m["title+64/ndcg@10"], 4),
        t64_5=round(m["title+64/ndcg@5"], 4),
        train_t64=round(tm["title+64/ndcg@10"], 4),
        s=round(time.time() - t, 1),
    )
    model.train()


evaluate(0, -1)
step = 0
pgroups = []
prng = random.Random(a.seed + 2000)
for epoch in range(a.epochs):
    groups = R.make_groups(by_query, train_q, a.group_size, rng)
    for b in range(0, len(groups), a.batch_size):
        batch = groups[b : b + a.batch_size]
        flat = [j for g in batch for j in g]
        pairs = [(j.query, sampler.sample(catalog[j.product_id])) for j in flat]
        scores = R._train_scores(ce, pairs, dtype)
        grades = torch.tensor([j.grade for j in flat])
        gids = torch.tensor([i for i, g in enumerate(batch) for _ in g])
        loss = R.listwise_loss(scores, grades, gids, a.targets)
        if a.pseudo_mix:
            if len(pgroups) < 2:
                pgroups = R.make_pseudo_groups(by_query, train_q, catalog, 8, prng)
            pb, pgroups = pgroups[:2], pgroups[2:]
            ps = R._train_scores(ce, R.pseudo_pairs(pb, catalog, sampler, prng, 0.0), dtype).view(len(pb), -1)
            loss = loss + a.pseudo_mix * torch.nn.functional.cross_entropy(
                ps, torch.zeros(len(pb), dtype=torch.long)
            )
        if a.pointwise:
            loss = loss + a.pointwise * R.pointwise_loss(scores, grades)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 20 == 0:
            w(ev="train", step=step, loss=round(loss.item(), 4))
    evaluate(step, epoch)
w(ev="done", step=step, total=total)
