"""Training the summarizer against the frozen ranker: ``relsum train --algo grpo|dpo``.

A step: draw ``products_per_step`` training products, sample ``group_size`` summaries of each and
reward them with the ranker (`relsum_core.rewards`).  Then

* grpo: normalise rewards within each product's group (each component on its own by default,
  ``advantage="decoupled"``; ``"total"`` normalises the weighted sum) and take one clipped
  policy-gradient step with a k3 KL penalty to the frozen initial policy (its weight fixed, or
  adapted each step towards ``kl_target``).  One update per batch
  of rollouts, so the ratio's denominator is the rollout policy itself (``old_logp =
  logp.detach()``), as in TRL with one iteration.
* dpo: the best- and worst-rewarded summary of each group form a (chosen, rejected) pair (groups
  whose rewards are all equal give none), trained with the DPO loss against the initial policy.

Log-probs of policy and reference come from `fused_logprob` on the LM head: no [tokens x vocab]
logits.

Precision: fp32 unless asked.  ``precision="bf16"`` (or ``"auto"``: bf16 on CUDA and on CPUs with
bf16 dot products) keeps the policy's weights, gradients and AdamW state fp32, runs the update's
forwards (policy and reference) under bf16 autocast with the LM head outside it (fp32 on the torch
path, fp32 accumulation in the Triton kernel), and samples from a bf16 copy of the policy refreshed
after every optimizer step.  A step is 1.6x faster on the project's CPU
(`benchmarks/results/cpu-precision.md`).  It is not the default because in one of three GRPO
seeds on ESCI the bf16 summaries gained far less novelty (words of the product text the title
lacks) than the fp32 ones; in the other two they ended close (`benchmarks/results/rl_cpu/bf16/`).

Data parallel: under ``torchrun --nproc_per_node=N`` each process takes ``products_per_step / N``
of the step's products (the same global draw everywhere), samples them with per-row seeds (so a
row's summary does not depend on which process drew it), and the policy's log-prob module is
wrapped in DDP (gloo on CPU, NCCL on GPU); losses are scaled so the averaged gradient equals the
one-process gradient of the same global batch.  Rank 0 logs, evaluates and saves.

Output directory::

    checkpoint/     policy (HF folder) + trainer.pt (optimizer, scheduler, step, KL weight): resume
                    point (every draw is seeded by the step, so no RNG state is needed), and
                    relsum_policy.json: the products it trained on, which `relsum evaluate` keeps
                    out of held-out scores
    metrics.jsonl   event "config" once, "train" per step, "eval" per evaluation (its "samples": the
                    greedy summaries)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from relsum_core.data import data_digest, group_by_query, load_dataset, split_queries
from relsum_core.io import JsonlLog, atomic_write_dir, trim_metrics
from relsum_core.losses import dpo_loss, grpo_loss, sequence_logprob
from relsum_core.policy import (
    SUMMARY_BUDGET,
    SUMMARY_PRODUCT_TOKENS,
    TRAINING_RECORD,
    Rollouts,
    build_prompt,
    completion_logprobs,
    load_policy,
    read_training_record,
    sample,
)
from relsum_core.precision import check_precision, claim_device, resolve_device, resolve_precision
from relsum_core.records import changed_settings, dataclass_defaults, describe, weight_files, weights_differ
from relsum_core.rewards import COMPONENTS, RankerReward, RewardConfig, decoupled_advantages, group_advantages


@dataclass
class SummarizerConfig:
    out: str
    ranker: str  # frozen cross-encoder checkpoint (e.g. the best/ of train-ranker)
    policy: str | None = None  # HF causal LM folder; None = packaged SmolLM2-135M-Instruct
    data: str | None = None  # None = bundled ESCI-150q
    algo: str = "grpo"  # or "dpo"
    steps: int = 50
    max_minutes: float | None = None  # wall-clock bound: stop (eval, save) at the first step past it
    products_per_step: int = 4
    group_size: int = 4
    grad_accum: int = 1  # micro-batches per step (memory); the step's loss is the same
    lr: float = 1e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.04  # grpo: KL penalty weight (the start and floor when kl_target is set)
    kl_target: float | None = None  # grpo: adapt beta each step so the per-token KL tracks this
    dpo_beta: float = 0.1
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    entropy_coef: float = 0.0
    loss_type: str = "dapo"
    temperature: float = 1.0
    top_p: float = 1.0
    budget: int = SUMMARY_BUDGET  # summary tokens asked for and sampled at most
    max_product_tokens: int = SUMMARY_PRODUCT_TOKENS
    val_fraction: float = 0.2
    # The query split is train-ranker's and evaluate's (split_seed 0 in all three by default), so the
    # summarizer never trains on the queries the ranker and the evaluation hold out; ``seed`` moves
    # only the draws, rollouts and initial RNG.
    split_seed: int = 0
    eval_products: int = 16
    eval_every: int = 10
    save_every: int = 10
    seed: int = 0
    device: str | None = None
    compile_decode: bool = False  # GPU: torch.compile the sampler's decode step (~20 s once per shape)
    precision: str = "fp32"  # or "bf16", or "auto" (bf16 on CUDA and on CPUs with bf16 dot products)
    progress: bool = True
    # reward weights: RewardConfig's defaults, kept in one place
    reward_relevance: float = RewardConfig.relevance
    reward_ranking: float = RewardConfig.ranking
    reward_budget: float = RewardConfig.budget
    reward_faithfulness: float = RewardConfig.faithfulness
    reward_novelty: float = RewardConfig.novelty
    advantage: str = "decoupled"  # grpo: "decoupled" (per component, then weighted) or "total"

    def __post_init__(self):
        if self.algo not in ("grpo", "dpo"):
            raise ValueError(f"algo must be 'grpo' or 'dpo', got {self.algo!r}")
        if self.advantage not in ("decoupled", "total"):
            raise ValueError(f"advantage must be 'decoupled' or 'total', got {self.advantage!r}")
        if self.group_size < 2:
            why = ("to form a (best, worst) pair" if self.algo == "dpo" else
                   "(advantages are normalised within each product's group: a group of one has none "
                   "and the policy would never move)")
            raise ValueError(f"{self.algo} needs group_size >= 2 {why}, got {self.group_size}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (the update's log-probs divide by "
                             f"it; rollouts of a group must differ), got {self.temperature}")
        check_precision(self.precision)
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0 tokens, got {self.budget}")
        if self.kl_target is not None:
            if self.kl_target <= 0:
                raise ValueError(f"kl_target must be > 0, got {self.kl_target}")
            if self.algo != "grpo" or self.beta <= 0:
                raise ValueError("kl_target adapts the grpo KL weight: it needs algo='grpo' and a "
                                 f"starting beta > 0 (got algo={self.algo!r}, beta={self.beta})")
        for name in ("steps", "products_per_step", "group_size", "grad_accum", "eval_every", "save_every",
                     "max_product_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_products < 0:
            raise ValueError(f"eval_products must be >= 0 (0: no evaluation), got {self.eval_products}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.beta < 0:  # a negative weight would pay the policy for leaving the reference
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.algo == "grpo" and (self.products_per_step * self.group_size) % self.grad_accum:
            raise ValueError("products_per_step * group_size must be divisible by grad_accum")


# Settings a resumed run may change: they bound or watch the run, they do not change what it trains.
RESUMABLE = frozenset({"out", "steps", "max_minutes", "progress", "device", "eval_every", "save_every",
                       "eval_products", "compile_decode", "grad_accum"})
# Path settings whose content `run_sources` records: with sources recorded, only the content counts.
SOURCE_PATHS = frozenset({"ranker", "policy", "data"})


def _changed_settings(saved: dict, cfg: SummarizerConfig, ignore: frozenset = frozenset()) -> dict:
    """The settings that differ from the saved run's and may not change on a resume."""
    # What a run from before a setting existed did: total advantages, and the split seeded by --seed.
    before = {"advantage": "total", "split_seed": saved.get("seed", 0)}
    return changed_settings(saved, asdict(cfg), defaults={**dataclass_defaults(SummarizerConfig), **before},
                            ignore=RESUMABLE | ignore)


def run_sources(cfg: SummarizerConfig, catalog, judgments) -> dict:
    """What the run's models and data are, whatever paths name them: the ranker's and the base
    policy's weight files (name, size, mtime, sha256) and a digest of the judgments and their products."""
    by_query = group_by_query(judgments)
    return {"ranker_weights": weight_files(cfg.ranker), "policy_weights": weight_files(cfg.policy),
            "data_digest": data_digest(by_query, catalog, list(by_query))}


def _changed_sources(saved: dict, sources: dict, cfg: SummarizerConfig) -> list[str]:
    """What differs from the recorded sources; one a record predates is not compared."""
    what = {"ranker_weights": f"the ranker's weights at {cfg.ranker}",
            "policy_weights": f"the base policy's weights at {cfg.policy or 'the packaged default'}",
            "data_digest": "the data's judgments or product texts"}
    def differs(key):
        if key.endswith("_weights"):
            return weights_differ(saved[key], sources[key])
        return saved[key] != sources[key]

    return [what.get(k, k) for k in sorted(sources) if k in saved and differs(k)]


def _paths_recorded_by_content(saved: dict) -> frozenset:
    """The path settings a sources record stands for (the data's only once its digest was recorded)."""
    return SOURCE_PATHS if "data_digest" in saved else SOURCE_PATHS - {"data"}


def _check_resume(saved: dict, cfg: SummarizerConfig, saved_sources: dict | None = None,
                  sources: dict | None = None) -> None:
    """Refuse to resume under other settings, or against a ranker (the reward), base policy (the KL
    reference) or data that changed since the checkpoint.  With sources recorded, the same models
    and data under another path resume; a checkpoint from before they were recorded compares the
    path strings."""
    ignore = frozenset()
    if saved_sources is not None and sources is not None:
        ignore = _paths_recorded_by_content(saved_sources)
        moved = _changed_sources(saved_sources, sources, cfg)
        if moved:
            raise ValueError(f"{cfg.out}/checkpoint was trained against other models or data: "
                             f"{'; '.join(moved)} differ from the checkpoint's (rewritten since, or "
                             "another folder); resume with the ones it trained against, or train into "
                             "a new --out")
    changed = _changed_settings(saved, cfg, ignore)
    if changed:
        raise ValueError(f"{cfg.out}/checkpoint was trained with other settings ({describe(changed)}); "
                         "resume with the same ones, or train into a new --out")


def _check_fresh_out(cfg: SummarizerConfig, sources: dict | None = None) -> None:
    """A new run must not overwrite another run's log (a ranker run, another summarizer run); the
    same command, after a crash before its first checkpoint, starts again (the same models and data
    under other paths too, when the log recorded them)."""
    log = Path(cfg.out) / "metrics.jsonl"
    if not log.is_file():
        return
    first = None  # the log's first row, its config when a summarizer run wrote it
    for line in log.read_text(encoding="utf-8").split("\n"):
        try:
            first = json.loads(line)
        except json.JSONDecodeError:
            continue
        break
    if first is None:
        return
    if not isinstance(first, dict) or first.get("event") != "config":
        raise ValueError(f"{log} holds another run's metrics and {cfg.out} has no checkpoint to resume; "
                         "train into a new --out")
    saved_sources = first.get("sources")
    differs = []
    if isinstance(saved_sources, dict) and sources is not None:
        differs = _changed_sources(saved_sources, sources, cfg)
        changed = _changed_settings(first, cfg, _paths_recorded_by_content(saved_sources))
    else:
        changed = _changed_settings(first, cfg)
    if changed or differs:
        what = "; ".join(([f"settings {describe(changed)}"] if changed else []) + differs)
        raise ValueError(f"{log} holds the metrics of a run with other settings or models ({what}) and "
                         f"{cfg.out} has no checkpoint to resume; train into a new --out")


KL_GAIN = 0.5  # the controller's step: beta moves by at most 10% a step


def adapt_beta(beta: float, kl: float, target: float, floor: float = 0.0) -> float:
    """Proportional KL control: raise beta when the step's KL is above target, lower it below.

    A fixed beta lets the KL climb for as long as the reward keeps paying (it was still rising after
    47 steps of a CPU run); this bounds it.  The error is clipped to +-20% so one noisy step cannot
    swing beta.  ``floor``: the trainer passes the configured beta, because the KL starts at 0 (the
    policy is the reference) and a two-sided controller would first weaken the penalty and let the
    policy run before the KL reached the target.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return max(floor, beta * (1.0 + KL_GAIN * error))


def _split_products(judgments, cfg: SummarizerConfig) -> tuple[list[str], list[str]]:
    """Training and validation products, by the query split (a product goes where its queries go)."""
    texts = {j.query_id: j.query for j in judgments}
    train_q, val_q = split_queries(sorted(texts), val_fraction=cfg.val_fraction, seed=cfg.split_seed,
                                   query_texts=texts)
    val_q = set(val_q)
    train, val = set(), set()
    for j in judgments:
        (val if j.query_id in val_q else train).add(j.product_id)
    train -= val  # a product judged for a validation query never trains
    if not train:
        raise ValueError("no training products after the query split")
    return sorted(train), sorted(val)


def _rollout_rows(r: Rollouts, rows: slice | torch.Tensor) -> Rollouts:
    texts = r.texts[rows] if isinstance(rows, slice) else [r.texts[i] for i in rows.tolist()]
    return Rollouts(r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                    texts)


def _distributed(device_type: str) -> tuple[int, int, bool]:
    """(rank, world size, whether this call joined the process group), joining the torchrun group
    when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), joined


def _all_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class PolicyLogprobs(nn.Module):
    """The policy's per-token log-probs as a module, so DDP can wrap the training forward."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask, with_entropy: bool = False):
        r = Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, [])
        return completion_logprobs(self.model, r, temperature=self.temperature, with_entropy=with_entropy)


class SummarizerTrainer:
    def __init__(self, cfg: SummarizerConfig):
        from relsum_core.ranker import CrossEncoder

        self.cfg = cfg
        self.out = Path(cfg.out)
        device = resolve_device(cfg.device)
        self.rank, self.world, self._joined_group = _distributed(device.type)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
        # Triton (the fused log-prob, the ranker's kernels) and NCCL work on the current device:
        # without this every torchrun process but rank 0 would launch its kernels on GPU 0.
        self.device = device = claim_device(device)
        if cfg.products_per_step % self.world:
            raise ValueError(f"products_per_step={cfg.products_per_step} must be divisible by the "
                             f"{self.world} processes")
        self.catalog, self.judgments = load_dataset(cfg.data)
        self.train_ids, self.val_ids = _split_products(self.judgments, cfg)
        if len(self.train_ids) < cfg.products_per_step:
            # every step must hold products_per_step * group_size rollouts: grad_accum and the
            # processes split exactly that many
            raise ValueError(f"products_per_step={cfg.products_per_step} is more than the "
                             f"{len(self.train_ids)} training products")
        # What evaluate must not score this policy on: this run's products and its base policy's.
        self.trained_products = {**(read_training_record(cfg.policy) or {}),
                                 **{p: self.catalog[p].title for p in self.train_ids}}
        # A fixed random draw, not the first ids: sorted ASINs put all the books (ISBNs) first.
        n_eval = min(cfg.eval_products, len(self.val_ids))
        self.eval_ids = sorted(random.Random(0).sample(self.val_ids, n_eval))
        self.sources = run_sources(cfg, self.catalog, self.judgments)  # before loading: what this run reads
        self.ranker = CrossEncoder.from_pretrained(cfg.ranker, device=self.device)
        self.reward = RankerReward(
            self.ranker.predict, self.catalog, self.judgments,
            RewardConfig(relevance=cfg.reward_relevance, ranking=cfg.reward_ranking, budget=cfg.reward_budget,
                         faithfulness=cfg.reward_faithfulness, novelty=cfg.reward_novelty,
                         budget_tokens=cfg.budget),
            tokenizer=self.ranker.tokenizer)
        resume = self.out / "checkpoint"
        resuming = (resume / "trainer.pt").is_file()
        if not resuming:
            _check_fresh_out(cfg, self.sources)
        self.policy, self.tok = load_policy(resume if resuming else cfg.policy, device=self.device)
        self.ref = None
        if cfg.beta != 0.0 or cfg.algo == "dpo":
            # The reference is the initial policy, also after a resume.
            self.ref = (load_policy(cfg.policy, device=self.device)[0] if resuming
                        else copy.deepcopy(self.policy))
            self.ref.eval().requires_grad_(False)
        self.dtype = resolve_precision(cfg.precision, self.device)
        self.sampler = self.policy
        if self.dtype != torch.float32:
            # Rollouts from a bf16 copy: decoding re-reads every weight per token, and autocast would
            # re-cast them per call.  Buffers (rotary frequencies) stay fp32.
            self.sampler = copy.deepcopy(self.policy).eval().requires_grad_(False)
            for p in self.sampler.parameters():
                p.data = p.data.to(self.dtype)
        self.logprobs = PolicyLogprobs(self.policy, cfg.temperature)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.logprobs = DistributedDataParallel(self.logprobs)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        self.step = 0
        self.beta = cfg.beta
        if resuming:
            state = torch.load(resume / "trainer.pt", map_location="cpu", weights_only=False)
            _check_resume(state.get("config", {}), cfg, state.get("sources"), self.sources)
            # Its products must be this run's: changed data, or a checkpoint from before one query
            # text under two ids was kept on one side of the split, would train on others.
            done = read_training_record(resume)
            if done is not None and done != self.trained_products:
                moved = sorted(set(done) ^ set(self.trained_products)) + sorted(  # and retitled ones
                    p for p in set(done) & set(self.trained_products) if done[p] != self.trained_products[p])
                raise ValueError(f"{resume} trained on other products than this run's split gives "
                                 f"({len(moved)} differ, e.g. {moved[:3]}): the data changed, or the "
                                 "checkpoint predates keeping one query text's ids on one side of the "
                                 "split; train into a new --out")
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.step = state["step"]
            self.beta = state.get("beta", cfg.beta)

    # ---------------------------------------------------------------------------------- pieces
    def _prompts(self, product_ids: list[str]) -> list[str]:
        return [build_prompt(self.catalog[p], self.tok, budget=self.cfg.budget,
                             max_product_tokens=self.cfg.max_product_tokens) for p in product_ids]

    def _step_products(self, step: int) -> list[str]:
        # Seeded by step, so a resumed run draws what the uninterrupted one would have.
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        return rng.sample(self.train_ids, self.cfg.products_per_step)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _policy_logprobs(self, r: Rollouts, with_entropy: bool = False):
        with self._autocast():
            return self.logprobs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                 with_entropy=with_entropy)

    @torch.no_grad()
    def _ref_logprobs(self, r: Rollouts):
        # Same autocast as the policy's forward, so the two agree exactly while the policy is unchanged.
        with self._autocast():
            return completion_logprobs(self.ref, r, temperature=self.cfg.temperature)

    @torch.no_grad()
    def _refresh_sampler(self) -> None:
        if self.sampler is not self.policy:
            for s, p in zip(self.sampler.parameters(), self.policy.parameters()):
                s.copy_(p)

    def _sync_context(self, last: bool):
        # Under DDP only the last micro-batch's backward all-reduces the gradients.
        return self.logprobs.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()

    def _global(self, value: float) -> float:
        return _all_sum([value], self.device)[0] if self.world > 1 else value

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        local = cfg.products_per_step // self.world
        products = self._step_products(self.step)[self.rank * local:(self.rank + 1) * local]
        pids = [p for p in products for _ in range(cfg.group_size)]
        first_row = self.rank * local * cfg.group_size
        seeds = [(cfg.seed * 7919 + self.step) * 100_003 + first_row + i for i in range(len(pids))]
        self.policy.eval()
        rollouts = sample(self.sampler, self.tok, self._prompts(pids), max_new_tokens=cfg.budget,
                          temperature=cfg.temperature, top_p=cfg.top_p, seed=seeds,
                          compile_decode=cfg.compile_decode)
        t1 = time.perf_counter()
        rewards = self.reward(pids, rollouts.texts, rollouts.lengths.tolist())
        t2 = time.perf_counter()

        self.policy.train()
        update = self._grpo_update if cfg.algo == "grpo" else self._dpo_update
        metrics_acc = update(rollouts, rewards)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.opt.step()
        lr = self.sched.get_last_lr()[0]  # the rate this step used (after sched.step() it is the next one's)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self._refresh_sampler()
        t3 = time.perf_counter()
        self.step += 1
        tokens = float(rollouts.completion_mask.sum().clamp_min(1))
        row = {
            "reward": float(rewards["total"].mean()),
            **{f"reward_{c}": float(rewards[c].mean()) for c in COMPONENTS},
            "summary_tokens": float(rollouts.lengths.float().mean()),
            "new_tokens_per_s": tokens / max(t1 - t0, 1e-9),
            "time_sample_s": t1 - t0, "time_reward_s": t2 - t1, "time_update_s": t3 - t2,
            **metrics_acc,
        }
        if self.world > 1:  # means over processes (tokens/s: the sum)
            keys = sorted(row)
            sums = _all_sum([row[k] for k in keys], self.device)
            row = {k: v if k == "new_tokens_per_s" else v / self.world for k, v in zip(keys, sums)}
        if cfg.algo == "grpo":
            row["beta"] = self.beta  # the weight this step's loss used
            if cfg.kl_target is not None:  # the global mean KL, so every process moves beta alike
                self.beta = adapt_beta(self.beta, row["kl"], cfg.kl_target, floor=cfg.beta)
        return {"step": self.step, "lr": lr, "grad_norm": float(grad_norm), **row}

    def _advantages(self, rewards: dict[str, np.ndarray]) -> np.ndarray:
        cfg = self.cfg
        if cfg.advantage == "total":
            return group_advantages(rewards["total"], cfg.group_size)
        weights = {c: getattr(self.reward.config, c) for c in COMPONENTS}
        return decoupled_advantages(rewards, weights, cfg.group_size)

    def _grpo_update(self, rollouts: Rollouts, rewards: dict[str, np.ndarray]) -> dict[str, float]:
        cfg = self.cfg
        adv = torch.tensor(self._advantages(rewards), dtype=torch.float32, device=self.device)
        micro = rollouts.completion_ids.shape[0] // cfg.grad_accum
        tokens = float(rollouts.completion_mask.sum().clamp_min(1))
        global_tokens = max(self._global(float(rollouts.completion_mask.sum())), 1.0)
        metrics_acc: dict[str, float] = {}
        for k in range(cfg.grad_accum):
            sl = slice(k * micro, (k + 1) * micro)
            r = _rollout_rows(rollouts, sl)
            ref_logp = self._ref_logprobs(r) if self.ref is not None else None
            with self._sync_context(last=k == cfg.grad_accum - 1):
                logp, ent = self._policy_logprobs(r, with_entropy=True)
                loss, m = grpo_loss(
                    logp, None, adv[sl], r.completion_mask, ref_logp=ref_logp, beta=self.beta,
                    epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, entropy=ent,
                    entropy_coef=cfg.entropy_coef, loss_type=cfg.loss_type, max_completion_length=cfg.budget,
                    # token mean over the whole step (all micro-batches and processes); DDP then
                    # averages over processes, hence the factor world
                    token_normalizer=global_tokens / self.world if cfg.loss_type == "dapo" else None)
                if cfg.loss_type != "dapo":
                    loss = loss / cfg.grad_accum
                loss.backward()
            m["loss"] = loss.detach()  # what was back-propagated: the micro-batches' losses add up
            share = r.completion_mask.sum().item() / tokens
            for key, v in m.items():
                metrics_acc[key] = metrics_acc.get(key, 0.0) + float(v) * (share if key != "loss" else 1.0)
        return metrics_acc

    def _dpo_update(self, rollouts: Rollouts, rewards: dict[str, np.ndarray]) -> dict[str, float]:
        cfg = self.cfg
        groups = rewards["total"].reshape(-1, cfg.group_size)
        keep = np.flatnonzero(groups.max(1) > groups.min(1))  # tied groups prefer nothing
        chosen = keep * cfg.group_size + groups[keep].argmax(1)
        rejected = keep * cfg.group_size + groups[keep].argmin(1)
        pairs = self._global(float(keep.size))
        metrics_acc: dict[str, float] = {"pairs": float(keep.size)}
        if pairs == 0:
            return metrics_acc
        parts = list(zip(np.array_split(chosen, cfg.grad_accum), np.array_split(rejected, cfg.grad_accum)))
        for k, (part_c, part_r) in enumerate(parts):
            with self._sync_context(last=k == len(parts) - 1):
                if part_c.size == 0:
                    # Nothing to learn here, but under DDP every process must join the all-reduce.
                    if self.world > 1 and k == len(parts) - 1:
                        (0.0 * self._policy_logprobs(_rollout_rows(rollouts, slice(0, 1))).sum()).backward()
                    continue
                rows = torch.as_tensor(np.concatenate([part_c, part_r]), device=self.device)
                r = _rollout_rows(rollouts, rows)
                ref_seq = sequence_logprob(self._ref_logprobs(r), r.completion_mask)
                seq = sequence_logprob(self._policy_logprobs(r), r.completion_mask)
                n = part_c.size
                loss, m = dpo_loss(seq[:n], seq[n:], ref_seq[:n], ref_seq[n:], beta=cfg.dpo_beta)
                # mean over the step's pairs on all processes (DDP averages, hence world)
                (loss * (n * self.world / pairs)).backward()
            for key, v in m.items():
                metrics_acc[key] = metrics_acc.get(key, 0.0) + float(v) * n / keep.size
        return metrics_acc

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy summaries of a fixed set of validation products; mean reward and components."""
        ids = self.eval_ids
        if not ids:
            return {}
        self.policy.eval()
        r = sample(self.sampler, self.tok, self._prompts(ids), max_new_tokens=self.cfg.budget,
                   temperature=0.0)
        rewards = self.reward(ids, r.texts, r.lengths.tolist())
        return {"step": self.step, "reward": float(rewards["total"].mean()),
                **{f"reward_{c}": float(rewards[c].mean()) for c in COMPONENTS},
                "summary_tokens": float(r.lengths.float().mean()),
                "samples": [{"product_id": p, "title": self.catalog[p].title, "summary": s}
                            for p, s in zip(ids, r.texts)]}

    def _log_eval(self, log: JsonlLog) -> None:
        row = self.evaluate()
        if row:  # eval_products 0: nothing evaluated, nothing logged
            log.write("eval", **row)

    def save(self) -> Path:
        def fill(tmp: Path) -> None:
            self.policy.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)
            torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                        "step": self.step, "beta": self.beta, "config": asdict(self.cfg),
                        "sources": self.sources}, tmp / "trainer.pt")
            # the prompt's budgets too: summarize and evaluate default to them (policy.read_prompt_settings)
            record = {"train_products": self.trained_products, "data": self.cfg.data, "algo": self.cfg.algo,
                      "step": self.step, "budget": self.cfg.budget,
                      "max_product_tokens": self.cfg.max_product_tokens}
            text = json.dumps(record, ensure_ascii=False) + "\n"
            (tmp / TRAINING_RECORD).write_text(text, encoding="utf-8")

        return atomic_write_dir(self.out / "checkpoint", fill)

    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        lead = self.rank == 0
        dtype_name = str(self.dtype).removeprefix("torch.")  # which precision auto chose
        log = None
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.step > 0:  # rows logged after the checkpoint will be logged again
                trim_metrics(self.out / "metrics.jsonl", self.step)
            log = JsonlLog(self.out / "metrics.jsonl", append=self.step > 0)
            if self.step == 0:
                log.write("config", **asdict(cfg), world_size=self.world, train_dtype=dtype_name,
                          sources=self.sources)
                self._log_eval(log)
        last = {"step": self.step}  # what a run already at its last step returns
        t_start = time.perf_counter()
        show = cfg.progress and lead
        desc = f"{cfg.algo} ({dtype_name})"
        with tqdm(total=cfg.steps, initial=self.step, disable=not show, desc=desc) as bar:
            while self.step < cfg.steps:
                last = self.train_step()
                elapsed_min = (time.perf_counter() - t_start) / 60
                out_of_time = cfg.max_minutes is not None and elapsed_min > cfg.max_minutes
                if self.world > 1:  # clocks differ: all processes stop when any runs out
                    out_of_time = self._global(float(out_of_time)) > 0
                bar.update(1)
                bar.set_postfix(reward=f"{last['reward']:.3f}", loss=f"{last.get('loss', 0.0):.4f}")
                if not lead:
                    if out_of_time:
                        break
                    continue
                log.write("train", **last)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps or out_of_time:
                    self._log_eval(log)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps or out_of_time:
                    self.save()
                if out_of_time:
                    break
        if log is not None:
            log.close()
        return last

    def close(self) -> None:
        """Leave data parallelism after a finished run: drop the DDP wrapper, and leave the process
        group if this trainer joined it.  A process that exits with a gloo group still alive (left
        joined, or held by a DDP module that a reference cycle keeps until shutdown) can abort at
        interpreter shutdown ("terminate called without an active exception") after all its work
        is saved, and torchrun then reports the run failed."""
        if self.world == 1:
            return
        import gc

        import torch.distributed as dist

        if isinstance(self.logprobs, nn.parallel.DistributedDataParallel):
            self.logprobs = self.logprobs.module
            gc.collect()  # a cycle through the wrapper goes now, while the interpreter is whole
        if self._joined_group and dist.is_initialized():
            dist.barrier()  # rank 0 may still be evaluating and saving
            dist.destroy_process_group()


def train_summarizer(cfg: SummarizerConfig) -> dict:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    trainer = SummarizerTrainer(cfg)
    last = trainer.train()
    # Only after success: a process that failed must not wait in a barrier the others never reach.
    trainer.close()
    return last
