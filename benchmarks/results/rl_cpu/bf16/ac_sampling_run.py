"""Experiment: bf16 update as in `relsum train --precision bf16`, but rollouts sampled under autocast
from the fp32 weights (the update's own numerics) instead of from the bf16 copy.

Usage: python ac_sampling_run.py RANKER_DIR OUT_DIR
"""

import sys

import numpy as np
import torch

import relsum_core.trainers.summarizer as S

_sample = S.sample


def autocast_sample(*args, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _sample(*args, **kwargs)


S.sample = autocast_sample
cfg = S.SummarizerConfig(out=sys.argv[2], ranker=sys.argv[1], algo="grpo", steps=20, seed=1,
                         products_per_step=4, group_size=4, max_product_tokens=64, budget=32, lr=1.5e-5,
                         warmup_steps=5, beta=0.04, kl_target=0.1, temperature=0.7, top_p=0.95,
                         eval_products=24, eval_every=10, save_every=10, precision="bf16")
torch.manual_seed(cfg.seed)
np.random.seed(cfg.seed)
trainer = S.SummarizerTrainer(cfg)
trainer.sampler = trainer.policy  # no bf16 copy: _refresh_sampler has nothing to do
trainer.train()
