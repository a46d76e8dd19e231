"""bf16 against fp32 where relsum's jobs pick a precision (`relsum_core.precision`, ``--precision``).

- ``test_train_ranker_step``: one `relsum train-ranker` step on real ESCI pairs: 4 queries x 8
  candidates, title + 0..64 attribute tokens, the trainer's own scoring (length-sorted chunks of 16,
  autocast for bf16), ListNet loss, backward, AdamW. Packaged all-MiniLM-L6-v2 weights.
- ``test_summarize_batch``: one `relsum summarize` batch: greedy summaries of real ESCI products
  by the packaged SmolLM2-135M, loaded in the dtype ``--precision`` gives.

- ``test_grpo_step``: one `relsum train --algo grpo` step as the trainer runs it (4 products x 4
  summaries, 64 product tokens, 32-token budget, temperature 0.7, KL to the reference): sampling,
  ranker reward, update and AdamW.  bf16 samples from the trainer's bf16 copy and updates under
  autocast; the ranker is the packaged all-MiniLM-L6-v2 with a fresh head (the reward's values do
  not matter here, its cost does).

All run on this machine's device. On a CPU without bf16 dot products bf16 is emulated, which is
why ``--precision auto`` keeps fp32 there; ``extra_info.cpu_has_bf16_dot`` says which case ran.
"""

from __future__ import annotations

import random

import pytest
import torch

from relsum_core.data import group_by_query, load_dataset, split_queries
from relsum_core.precision import cpu_has_bf16_dot

from conftest import bench_device, device_name

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
CUDA = torch.cuda.is_available()
# The CPU summarize batch is smaller than the default 16 x 384: a round takes seconds, not half a minute.
SUMMARIZE = dict(batch=16, product_tokens=384, new_tokens=32) if CUDA else dict(
    batch=8, product_tokens=384, new_tokens=16)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _info(benchmark, dev, precision: str, **extra) -> None:
    benchmark.extra_info.update(device=device_name(dev), precision=precision,
                                cpu_has_bf16_dot=cpu_has_bf16_dot(), threads=torch.get_num_threads(), **extra)


@pytest.fixture(scope="module")
def ranker_batches():
    from transformers import AutoTokenizer

    from relsum_core.text import PrefixSampler
    from relsum_core.trainers.ranker import default_base, make_groups

    try:
        base = default_base()
    except (ImportError, ValueError) as e:
        pytest.skip(f"packaged all-MiniLM-L6-v2 unavailable: {e}")
    tok = AutoTokenizer.from_pretrained(base)
    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    train_q, _ = split_queries(list(by_query), 0.2, seed=0)
    sampler = PrefixSampler(tok, 64, seed=0)
    groups = make_groups(by_query, train_q, 8, random.Random(0))
    batches = []
    for b in range(0, 4 * 8, 4):
        flat = [j for g in groups[b: b + 4] for j in g]
        pairs = [(j.query, sampler.sample(catalog[j.product_id])) for j in flat]
        grades = torch.tensor([j.grade for j in flat])
        group_ids = torch.tensor([i for i, g in enumerate(groups[b: b + 4]) for _ in g])
        batches.append((pairs, grades, group_ids))
    return base, tok, batches


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_train_ranker_step(benchmark, ranker_batches, precision):
    from transformers import AutoModelForSequenceClassification

    from relsum_core.ranker import CrossEncoder
    from relsum_core.trainers.ranker import RankerTrainConfig, _param_groups, _train_scores, listwise_loss

    base, tok, batches = ranker_batches
    dev = bench_device()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).to(dev).train()
    ce = CrossEncoder.from_model(model, tok, max_length=144)
    opt = torch.optim.AdamW(_param_groups(model, RankerTrainConfig(out="-")), lr=1e-5)
    dtype, turn = PRECISIONS[precision], iter(range(10**9))

    def step():
        pairs, grades, group_ids = batches[next(turn) % len(batches)]
        scores = _train_scores(ce, pairs, dtype)
        listwise_loss(scores, grades.to(dev), group_ids.to(dev)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)

    step()  # warm-up: AdamW state, oneDNN / cuBLAS kernels
    benchmark.pedantic(step, rounds=8, iterations=1)
    _info(benchmark, dev, precision, pairs_per_step=len(batches[0][0]), max_length=144)


@pytest.fixture(scope="module")
def summarize_prompts():
    from relsum_core.policy import build_prompt, default_policy_path, load_policy

    try:
        path = default_policy_path()
    except Exception as e:  # noqa: BLE001 - any failure to produce the packaged policy skips
        pytest.skip(f"packaged SmolLM2-135M unavailable: {type(e).__name__}: {e}")
    _, tok = load_policy(path)
    catalog, _ = load_dataset()
    products = [p for p in catalog.values() if p.description][: SUMMARIZE["batch"]]
    prompts = [build_prompt(p, tok, budget=SUMMARIZE["new_tokens"],
                            max_product_tokens=SUMMARIZE["product_tokens"]) for p in products]
    return path, prompts


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_summarize_batch(benchmark, summarize_prompts, precision):
    from relsum_core.policy import load_policy, sample

    path, prompts = summarize_prompts
    dev = bench_device()
    model, tok = load_policy(path, device=dev, dtype=PRECISIONS[precision])
    model.eval()
    out = {}

    def run():
        with torch.no_grad():
            out["r"] = sample(model, tok, prompts, max_new_tokens=SUMMARIZE["new_tokens"], temperature=0.0)
        _sync(dev)

    run()  # warm-up (on CUDA: the static engine's graph capture)
    benchmark.pedantic(run, rounds=3 if dev.type == "cpu" else 10, iterations=1)
    _info(benchmark, dev, precision, prompts=len(prompts), new_tokens=SUMMARIZE["new_tokens"],
          product_tokens=SUMMARIZE["product_tokens"],
          generated_tokens=int(out["r"].lengths.sum()), first_summary=out["r"].texts[0][:120])


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_grpo_step(benchmark, summarize_prompts, ranker_batches, precision, tmp_path):
    import statistics

    from relsum_core.trainers.summarizer import SummarizerConfig, SummarizerTrainer

    policy, _ = summarize_prompts
    base = ranker_batches[0]
    cfg = SummarizerConfig(out=str(tmp_path / "run"), ranker=str(base), policy=str(policy), algo="grpo",
                           products_per_step=4, group_size=4, max_product_tokens=64, budget=32, lr=1.5e-5,
                           warmup_steps=5, beta=0.04, temperature=0.7, top_p=0.95, progress=False,
                           device=str(bench_device()), precision=precision)
    torch.manual_seed(0)
    trainer = SummarizerTrainer(cfg)
    rows = []

    def step():
        rows.append(trainer.train_step())
        _sync(trainer.device)

    step()  # warm-up: AdamW state, oneDNN / cuBLAS kernels
    benchmark.pedantic(step, rounds=3 if trainer.device.type == "cpu" else 10, iterations=1)
    timed = rows[1:]
    _info(benchmark, trainer.device, precision, train_dtype=str(trainer.dtype).removeprefix("torch."),
          summaries_per_step=cfg.products_per_step * cfg.group_size,
          **{f"median_{k}": statistics.median(r[k] for r in timed)
             for k in ("time_sample_s", "time_reward_s", "time_update_s", "summary_tokens", "kl")})
