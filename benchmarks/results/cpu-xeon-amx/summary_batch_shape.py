"""Does a bf16 greedy summary depend on the batch it is sampled in?  SmolLM2 (the default policy),
the first 8 bundled products, the dynamic engine (CPU's).

    python benchmarks/results/cpu-xeon-amx/summary_batch_shape.py   # output: summary-batch-shape.txt

"A" is one batch of 8; every other variant prints how many of its 8 summaries differ from A's.
"""

import torch

from relsum_core.data import load_catalog
from relsum_core.policy import SUMMARY_BUDGET, build_prompt, load_policy, sample_ids, stop_token_ids

products = load_catalog(None)
ids = sorted(products)[:8]
model, tok = load_policy(None, dtype=torch.bfloat16)
prompts = [build_prompt(products[p], tok, budget=SUMMARY_BUDGET, max_product_tokens=128) for p in ids]
stops, pad = stop_token_ids(model, tok), tok.pad_token_id


def run(batch: list[str], pad_to: int = 0) -> tuple[list[tuple], int]:
    """Greedy completions of ``batch``, left-padded to at least ``pad_to`` tokens; and its own length."""
    enc = tok(batch, padding=True, return_tensors="pt", add_special_tokens=False)
    x, m = enc["input_ids"], enc["attention_mask"]
    P = x.shape[1]
    if pad_to > P:
        x = torch.cat([x.new_full((x.shape[0], pad_to - P), pad), x], 1)
        m = torch.cat([m.new_zeros((m.shape[0], pad_to - P)), m], 1)
    r = sample_ids(model, x, m, stop_ids=stops, pad_id=pad, max_new_tokens=SUMMARY_BUDGET,
                   temperature=0.0, seed=0)
    return [tuple(c[k.bool()].tolist()) for c, k in zip(r.completion_ids, r.completion_mask)], P


A, P8 = run(prompts)
print("prompt length of the batch of 8:", P8)
variants = {
    "batches of 4": run(prompts[:4])[0] + run(prompts[4:])[0],
    "each alone": [run([p])[0][0] for p in prompts],
    "each alone, padded to the batch of 8's length": [run([p], P8)[0][0] for p in prompts],
    "batch of 8, 37 more padding tokens": run(prompts, P8 + 37)[0],
    "batches of 4, padded to the batch of 8's length": run(prompts[:4], P8)[0] + run(prompts[4:], P8)[0],
}
for name, X in variants.items():
    print(f"{name}: {sum(a != x for a, x in zip(A, X))} of 8 differ from one batch of 8")
