"""How far apart are the log-probs the bf16 trainer samples with, updates with, and fp32 would give?

Usage: python mismatch_probe.py [POLICY_DIR]   (default: the packaged SmolLM2-135M)"""
import copy
import json
import random
import sys

import torch

from relsum_core.data import load_dataset
from relsum_core.policy import build_prompt, completion_logprobs, load_policy, sample

torch.manual_seed(0)
cat, judg = load_dataset(None)
pids = random.Random(0).sample(sorted(cat), 8)
policy, tok = load_policy(sys.argv[1] if len(sys.argv) > 1 else None)
prompts = [build_prompt(cat[p], tok, budget=32, max_product_tokens=64) for p in pids for _ in range(4)]
sampler = copy.deepcopy(policy).eval().requires_grad_(False)
for p in sampler.parameters():
    p.data = p.data.bfloat16()
r = sample(sampler, tok, prompts, max_new_tokens=32, temperature=0.7, top_p=0.95,
           seed=list(range(len(prompts))))
m = r.completion_mask.bool()
with torch.no_grad():
    fp32 = completion_logprobs(policy, r, temperature=0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ac = completion_logprobs(policy, r, temperature=0.7)
    smp = completion_logprobs(sampler, r, temperature=0.7)


def stats(a, b):
    d = (a - b)[m].double()
    k3 = torch.exp(-d) + d - 1
    return dict(mean_abs=float(d.abs().mean()), max_abs=float(d.abs().max()), k3=float(k3.mean()))



out = {"tokens": int(m.sum()), "autocast_vs_fp32": stats(ac, fp32), "sampler_vs_autocast": stats(smp, ac),
       "sampler_vs_fp32": stats(smp, fp32), "entropy_proxy_mean_neg_logp": float(-fp32[m].mean())}
print(json.dumps(out, indent=1))
