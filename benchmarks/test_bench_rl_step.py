"""One GRPO step split into sampling, reward and update, against the plain Hugging Face composition.

Shapes (random weights, random prompt token ids, no policy tokenizer):
* ``gpu-qwen2-0.5b`` (CUDA, bf16): ANCHORS table 4, a Qwen2-0.5B-shaped policy (24 layers, d 896,
  14 heads / 2 kv heads, FFN 4864, V 151936), 64 rollouts (8 prompts x 8), prompt 256 tokens, 64
  sampled tokens each; the ranker is MiniLM-shaped in bf16.
* ``cpu-smollm2-135m`` (CPU, fp32): the SmolLM2-135M shape (30 layers, d 576, 9 / 3 heads, FFN 1536,
  V 49152, tied head) on small work: 8 rollouts (2 prompts x 4), prompt 64, 16 sampled tokens.

Parts, each its own test so the summary table shows the split (variant ``hf`` is always the plain HF
baseline, so ``summarize.py --baseline hf`` gives every ratio):
* ``test_rl_sampling``: ``ours`` = ``relsum_core.policy.sample_ids`` when it exists, else ``sample``
  (KV cache, one private generator); ``hf`` = ``generate`` (dynamic cache); ``hf_static`` =
  ``generate(cache_implementation="static")`` (compiled on CUDA; warmed up outside the timing).  All
  sample at temperature 1, no top-k / top-p, exactly ``new_tokens`` tokens per row
  (``min_new_tokens``; ours has a stop id outside the vocabulary).
* ``test_rl_reward``: ``RankerReward`` with a MiniLM-shaped random cross-encoder
  (``CrossEncoder.predict``) on one pair per rollout (bundled ESCI products; summaries are random ids
  decoded to words), plus the group advantages.  Title-only scores are cached per query, as in
  training after the first step.
* ``test_rl_update``: ``ours`` = ``completion_logprobs`` (fused LM head, no [tokens x vocab] logits)
  for the policy and, without grad, the reference; ``hf`` = full ``model(ids).logits`` ->
  log_softmax -> gather for the policy and a separate reference forward with full logits.  Both:
  the same ``grpo_loss`` (beta 0.04, k3 KL), backward, grad clipping, AdamW step.
* ``test_rl_step``: the three parts in a row, ``ours`` and ``hf`` (``hf`` = generate + the same
  reward + the HF update).

Nothing asserts a time.  extra_info: tokens/s, the sampler used, and on CUDA the peak memory of one
run above the memory before it (``peak_extra_mib``).  A GPU variant that raises (an API mismatch
in another transformers version, say) is skipped with its reason.
"""

from __future__ import annotations

import copy
import gc
import inspect
import os
import random
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from relsum_core import policy as policy_mod  # noqa: E402
from relsum_core.data import load_dataset  # noqa: E402
from relsum_core.losses import grpo_loss  # noqa: E402
from relsum_core.policy import Rollouts, completion_logprobs  # noqa: E402
from relsum_core.rewards import RankerReward, group_advantages  # noqa: E402

from conftest import device_name  # noqa: E402

CUDA = torch.cuda.is_available()
BETA, EPS_LOW, EPS_HIGH, LR = 0.04, 0.2, 0.28, 1e-6


@dataclass(frozen=True)
class Shape:
    device: str
    dtype: torch.dtype
    arch: str  # "qwen2" or "llama"
    layers: int
    d: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    products: int
    group: int
    prompt: int
    new: int
    rounds: int

    @property
    def rollouts(self) -> int:
        return self.products * self.group


SHAPES = {
    "gpu-qwen2-0.5b": Shape("cuda", torch.bfloat16, "qwen2", 24, 896, 14, 2, 4864, 151936,
                            products=8, group=8, prompt=256, new=64, rounds=5),
    "cpu-smollm2-135m": Shape("cpu", torch.float32, "llama", 30, 576, 9, 3, 1536, 49152,
                              products=2, group=4, prompt=64, new=16, rounds=1),
}


# Intra-op threads on CPU: on a shared 2-core box two OpenMP threads ran a 384-token prefill of this
# shape 10x slower than one (10.0 s against 1.1 s), so the CPU shape runs on one unless told otherwise.
CPU_THREADS = int(os.environ.get("RELSUM_BENCH_CPU_THREADS", "1"))


@pytest.fixture(autouse=True)
def _cpu_threads(request):
    shape = getattr(request.node, "callspec", None) and request.node.callspec.params.get("shape")
    if shape not in SHAPES or SHAPES[shape].device != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(n)


def _shape(name: str) -> Shape:
    s = SHAPES[name]
    if s.device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    return s


def _sync(s: Shape) -> None:
    if s.device == "cuda":
        torch.cuda.synchronize()


class IdTokenizer:
    """Stands in for the policy's tokenizer in ``sample``: prompt ``"i"`` is row i of the random prompt
    ids (no padding); ``decode`` maps ids to words of the catalog, so the ranker sees text."""

    def __init__(self, prompt_ids: torch.Tensor, words: list[str], pad_id: int):
        self.prompt_ids, self.words = prompt_ids, words
        self.pad_token_id, self.eos_token_id = pad_id, None

    def __call__(self, prompts, **_):
        from transformers import BatchEncoding

        ids = self.prompt_ids[[int(p) for p in prompts]]
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i % len(self.words)] for i in ids.tolist())


class Setup:
    """Policy, frozen reference, AdamW, ranker reward and inputs of one shape (built once)."""

    def __init__(self, name: str, s: Shape):
        from transformers import (
            AutoTokenizer,
            BertConfig,
            BertForSequenceClassification,
            LlamaConfig,
            LlamaForCausalLM,
            Qwen2Config,
            Qwen2ForCausalLM,
        )

        from relsum_core.ranker import CrossEncoder, packaged_minilm_path

        self.name, self.s = name, s
        dev = self.dev = torch.device(s.device)
        try:
            rtok = AutoTokenizer.from_pretrained(packaged_minilm_path(), local_files_only=True)
        except (FileNotFoundError, OSError) as e:
            pytest.skip(f"MiniLM tokenizer unavailable: {e}")
        # ids 0 (pad) and 1 (HF's eos, never sampled under min_new_tokens); ours stops on id V, outside
        # the vocabulary, so every variant samples exactly s.new tokens per row
        self.pad_id, self.hf_eos, self.stop_id = 0, 1, s.vocab
        common = dict(vocab_size=s.vocab, hidden_size=s.d, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, intermediate_size=s.ffn,
                      max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=self.pad_id,
                      eos_token_id=self.hf_eos)
        torch.manual_seed(0)
        if s.arch == "qwen2":
            cfg, cls = Qwen2Config(rope_theta=1e6, **common), Qwen2ForCausalLM
        else:
            cfg, cls = LlamaConfig(rope_theta=1e5, **common), LlamaForCausalLM
        cfg._attn_implementation = "sdpa"
        with torch.device(dev):
            self.policy = cls(cfg).to(s.dtype)
        self.policy.generation_config.eos_token_id = self.stop_id  # what `sample` stops on
        self.policy.generation_config.pad_token_id = self.pad_id
        self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=LR)

        torch.manual_seed(1)
        bert = BertForSequenceClassification(BertConfig(
            vocab_size=rtok.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, max_position_embeddings=512, num_labels=1)).eval()
        with torch.no_grad():
            bert.classifier.weight.normal_(0, 1.0)  # rewards that differ between rollouts
        self.ranker = CrossEncoder.from_model(bert, rtok, device=dev, dtype=s.dtype)
        catalog, judgments = load_dataset()
        self.reward = RankerReward(self.ranker.predict, catalog, judgments, tokenizer=self.ranker.tokenizer)
        judged = sorted({j.product_id for j in judgments})
        products = random.Random(0).sample(judged, s.products)
        self.pids = [p for p in products for _ in range(s.group)]
        words = sorted({w for p in judged[:400] for w in catalog[p].title.lower().split() if w.isalpha()})

        g = torch.Generator().manual_seed(2)
        B, P, T = s.rollouts, s.prompt, s.new
        self.prompt_ids = torch.randint(2, s.vocab, (B, P), generator=g)
        self.tok = IdTokenizer(self.prompt_ids, words, self.pad_id)
        self.prompt_ids_dev = self.prompt_ids.to(dev)
        self.prompt_mask_dev = torch.ones_like(self.prompt_ids_dev)
        # fixed rollouts and advantages for the update-only benchmark
        self.completion_ids = torch.randint(2, s.vocab, (B, T), generator=g).to(dev)
        self.completion_mask = torch.ones_like(self.completion_ids)
        self.adv = torch.tensor(group_advantages(torch.randn(B, generator=g).numpy(), s.group),
                                dtype=torch.float32, device=dev)
        self.sampler = "sample"

    # ------------------------------------------------------------------ sampling
    def sample_ours(self, compile_decode: bool = False):
        """(completion_ids, completion_mask, texts) from relsum's sampler."""
        s = self.s
        self.policy.eval()
        fn = getattr(policy_mod, "sample_ids", None)
        if fn is not None:
            resolve = getattr(policy_mod, "resolve_engine", None)
            self.sampler = "sample_ids" + (f"/{resolve(self.policy, 'auto')}" if resolve else "")
            kw = {"seed": 0} if "seed" in inspect.signature(fn).parameters else {}
            if compile_decode:
                kw["compile_decode"] = True
                self.sampler += "+compiled"
            out = fn(self.policy, self.prompt_ids_dev, self.prompt_mask_dev, stop_ids=[self.stop_id],
                     pad_id=self.pad_id, max_new_tokens=s.new, temperature=1.0, top_p=1.0, **kw)
            if hasattr(out, "completion_ids"):
                ids, mask = out.completion_ids, out.completion_mask
            else:
                ids, mask = out[0], out[1]
            texts = [self.tok.decode(r[m.bool()]) for r, m in zip(ids, mask)]
            return ids, mask, texts
        r = policy_mod.sample(self.policy, self.tok, [str(i) for i in range(s.rollouts)],
                              max_new_tokens=s.new,
                              temperature=1.0, top_p=1.0, seed=0)
        return r.completion_ids, r.completion_mask, r.texts

    def sample_hf(self, static: bool = False):
        s = self.s
        self.policy.eval()
        kw = {"cache_implementation": "static"} if static else {}
        out = self.policy.generate(
            input_ids=self.prompt_ids_dev, attention_mask=self.prompt_mask_dev, do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=s.new, min_new_tokens=s.new,
            eos_token_id=self.hf_eos, pad_token_id=self.pad_id, **kw)
        ids = out[:, s.prompt:]
        mask = torch.ones_like(ids)
        texts = [self.tok.decode(r) for r in ids]
        return ids, mask, texts

    # ------------------------------------------------------------------ reward
    def rewards(self, mask, texts) -> torch.Tensor:
        total = self.reward(self.pids, texts, mask.sum(1).tolist())["total"]
        return torch.tensor(group_advantages(total, self.s.group), dtype=torch.float32, device=self.dev)

    # ------------------------------------------------------------------ update
    def _step(self, logp, ref_logp, adv, mask):
        loss, _ = grpo_loss(logp, None, adv, mask, ref_logp=ref_logp, beta=BETA, epsilon_low=EPS_LOW,
                            epsilon_high=EPS_HIGH)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def update_ours(self, ids, mask, adv):
        r = Rollouts(self.prompt_ids_dev, self.prompt_mask_dev, ids, mask, [])
        with torch.no_grad():
            ref_logp = completion_logprobs(self.ref, r)
        self.policy.train()
        self._step(completion_logprobs(self.policy, r), ref_logp, adv, mask)

    def _hf_logprobs(self, model, ids, mask):
        P, T = self.s.prompt, ids.shape[1]
        full = torch.cat([self.prompt_ids_dev, ids], 1)
        attn = torch.cat([self.prompt_mask_dev, mask], 1)
        logits = model(input_ids=full, attention_mask=attn).logits  # [B, P+T, V]
        logits = logits[:, P - 1:P + T - 1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)

    def update_hf(self, ids, mask, adv):
        with torch.no_grad():
            ref_logp = self._hf_logprobs(self.ref, ids, mask)
        self.policy.train()
        self._step(self._hf_logprobs(self.policy, ids, mask), ref_logp, adv, mask)


_SETUPS: dict[str, Setup] = {}


def _setup(name: str) -> Setup:
    s = _shape(name)
    if name not in _SETUPS:
        _SETUPS[name] = Setup(name, s)
    return _SETUPS[name]


def _prepare(st: Setup, fn, variant: str, warmups: int = 1):
    """``fn`` run ``warmups`` times outside the timing; a CUDA variant that raises is skipped."""
    try:
        for _ in range(warmups):
            fn()
        _sync(st.s)
    except Exception as e:  # noqa: BLE001 - a broken peer must not fail the suite
        if st.s.device != "cuda" and variant != "hf_static":
            raise  # on CPU only the static-cache peer may be missing
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        pytest.skip(f"{variant} failed on {st.name}: {type(e).__name__}: {str(e)[:300]}")


def _run(benchmark, st: Setup, fn, *, rounds=None):
    """Time ``fn`` (already warmed up by `_prepare`), device-synchronised; the median in seconds."""
    def timed():
        out = fn()
        _sync(st.s)
        return out

    benchmark.pedantic(timed, rounds=rounds or st.s.rounds, warmup_rounds=0, iterations=1)
    return benchmark.stats.stats.median


def _peak_extra_mib(st: Setup, fn) -> float | None:
    if st.s.device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _info(benchmark, st: Setup, **kw):
    s = st.s
    info = dict(device=device_name(st.dev), dtype=str(s.dtype).removeprefix("torch."), rollouts=s.rollouts,
                prompt_tokens=s.prompt, new_tokens=s.new)
    if s.device == "cpu":
        info["threads"] = torch.get_num_threads()
    info.update({k: v for k, v in kw.items() if v is not None})
    benchmark.extra_info.update(info)


# --------------------------------------------------------------------------------------------
def _needs_cuda(st, variant: str) -> None:
    # ours_compiled: the static engine's decode step compiled (torch.compile) inside its CUDA graph
    if variant == "ours_compiled" and st.s.device != "cuda":
        pytest.skip("ours_compiled is the CUDA-graph engine; on CPU ours is the dynamic loop")


def _sampler(st, variant: str):
    return {"ours": st.sample_ours, "ours_compiled": lambda: st.sample_ours(compile_decode=True),
            "hf": st.sample_hf, "hf_static": lambda: st.sample_hf(static=True)}[variant]


@pytest.mark.parametrize("variant", ["ours", "ours_compiled", "hf", "hf_static"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rl_sampling(benchmark, shape, variant):
    st = _setup(shape)
    _needs_cuda(st, variant)
    benchmark.group = f"rl-sampling-{shape}"
    fn = _sampler(st, variant)
    # CUDA: static-cache generate compiles the forward (CUDA graphs) in its first calls, and ours may
    # capture a CUDA graph (the static engine of sample_ids)
    warmups = {"hf_static": 3, "ours": 2, "ours_compiled": 2}.get(variant, 1) if st.s.device == "cuda" else 1
    _prepare(st, fn, variant, warmups=warmups)
    med = _run(benchmark, st, fn)
    new = st.s.rollouts * st.s.new
    _info(benchmark, st, new_tokens_per_s=new / med,
          sampler=st.sampler if variant.startswith("ours") else "generate",
          peak_extra_mib=_peak_extra_mib(st, fn))


@pytest.mark.parametrize("variant", ["ours"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rl_reward(benchmark, shape, variant):
    st = _setup(shape)
    benchmark.group = f"rl-reward-{shape}"
    ids, mask = st.completion_ids, st.completion_mask
    texts = [st.tok.decode(r) for r in ids]
    fn = lambda: st.rewards(mask, texts)
    _prepare(st, fn, variant)  # also scores and caches the title-only lists
    pairs = sum(len(st.reward.by_product[p]) for p in st.pids)
    med = _run(benchmark, st, fn, rounds=max(st.s.rounds, 5))
    _info(benchmark, st, pairs=pairs, pairs_per_s=pairs / med, ranker="minilm-l6-h384 random")


@pytest.mark.parametrize("variant", ["ours", "hf"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rl_update(benchmark, shape, variant):
    st = _setup(shape)
    benchmark.group = f"rl-update-{shape}"
    upd = st.update_ours if variant == "ours" else st.update_hf
    fn = lambda: upd(st.completion_ids, st.completion_mask, st.adv)
    _prepare(st, fn, variant)
    med = _run(benchmark, st, fn)
    tokens = st.s.rollouts * (st.s.prompt + st.s.new)
    _info(benchmark, st, tokens=tokens, tokens_per_s=tokens / med, peak_extra_mib=_peak_extra_mib(st, fn))


@pytest.mark.parametrize("variant", ["ours", "ours_compiled", "hf"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_rl_step(benchmark, shape, variant):
    st = _setup(shape)
    _needs_cuda(st, variant)
    benchmark.group = f"rl-step-{shape}"
    sample = _sampler(st, variant)
    upd = st.update_hf if variant == "hf" else st.update_ours

    def fn():
        ids, mask, texts = sample()
        adv = st.rewards(mask, texts)
        upd(ids, mask, adv)

    _prepare(st, fn, variant, warmups=2 if variant == "ours_compiled" else 1)
    s = st.s
    med = _run(benchmark, st, fn, rounds=max(1, s.rounds - 2) if s.device == "cuda" else s.rounds)
    _info(benchmark, st, new_tokens_per_s=s.rollouts * s.new / med,
          sampler=st.sampler if variant.startswith("ours") else "generate",
          peak_extra_mib=_peak_extra_mib(st, fn))
