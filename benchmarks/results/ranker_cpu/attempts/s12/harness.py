"""Session-12 experiment harness: phase-2 (graded) variants from cached pseudo warm-ups, over seeds."""

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
p.add_argument("--seed", type=int, default=0)
p.add_argument("--name", required=True)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--head-lr", type=float, default=1e-3)
p.add_argument("--ema", type=float, nargs="*", default=[])
p.add_argument("--pseudo-mix", type=float, default=0.0, help="weight of a pseudo-query loss each step")
p.add_argument("--eval-every", type=int, default=43)
p.add_argument("--warmup-ratio", type=float, default=0.1)
p.add_argument("--group-size", type=int, default=8)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--pseudo-steps", type=int, default=240)
p.add_argument("--warm", default=None)
p.add_argument("--targets", default="grade")
p.add_argument("--llrd", type=float, default=1.0, help="layer-wise lr decay factor")
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
cfg = R.RankerTrainConfig(
    out="/tmp/x",
    lr=a.lr,
    head_lr=a.head_lr,
    seed=a.seed,
    epochs=a.epochs,
    pseudo_steps=a.pseudo_steps,
    group_size=a.group_size,
    batch_size=a.batch_size,
    warmup_ratio=a.warmup_ratio,
    progress=False,
)
warm = Path(a.warm) if a.warm else root / f"warm_seed{a.seed}_p{a.pseudo_steps}"
log = open(root / f"{a.name}_seed{a.seed}.jsonl", "w")


def w(**kv):
    kv["time"] = time.time()
    log.write(json.dumps(kv) + "\n")
    log.flush()
    print(kv, flush=True)


if not warm.exists():
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    ce = CrossEncoder.from_model(model, tok, max_length=144)
    sampler = PrefixSampler(tok, 64, seed=a.seed)
    model.train()

    class L:  # minimal log
        def write(self, ev, **kv):
            pass

    R.pseudo_warmup(ce, by_query, train_q, catalog, sampler, cfg, torch.device("cpu"), dtype, L())
    model.save_pretrained(warm)
    tok.save_pretrained(warm)
model = AutoModelForSequenceClassification.from_pretrained(warm, num_labels=1)
ce = CrossEncoder.from_model(model, tok, max_length=144)
predict = R._predictor(ce, 64)
sampler = PrefixSampler(tok, 64, seed=a.seed + 1000)
rng = random.Random(a.seed + 1000)
prng = random.Random(a.seed + 2000)

groups_param = R._param_groups(model, a.lr, a.head_lr, 0.01)
if a.llrd != 1.0:
    n_layers = model.config.num_hidden_layers
    groups_param = []
    for name, prm in model.named_parameters():
        head = name.startswith(("classifier.", "bert.pooler."))
        if head:
            depth = n_layers + 1
        elif "encoder.layer." in name:
            depth = int(name.split("encoder.layer.")[1].split(".")[0]) + 1
        else:
            depth = 0
        lr = a.head_lr if head else a.lr * a.llrd ** (n_layers - depth + 1)
        decay = prm.ndim >= 2 and "LayerNorm" not in name
        groups_param.append({"params": [prm], "lr": lr, "weight_decay": 0.01 if decay else 0.0})
opt = torch.optim.AdamW(groups_param, lr=a.lr)
gpe = len(R.make_groups(by_query, train_q, 8, random.Random(0)))
total = a.epochs * math.ceil(gpe / a.batch_size)
sched = get_linear_schedule_with_warmup(opt, round(a.warmup_ratio * total), total)
emas = {d: {k: v.detach().clone() for k, v in model.state_dict().items()} for d in a.ema}


def evaluate(step):
    model.eval()
    m = val.evaluate_pairs(predict)
    w(
        ev="eval",
        step=step,
        kind="raw",
        t=m["title/ndcg@10"],
        t64=m["title+64/ndcg@10"],
        t64_5=m["title+64/ndcg@5"],
    )
    if emas:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        for d, sd in emas.items():
            model.load_state_dict(sd)
            m = val.evaluate_pairs(predict)
            w(
                ev="eval",
                step=step,
                kind=f"ema{d}",
                t=m["title/ndcg@10"],
                t64=m["title+64/ndcg@10"],
                t64_5=m["title+64/ndcg@5"],
            )
        model.load_state_dict(saved)
    model.train()


evaluate(0)
step = 0
pgroups = []
model.train()
for _epoch in range(a.epochs):
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
            pp = [(q, sampler.sample(catalog[pid])) for q, pids in pb for pid in pids]
            ps = R._train_scores(ce, pp, dtype).view(len(pb), -1)
            loss = loss + a.pseudo_mix * torch.nn.functional.cross_entropy(
                ps, torch.zeros(len(pb), dtype=torch.long)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        with torch.no_grad():
            for d, sd in emas.items():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        sd[k].mul_(d).add_(v, alpha=1 - d)
                    else:
                        sd[k].copy_(v)
        if step % 10 == 0:
            w(ev="train", step=step, loss=loss.item())
        if step % a.eval_every == 0:
            evaluate(step)
    if step % a.eval_every:
        evaluate(step)
w(ev="done", step=step)
model.save_pretrained(root / f"final_{a.name}_seed{a.seed}")
tok.save_pretrained(root / f"final_{a.name}_seed{a.seed}")
