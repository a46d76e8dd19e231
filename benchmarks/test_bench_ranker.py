"""Cross-encoder scoring: relsum's packed ``CrossEncoder`` / ``Reranker`` against Hugging Face and peers.

CPU (always): MiniLM shape (6 layers, hidden 384, 12 heads, FFN 1536, random weights), a mixed-length
set of 256 pairs of 24-96 tokens and 64 pairs of 128-512 tokens, shuffled.  Every variant starts from
the texts (tokenising included): ours is ``CrossEncoder.predict``; HF ``BertForSequenceClassification``
runs micro-batches of 128 pairs, eager padded, sdpa padded, and sdpa on length-sorted batches.  And
table 3 in small: one query against 20 and 100 candidates of 24-96 tokens from token ids, ours through
``Reranker.score_encoded`` (ids as lists and as arrays) against HF eager / sdpa on one padded batch
(``test_cpu_rerank_latency``; no strong-peer row, torch's varlen_attn is CUDA-only).

CUDA (skipped without it), bf16, ANCHORS.md table 2 / 2b / 3 shapes, every variant from token ids
(tokenising is not timed, as in the anchors):
* throughput, 1024 pairs, lengths 24-96 and 128-512, MiniLM-L6-H384 and BERT-base: ours (one packed
  stream, Triton kernels) as ``relsum`` (``score_packed`` from host token ids: staging them in one
  pinned buffer and its host-to-device copy are timed), ``relsum_device`` (the packed forward from
  ids already on the device, as every other variant here runs) and ``relsum_tuned`` (the same with
  the kernel candidates on: the FFN block as one Triton kernel where H <= 512 (else its up-projection
  as the Triton linear+GELU GEMM), the attention-output (and FFN-down) projections as the Triton
  linear+residual+LayerNorm GEMM, and the attention tiles named by RELSUM_BENCH_ATTENTION, default
  ``short_m64_h4_w4``; see ``TUNED``);
  HF eager / sdpa padded / sdpa length-sorted (micro-batches of 128); the strong peer (packed
  tokens, ``torch.nn.attention.varlen.varlen_attn``, ``torch.compile`` of the rest) eager and
  compiled, and the same with flash-attn's ``flash_attn_varlen_func`` when installed;
* latency, one query with 100 / 1000 candidates: ours through ``Reranker.score_encoded`` (shape
  buckets + CUDA graphs; host packing, the bucket layout and the host-to-device copy are timed),
  from token ids as Python lists and (``relsum_reranker_arrays``) as int64 arrays (and
  ``relsum_reranker_tuned``: lists, graphs captured with the ``TUNED`` kernels), HF
  eager / sdpa with the candidates in one padded batch and the strong peer on a packed batch, both
  already on the device (their input building is not timed, so the comparison favours them).

Nothing here asserts a time; scores of ours are checked against HF so a broken path cannot post a
number.  Pairs/s, tokens/s and the padded token count go to ``benchmark.extra_info``.
Run: ``pytest benchmarks/test_bench_ranker.py --benchmark-columns=median,rounds``.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification  # noqa: E402

from relsum_core.ranker import CrossEncoder, PackedBatch, Reranker, packaged_minilm_path, padded_pairs  # noqa: E402
from relsum_kernels.varlen_attention import CONFIG_CANDIDATES as ATTENTION_CANDIDATES  # noqa: E402

CUDA = torch.cuda.is_available()
SHAPES = {
    "minilm-l6-h384": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                           intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072),
}
MICRO_BATCH = 128
CPU_ROUNDS = int(os.environ.get("RELSUM_BENCH_CPU_ROUNDS", "1"))


def _tokenizer():
    try:
        return AutoTokenizer.from_pretrained(packaged_minilm_path())
    except FileNotFoundError as e:
        pytest.skip(str(e))


# Random weights at BERT's own 0.02 init give MiniLM scores that barely depend on the input (their
# spread, std ~0.005, is about bf16's rounding): a path that skips the FFN or reorders the scores
# moved them by 0.01, inside any bf16 tolerance.  At 0.05 the spread is ~0.08 (MiniLM) to ~0.14
# (BERT-base), bf16 moves scores by ~15% of it and those breaks by 2-9x it (CPU, 16 pairs).  Times do
# not depend on the values.
INIT_RANGE = 0.05


def _model(shape: str, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, num_labels=1,
                     initializer_range=INIT_RANGE, **SHAPES[shape])
    return BertForSequenceClassification(cfg).eval()


def assert_scores_close(got, ref, *, bf16: bool) -> None:
    """Checked before a variant is timed, so a mis-wired path cannot post a number: bf16 within half
    the reference scores' spread (see INIT_RANGE), fp32 within 1e-3."""
    ref = np.asarray(ref, dtype=np.float64)
    atol = 0.5 * float(ref.std()) if bf16 else 1e-3
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), ref, rtol=0, atol=atol)


def _single_token_words(tok, n=2000) -> list[str]:
    """Lower-case words that the tokenizer keeps as one token, so a text of k words is k tokens."""
    cands = sorted(w for w in tok.get_vocab() if w.isalpha() and w.islower() and 3 <= len(w) <= 8)[: 4 * n]
    ids = tok(cands, add_special_tokens=False)["input_ids"]
    return [w for w, i in zip(cands, ids) if len(i) == 1][:n]


def make_pairs(tok, spec: list[tuple[int, int, int]], seed: int = 0) -> list[tuple[str, str]]:
    """``spec``: (count, lo, hi) groups; each pair is lo..hi tokens with specials, query 2-8 tokens."""
    words = _single_token_words(tok)
    rng = random.Random(seed)
    pairs = []
    for count, lo, hi in spec:
        for _ in range(count):
            total = rng.randint(lo, hi) - 3
            nq = rng.randint(2, min(8, total))
            q = " ".join(rng.choice(words) for _ in range(nq))
            d = " ".join(rng.choice(words) for _ in range(total - nq))
            pairs.append((q, d))
    rng.shuffle(pairs)
    return pairs


def _record(benchmark, *, method, shape, n_pairs, tokens, padded_tokens=None, device, dtype, source):
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        method=method, model=shape, device=device, dtype=str(dtype).removeprefix("torch."), timed_from=source,
        pairs=n_pairs, tokens=tokens, padded_tokens=padded_tokens if padded_tokens is not None else tokens,
        pairs_per_s=n_pairs / median, tokens_per_s=tokens / median, median_ms=median * 1e3,
    )


def _hf_batches(tok, pairs, *, sort: bool):
    idx = list(range(len(pairs)))
    if sort:
        lens = [len(x) for x in tok([q for q, _ in pairs], [d for _, d in pairs])["input_ids"]]
        idx.sort(key=lambda i: lens[i])
    return [idx[i:i + MICRO_BATCH] for i in range(0, len(idx), MICRO_BATCH)]


# --------------------------------------------------------------------------------------------
# CPU: small mixed-length set, from text
# --------------------------------------------------------------------------------------------
CPU_SPEC = [(256, 24, 96), (64, 128, 512)]
CPU_VARIANTS = ["relsum_packed", "hf_eager_padded", "hf_sdpa_padded", "hf_sdpa_sorted",
                "relsum_packed_bf16", "hf_sdpa_sorted_bf16"]  # bf16: CPUs with bf16 dot products


@pytest.fixture(scope="module")
def cpu_setup():
    tok = _tokenizer()
    model = _model("minilm-l6-h384")
    pairs = make_pairs(tok, CPU_SPEC)
    ce = CrossEncoder.from_model(model, tok, device="cpu", dtype=torch.float32)
    enc = ce.encode_pairs(pairs)
    tokens = sum(len(ids) for ids, _ in enc)
    with torch.inference_mode():  # the reference every variant's scores are checked against
        ref = ce.score_encoded(enc[:8])
    return tok, model, ce, pairs, tokens, ref


@pytest.mark.parametrize("method", CPU_VARIANTS)
def test_cpu_throughput_mixed(benchmark, cpu_setup, request, method):
    tok, model, ce, pairs, tokens, ref = cpu_setup
    bf16 = method.endswith("_bf16")
    if bf16:
        model, ce = request.getfixturevalue("cpu_bf16")
        method = method.removesuffix("_bf16")
    padded = tokens
    if method == "relsum_packed":
        run = lambda: ce.predict(pairs, batch_size=MICRO_BATCH)
    else:
        attn = "eager" if method == "hf_eager_padded" else "sdpa"
        batches = _hf_batches(tok, pairs, sort=method == "hf_sdpa_sorted")
        enc_all = tok([q for q, _ in pairs], [d for _, d in pairs])["input_ids"]
        padded = sum(len(b) * max(len(enc_all[i]) for i in b) for b in batches)

        def run():
            model.set_attn_implementation(attn)
            out = np.empty(len(pairs), dtype=np.float32)
            with torch.inference_mode():
                for b in batches:
                    enc = tok([pairs[i][0] for i in b], [pairs[i][1] for i in b], padding=True,
                              truncation=True, max_length=512, return_tensors="pt")
                    out[b] = model(**enc).logits[:, 0].float().numpy()
            return out

    benchmark.group = "ranker-cpu-minilm-mixed"
    scores = benchmark.pedantic(run, rounds=CPU_ROUNDS, warmup_rounds=0, iterations=1)
    assert_scores_close(scores[:8], ref, bf16=bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    _record(benchmark, method=method + ("_bf16" if bf16 else ""), shape="minilm-l6-h384", n_pairs=len(pairs),
            tokens=tokens, padded_tokens=padded, device="cpu", dtype=dtype, source="text")


def _latency_case(tok, ce, hf, row, method, dev):
    """(encoded pairs, callable) for one query against ``row`` = (n, lo, hi) candidates: ours through
    ``Reranker.score_encoded``, the others on one padded (or packed) batch already on ``dev``."""
    n, lo, hi = row
    pairs = make_pairs(tok, [(n, lo, hi)], seed=2)
    enc = ce.encode_pairs([(pairs[0][0], d) for _, d in pairs])  # one query against n candidates
    if method.startswith("relsum_reranker"):
        rr = Reranker(ce)
        # _arrays: token ids held as int64 arrays (a serving cache), so packing skips the Python ints
        ids = [(np.asarray(x, dtype=np.int64), nf) for x, nf in enc] if method.endswith("arrays") else enc
        return enc, lambda: rr.score_encoded(ids)
    # One padded batch of all candidates, as the anchors time HF.
    return enc, _gpu_fn(method, ce, hf, enc, lambda sort: [list(range(n))], dev=dev)


# Table 3 in small: one query against N candidates, from token ids, fp32 (and bf16: twice the GEMM
# rate on CPUs with AVX512-BF16 or AMX, such as the project's).  The strong peer has no CPU row:
# torch's varlen_attn is CUDA-only.
CPU_LATENCY_ROWS = [(20, 24, 96), (100, 24, 96)]
CPU_LATENCY_VARIANTS = ["relsum_reranker", "relsum_reranker_arrays", "hf_eager_padded", "hf_sdpa_padded",
                        "relsum_reranker_bf16", "hf_sdpa_padded_bf16"]


@pytest.fixture(scope="module")
def cpu_bf16(cpu_setup):
    """bf16 copies of the CPU model and its CrossEncoder (the fp32 ones are left as they are)."""
    import copy

    tok, model, *_ = cpu_setup
    hf = copy.deepcopy(model).to(torch.bfloat16)
    return hf, CrossEncoder.from_model(hf, tok)


@pytest.mark.parametrize("method", CPU_LATENCY_VARIANTS)
@pytest.mark.parametrize("row", CPU_LATENCY_ROWS, ids=lambda r: f"{r[0]}cands-{r[1]}-{r[2]}")
def test_cpu_rerank_latency(benchmark, cpu_setup, request, row, method):
    tok, model, ce, *_ = cpu_setup
    n, lo, hi = row
    bf16 = method.endswith("_bf16")
    hf, ce_run = request.getfixturevalue("cpu_bf16") if bf16 else (model, ce)
    enc, run = _latency_case(tok, ce_run, hf, row, method.removesuffix("_bf16"), "cpu")
    lens = [len(ids) for ids, _ in enc]
    ref = ce.score_encoded(enc)  # fp32
    assert_scores_close(run(), ref, bf16=bf16)
    benchmark.group = f"ranker-cpu-latency-minilm-{n}cands-{lo}-{hi}"
    rounds = max(5, CPU_ROUNDS)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    # Page faults: fresh memory for big transient tensors costs ~1.4 us a page, which malloc settings
    # (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_) or tcmalloc remove (results/cpu-xeon-amx/README.md).
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (rounds + 1)
    _record(benchmark, method=method, shape="minilm-l6-h384", n_pairs=n, tokens=sum(lens),
            padded_tokens=n * max(lens) if method.startswith("hf_") else None, device="cpu",
            dtype=torch.bfloat16 if bf16 else torch.float32, source="token ids")
    benchmark.extra_info["page_faults_per_call"] = round(faults)


# Serving traffic: nearly every query has a new total token count.  oneDNN builds its bf16 kernels
# per shape, so the exact-shape path pays that build (and keeps its memory) on each query; the
# bucket layout meets a bounded set of shapes.  Each round scores a fresh 100-candidate query.
DISTINCT_ROUNDS = int(os.environ.get("RELSUM_BENCH_DISTINCT_ROUNDS", "30"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["exact", "buckets"])
def test_cpu_rerank_latency_distinct_queries(benchmark, cpu_setup, request, layout, dtype):
    tok, model, ce, *_ = cpu_setup
    if dtype == "bf16":
        _, ce = request.getfixturevalue("cpu_bf16")
    n, lo, hi = CPU_LATENCY_ROWS[-1]
    rr = Reranker(ce, use_buckets=layout == "buckets")
    cases = []
    for i in range(DISTINCT_ROUNDS + 1):
        pairs = make_pairs(tok, [(n, lo, hi)], seed=1000 + i)
        cases.append(ce.encode_pairs([(pairs[0][0], d) for _, d in pairs]))
    assert_scores_close(rr.score_encoded(cases[0][:8]), ce.score_encoded(cases[0][:8]), bf16=dtype == "bf16")
    rounds = iter(cases)
    rss = _rss_mib()
    benchmark.group = f"ranker-cpu-latency-minilm-{n}cands-{lo}-{hi}-distinct-queries"
    benchmark.pedantic(rr.score_encoded, setup=lambda: ((next(rounds),), {}), rounds=DISTINCT_ROUNDS,
                       warmup_rounds=1, iterations=1)
    _record(benchmark, method=f"relsum_reranker_{layout}_{dtype}", shape="minilm-l6-h384", n_pairs=n,
            tokens=round(np.mean([sum(len(ids) for ids, _ in c) for c in cases])), device="cpu",
            dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, source="token ids")
    benchmark.extra_info["rss_growth_mib"] = round(_rss_mib() - rss)


# --------------------------------------------------------------------------------------------
# CUDA: the strong peer of ANCHORS table 2b
# --------------------------------------------------------------------------------------------
class StrongPeer(torch.nn.Module):
    """Padding-free BERT in plain PyTorch: packed tokens, a varlen attention op, everything else
    torch ops (meant to be wrapped in ``torch.compile``).  Reads the HF model's weights."""

    def __init__(self, hf: BertForSequenceClassification, attention="torch_varlen"):
        super().__init__()
        self.hf = hf
        cfg = hf.config
        self.h, self.d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        if callable(attention):  # (q, k, v, cu_seqlens, max_seqlen) -> out, e.g. for a CPU dry run
            self.attn = attention
        elif attention == "torch_varlen":
            from torch.nn.attention.varlen import varlen_attn

            self.attn = lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m)
        else:
            from flash_attn import flash_attn_varlen_func

            self.attn = lambda q, k, v, cu, m: flash_attn_varlen_func(q, k, v, cu, cu, m, m)

    def forward(self, ids, types, pos, cu, max_seqlen: int):
        bert = self.hf.bert
        e = bert.embeddings
        x = e.word_embeddings(ids) + e.token_type_embeddings(types) + e.position_embeddings(pos)
        x = e.LayerNorm(x)
        T = x.shape[0]
        for layer in bert.encoder.layer:
            a = layer.attention.self
            q = a.query(x).view(T, self.h, self.d)
            k = a.key(x).view(T, self.h, self.d)
            v = a.value(x).view(T, self.h, self.d)
            ctx = self.attn(q, k, v, cu, max_seqlen).reshape(T, -1)
            x = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + x)
            x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
        cls = x[cu[:-1].long()]
        return self.hf.classifier(torch.tanh(bert.pooler.dense(cls))).float().squeeze(-1)


_PEERS: dict = {}


def _peer(hf, method):
    """The strong-peer module for ``method`` (one per model, so torch.compile compiles it once), or a skip."""
    key = (id(hf), method)
    if key not in _PEERS:
        _PEERS[key] = _build_peer(hf, method)
    return _PEERS[key]


def _build_peer(hf, method):
    if "flash_attn" in method:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            pytest.skip("flash-attn is not installed")
        peer = StrongPeer(hf, "flash_attn")
    else:
        try:
            peer = StrongPeer(hf, "torch_varlen")
        except ImportError:
            pytest.skip("torch.nn.attention.varlen.varlen_attn needs torch >= 2.10")
    return torch.compile(peer, dynamic=True) if method.endswith("compile") else peer


def _device_batch(enc, device):
    b = PackedBatch(enc)
    return (b.input_ids.to(device), b.token_type_ids.to(device), b.position_ids.to(device),
            b.cu_seqlens.to(device), b.max_seqlen)


def _padded_batches(enc, idx_batches, device):
    return [(b, *(t.to(device) for t in padded_pairs([enc[i] for i in b]))) for b in idx_batches]


GPU_VARIANTS = ["relsum", "relsum_device", "relsum_tuned", "hf_eager_padded", "hf_sdpa_padded",
                "hf_sdpa_sorted", "peer_varlen_attn_eager", "peer_varlen_attn_compile",
                "peer_flash_attn_compile"]


def _gpu_fn(method, ce, hf, enc, batches_of, dev="cuda"):
    """A callable scoring ``enc`` with ``method``; returns fp32 scores on the host.  Inputs go to the
    device here, untimed, except for ``relsum``, which copies host ids each call."""
    dev = torch.device(dev)
    n = len(enc)
    if method == "relsum":
        batch = PackedBatch(enc)  # host token ids; score_packed copies them over each run
        return lambda: ce.score_packed(batch).float().cpu().numpy()
    if method in ("relsum_device", "relsum_tuned"):
        args = _device_batch(enc, dev)  # made outside inference mode: cu_seqlens' host copy is cached

        @torch.inference_mode()
        def run_device():
            with _kernel_choices(ce, tuned=method == "relsum_tuned"):
                return ce.encoder(*args).float().cpu().numpy()

        return run_device
    if method.startswith("hf_"):
        attn = "eager" if "eager" in method else "sdpa"
        padded = _padded_batches(enc, batches_of(sort="sorted" in method), dev)

        @torch.inference_mode()
        def run():
            hf.set_attn_implementation(attn)  # the model is shared between variants
            out = torch.empty(n, device=dev)
            for b, ids, tt, mask in padded:
                out[b] = hf(input_ids=ids, token_type_ids=tt, attention_mask=mask).logits[:, 0].float()
            return out.cpu().numpy()

        return run
    peer = _peer(hf, method)
    args = _device_batch(enc, dev)

    @torch.inference_mode()
    def run():
        return peer(*args).cpu().numpy()

    return run


# The kernel candidates the GPU sweeps time one by one, switched on together for an end-to-end
# number: the FFN as one kernel (fused_ffn; where H > 512, the FFN up-projection as the fused
# linear+GELU GEMM instead), the add & norm projections as the fused linear+residual+LayerNorm GEMM
# and one attention tile candidate.
TUNED_ATTENTION = os.environ.get("RELSUM_BENCH_ATTENTION", "short_m64_h4_w4")
TUNED = dict(fused_ffn=True, fused_ffn_up=True, fused_dense_ln=True,
             attention_config=ATTENTION_CANDIDATES[TUNED_ATTENTION])
TUNED_LABEL = f"fused_ffn (H <= 512) or fused_ffn_up, fused_dense_ln, attention {TUNED_ATTENTION}"


@contextlib.contextmanager
def _kernel_choices(ce, tuned: bool):
    """The encoder with the ``TUNED`` kernels (tuned) or its defaults; the model is shared between
    variants, so the choices are put back."""
    enc = ce.encoder
    before = {k: getattr(enc, k) for k in TUNED}
    if tuned:
        for k, v in TUNED.items():
            setattr(enc, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(enc, k, v)


@pytest.fixture(scope="module")
def gpu_models():
    if not CUDA:
        pytest.skip("needs CUDA")
    tok = _tokenizer()
    out = {}
    for shape in SHAPES:
        hf = _model(shape).to("cuda", torch.bfloat16)
        out[shape] = (tok, hf, CrossEncoder.from_model(hf, tok))
    return out


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method", GPU_VARIANTS)
@pytest.mark.parametrize("lengths", [(24, 96), (128, 512)], ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_throughput_1024(benchmark, gpu_models, shape, lengths, method):
    tok, hf, ce = gpu_models[shape]
    enc = ce.encode_pairs(make_pairs(tok, [(1024, *lengths)], seed=1))
    lens = [len(ids) for ids, _ in enc]

    def batches_of(sort):
        idx = sorted(range(len(enc)), key=lambda i: lens[i]) if sort else list(range(len(enc)))
        return [idx[i:i + MICRO_BATCH] for i in range(0, len(idx), MICRO_BATCH)]

    # No outer inference_mode: each variant enters its own (ours must create cu_seqlens outside it).
    run = _gpu_fn(method, ce, hf, enc, batches_of)
    ref = None
    if method != "hf_sdpa_padded":
        ref = _gpu_fn("hf_sdpa_padded", ce, hf, enc[:16], lambda sort: [list(range(16))])()
    for _ in range(3):  # compile / autotune / allocator warm-up
        scores = run()
    torch.cuda.synchronize()
    if ref is not None:
        assert_scores_close(scores[:16], ref, bf16=True)
    benchmark.group = f"ranker-cuda-throughput-{shape}-{lengths[0]}-{lengths[1]}"
    benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)  # HF eager BERT 128-512: 0.6 s a round
    padded = None
    if method.startswith("hf_"):
        padded = sum(len(b) * max(lens[i] for i in b) for b in batches_of("sorted" in method))
    _record(benchmark, method=method, shape=shape, n_pairs=len(enc), tokens=sum(lens), padded_tokens=padded,
            device=torch.cuda.get_device_name(), dtype=torch.bfloat16, source="token ids")
    if method.endswith("tuned"):
        benchmark.extra_info["kernels"] = TUNED_LABEL


LATENCY_ROWS = [(100, 24, 96), (100, 128, 512), (1000, 24, 96)]
LATENCY_VARIANTS = ["relsum_reranker", "relsum_reranker_arrays", "relsum_reranker_tuned",
                    "hf_eager_padded", "hf_sdpa_padded", "peer_varlen_attn_compile",
                    "peer_flash_attn_compile"]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method", LATENCY_VARIANTS)
@pytest.mark.parametrize("row", LATENCY_ROWS, ids=lambda r: f"{r[0]}cands-{r[1]}-{r[2]}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_rerank_latency(benchmark, gpu_models, shape, row, method):
    tok, hf, ce = gpu_models[shape]
    n, lo, hi = row
    enc, run = _latency_case(tok, ce, hf, row, method, "cuda")
    lens = [len(ids) for ids, _ in enc]
    ref = _gpu_fn("relsum", ce, hf, enc, None)() if method.startswith("relsum_reranker") else None
    # _tuned: the candidate kernels stay on while timed (the Reranker recaptures on a change)
    with _kernel_choices(ce, tuned=method.endswith("tuned")):
        for _ in range(3):  # the Reranker captures its bucket's graph here
            scores = run()
        torch.cuda.synchronize()
        if ref is not None:
            assert_scores_close(scores, ref, bf16=True)
        benchmark.group = f"ranker-cuda-latency-{shape}-{n}cands-{lo}-{hi}"
        benchmark.pedantic(run, rounds=50, warmup_rounds=5, iterations=1)
    _record(benchmark, method=method, shape=shape, n_pairs=n, tokens=sum(lens),
            padded_tokens=n * max(lens) if method.startswith("hf_") else None,
            device=torch.cuda.get_device_name(), dtype=torch.bfloat16, source="token ids")
    if method.endswith("tuned"):
        benchmark.extra_info["kernels"] = TUNED_LABEL


def test_cpu_dry_run_of_gpu_variants():
    """The CUDA variants' wiring (padded HF batches with token types, the strong peer's forward) checked
    on CPU against ours, so a GPU session cannot time a mis-built baseline."""
    from relsum_kernels import varlen_attention

    tok = _tokenizer()
    torch.manual_seed(0)
    hf = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=128,
                                                  num_labels=1)).eval()
    with torch.no_grad():
        hf.classifier.weight.normal_()
    ce = CrossEncoder.from_model(hf, tok)
    enc = ce.encode_pairs(make_pairs(tok, [(20, 24, 96), (4, 128, 300)], seed=1))
    lens = [len(ids) for ids, _ in enc]

    def batches_of(sort):
        idx = sorted(range(len(enc)), key=lambda i: lens[i]) if sort else list(range(len(enc)))
        return [idx[i:i + 8] for i in range(0, len(idx), 8)]

    ours = _gpu_fn("relsum", ce, hf, enc, batches_of, dev="cpu")()
    assert np.ptp(ours) > 1e-3
    for method in ("relsum_device", "relsum_tuned", "hf_eager_padded", "hf_sdpa_padded",
                   "hf_sdpa_sorted"):
        np.testing.assert_allclose(_gpu_fn(method, ce, hf, enc, batches_of, dev="cpu")(), ours, atol=1e-5)
    peer = StrongPeer(hf, lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, m))
    with torch.inference_mode():
        np.testing.assert_allclose(peer(*_device_batch(enc, "cpu")).numpy(), ours, atol=1e-5)
