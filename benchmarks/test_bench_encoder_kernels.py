"""Encoder kernels: relsum's varlen attention against padded SDPA and torch's varlen; the fused GEMMs.

CPU (always): the torch path of ``varlen_attention`` (length buckets, one SDPA call each) against
one SDPA call over the batch padded to its longest pair, on a small mixed-length batch.

CUDA (skipped without it): bf16, 1024 pairs of 24-96 and of 128-512 tokens at MiniLM (12 heads x 32)
and BERT-base (12 x 64): the Triton kernel, torch SDPA padded (key-padding mask, as HF sdpa runs it),
and ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10; skipped when absent); then the Triton
kernel under each tile shape of ``CONFIG_CANDIDATES`` against the one it picks today
(``test_cuda_attention_tiles``).  And the FFN up-projection with its bias+GELU: cuBLAS + the
``bias_gelu`` pass (the encoder's default) against the Triton GEMM with a fused epilogue
(``linear_gelu``) under each of its candidate tile shapes (``test_cuda_linear_gelu``); the
attention-output and FFN-down projections with their bias+residual+LayerNorm: cuBLAS + the
``residual_layernorm`` pass against the Triton GEMM with that epilogue (``linear_residual_layernorm``)
under each candidate tile shape (``test_cuda_linear_ln``); the whole FFN block at MiniLM's width:
the default path, the two fused GEMMs, and ``fused_ffn`` (one kernel, the 4H activations kept on
chip) under each candidate tile shape (``test_cuda_fused_ffn``); the
bias+GELU and residual+LayerNorm epilogues under each candidate launch shape against eager torch
(``test_cuda_gelu_tiles``, ``test_cuda_ln_tiles``, with GB/s).

The padded baselines get their padded tensors for free (an HF model is padded end to end); the
packed paths start from the packed stream.  Times land in the pytest-benchmark report; shapes and
tokens/s in ``extra_info``.  Run: ``pytest benchmarks/test_bench_encoder_kernels.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from relsum_kernels import (
    bias_gelu,
    fused_ffn,
    linear_gelu,
    linear_residual_layernorm,
    residual_layernorm,
    varlen_attention,
)
from relsum_kernels.encoder_epilogues import GELU_CONFIG_CANDIDATES, LN_CONFIG_CANDIDATES
from relsum_kernels.fused_ffn import CONFIG_CANDIDATES as FUSED_FFN_CANDIDATES
from relsum_kernels.linear_gelu import CONFIG_CANDIDATES as LINEAR_GELU_CANDIDATES
from relsum_kernels.linear_residual_ln import CONFIG_CANDIDATES as LINEAR_LN_CANDIDATES
from relsum_kernels.linear_residual_ln import sweep_candidates as linear_ln_sweep
from relsum_kernels.varlen_attention import (
    CONFIG_CANDIDATES,
    SHORT_MAX_SEQLEN,
    _triton_config,
    _triton_varlen,
)

CUDA = torch.cuda.is_available()
MODELS = {"minilm": (12, 32), "bert-base": (12, 64)}
LENGTHS = [(24, 96), (128, 512)]


@functools.lru_cache(maxsize=4)
def _batch(n_pairs, lo, hi, heads, head_dim, dtype, device, seed=0):
    """(lens, cu_seqlens, packed qkv [T, 3, heads, head_dim]), read-only, made once per shape: the
    sweeps time a dozen variants on each, and 1.5 GB of host randn costs seconds of a GPU lease."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n_pairs,), generator=g)
    cu = torch.zeros(n_pairs + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    T = int(cu[-1])
    gd = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(T, 3, heads, head_dim, generator=gd, device=device).to(dtype)
    return lens, cu.to(device), qkv


def _padded(lens, qkv, heads, head_dim):
    """[B, H, L, D] q, k, v and the [B, 1, 1, L] key mask, built outside the timed region."""
    B, L = len(lens), int(lens.max())
    dev = qkv.device
    padded = torch.zeros(B, L, 3, heads, head_dim, device=dev, dtype=qkv.dtype)
    valid = (torch.arange(L)[None, :] < lens[:, None]).to(dev)
    padded[valid] = qkv
    q, k, v = (padded[:, :, i].transpose(1, 2).contiguous() for i in range(3))
    return q, k, v, valid[:, None, None, :]


def _record(benchmark, *, method, model, lens, heads, head_dim, dtype, device):
    T = int(lens.sum())
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        method=method, model=model, device=device, dtype=str(dtype).removeprefix("torch."),
        pairs=len(lens), lengths=f"{int(lens.min())}-{int(lens.max())}", tokens=T,
        padded_tokens=len(lens) * int(lens.max()), heads=heads, head_dim=head_dim,
        tokens_per_s=T / median, median_ms=median * 1e3,
    )


# --------------------------------------------------------------------------------------------
# CPU: small mixed-length batch
# --------------------------------------------------------------------------------------------
CPU_PAIRS = 64
CPU_LENGTHS = (24, 160)


@pytest.mark.parametrize("method", ["relsum_torch_buckets", "sdpa_padded"])
def test_cpu_attention(benchmark, method):
    heads, head_dim = MODELS["minilm"]
    lens, cu, qkv = _batch(CPU_PAIRS, *CPU_LENGTHS, heads, head_dim, torch.float32, "cpu")
    max_len = int(lens.max())
    if method == "relsum_torch_buckets":
        q, k, v = qkv.unbind(1)
        fn = lambda: varlen_attention(q, k, v, cu, max_len, impl="torch")
    else:
        q, k, v, mask = _padded(lens, qkv, heads, head_dim)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    benchmark.group = "encoder-attention-cpu"
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)
    _record(benchmark, method=method, model="minilm", lens=lens, heads=heads, head_dim=head_dim,
            dtype=torch.float32, device="cpu")


# --------------------------------------------------------------------------------------------
# CUDA: 1024 pairs, bf16
# --------------------------------------------------------------------------------------------
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


CALLS_PER_ROUND = 10


def _time_cuda(benchmark, run, group: str) -> float:
    """Median seconds of one ``run`` over 12 rounds of CALLS_PER_ROUND back-to-back calls and one
    device sync, after 3 untimed calls (compiles, autotuning, allocator warm-up).  A sync per call
    would add its ~10-30 us to kernels that take a few microseconds at a 100-candidate rerank's
    size.  Back to back, a call costs the larger of its host launch and its device time, so where a
    kernel is shorter than Triton's Python launch (~10-30 us) the launch is still what is timed:
    there the CUDA-graph Reranker rows are the measure."""
    calls = [0]

    def fn():
        out = run()
        calls[0] += 1
        if calls[0] % CALLS_PER_ROUND == 0:  # the round's last call: wait for all of them
            torch.cuda.synchronize()
        return out

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    benchmark.group = group
    benchmark.pedantic(fn, rounds=12, warmup_rounds=1, iterations=CALLS_PER_ROUND)
    benchmark.extra_info["calls_per_round"] = CALLS_PER_ROUND
    return benchmark.stats.stats.median


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("method", ["relsum_triton", "sdpa_padded", "torch_varlen_attn"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_attention(benchmark, model, lengths, method):
    heads, head_dim = MODELS[model]
    dtype = torch.bfloat16
    lens, cu, qkv = _batch(1024, *lengths, heads, head_dim, dtype, "cuda")
    max_len = int(lens.max())
    q, k, v = qkv.unbind(1)
    if method == "relsum_triton":
        run = lambda: varlen_attention(q, k, v, cu, max_len, impl="triton")
    elif method == "sdpa_padded":
        qp, kp, vp, mask = _padded(lens, qkv, heads, head_dim)
        run = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    else:
        varlen_attn = _varlen_attn()
        if varlen_attn is None:
            pytest.skip("torch.nn.attention.varlen.varlen_attn needs torch >= 2.10")
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        run = lambda: varlen_attn(qc, kc, vc, cu, cu, max_len, max_len)
    _time_cuda(benchmark, run, f"encoder-attention-cuda-{model}-{lengths[0]}-{lengths[1]}")
    _record(benchmark, method=method, model=model, lens=lens, heads=heads, head_dim=head_dim,
            dtype=dtype, device=torch.cuda.get_device_name())


# FFN up-projection, x [tokens, H] @ W1^T [H, 4H] + b1 then GELU: what the encoder runs today (cuBLAS
# GEMM, then the bias_gelu pass), eager torch (cuBLAS addmm, then GELU), and the Triton GEMM with the
# bias+GELU epilogue under its default and each candidate tile shape.
FFN_SHAPES = {"minilm": (384, 1536), "bert-base": (768, 3072)}
FFN_TOKENS = {"24-96": 60788, "128-512": 327244}  # the ranker throughput rows' token counts
FFN_VARIANTS = ["cublas_bias_gelu", "cublas_addmm_gelu", "triton_default",
                *(f"triton_{name}" for name in LINEAR_GELU_CANDIDATES)]


def ffn_case(model: str, tokens: int, variant: str, device: str):
    """A callable running one FFN_VARIANTS variant on random bf16 inputs; it checks its first rows
    against the encoder's default path once, so a mis-tiled GEMM cannot post a time.  (CPU runs need
    TRITON_INTERPRET=1: tests/test_benchmark_scripts.py dry-runs every variant that way.)"""
    H, Fd = FFN_SHAPES[model]
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: 1 GB of randn is slow on a host
    x = torch.randn(tokens, H, generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn(Fd, H, generator=g, device=device) / H ** 0.5).to(torch.bfloat16)
    b = (torch.randn(Fd, generator=g, device=device) * 0.1).to(torch.bfloat16)
    if variant == "cublas_bias_gelu":
        run = lambda: bias_gelu(F.linear(x, w), b, impl="triton")
    elif variant == "cublas_addmm_gelu":
        run = lambda: F.gelu(F.linear(x, w, b))
    else:
        name = variant.removeprefix("triton_")
        cfg = None if name == "default" else LINEAR_GELU_CANDIDATES[name]
        run = lambda: linear_gelu(x, w, b, impl="triton", config=cfg)
    n = min(tokens, 4096)
    ref = bias_gelu(F.linear(x[:n], w), b, impl="triton")
    # bf16: the paths round at different points (cuBLAS rounds z before the GELU), ~1 ulp of |y| <= 6;
    # a broken GEMM is off by O(1)
    torch.testing.assert_close(run()[:n], ref, rtol=2e-2, atol=2e-2)
    return run


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", FFN_VARIANTS)
@pytest.mark.parametrize("lengths", list(FFN_TOKENS))
@pytest.mark.parametrize("model", list(FFN_SHAPES))
def test_cuda_linear_gelu(benchmark, model, lengths, variant):
    H, Fd = FFN_SHAPES[model]
    T = FFN_TOKENS[lengths]
    run = ffn_case(model, T, variant, "cuda")
    median = _time_cuda(benchmark, run, f"encoder-linear-gelu-{model}-{lengths}")
    benchmark.extra_info.update(
        method=variant, model=model, device=torch.cuda.get_device_name(), dtype="bfloat16", tokens=T,
        in_features=H, out_features=Fd, tflops=2 * T * H * Fd / median / 1e12,
        gb_per_s=2 * (T * H + H * Fd + T * Fd) / median / 1e9, median_ms=median * 1e3,
    )


# The two projections that end in add & norm (attention output: K = H; FFN down: K = 4H), N = H:
# what the encoder runs today (cuBLAS GEMM, then the residual_layernorm pass with the bias) against
# the Triton GEMM with the bias+residual+LayerNorm epilogue under its default and each candidate tile
# shape that suits the width (``sweep_candidates``), at the 24-96 throughput row's token count and at
# one 100-candidate rerank's.
DENSE_LN_PROJECTIONS = {"attn_out": 1, "ffn_down": 4}  # K as a multiple of H
# the 24-96 throughput row, and one query's 100 candidates (the latency row: fewer row tiles than
# an H100 has SMs at BLOCK_M 64, so the small-tile candidates may win there)
DENSE_LN_TOKENS = {"24-96": FFN_TOKENS["24-96"], "100cands": 6053}
DENSE_LN_VARIANTS = ["cublas_residual_ln", "triton_default", *(f"triton_{n}" for n in LINEAR_LN_CANDIDATES)]


def dense_ln_case(model: str, tokens: int, projection: str, variant: str, device: str):
    """A callable running one DENSE_LN_VARIANTS variant on random bf16 inputs, or None where the
    candidate does not suit the model's width; it checks its first rows against the encoder's default
    path once (CPU runs need TRITON_INTERPRET=1)."""
    H = FFN_SHAPES[model][0]
    K = H * DENSE_LN_PROJECTIONS[projection]
    name = variant.removeprefix("triton_")
    if name not in ("cublas_residual_ln", "default") and name not in linear_ln_sweep(H):
        return None
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, K, generator=g, device=device).to(torch.bfloat16)
    r = torch.randn(tokens, H, generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn(H, K, generator=g, device=device) / K ** 0.5).to(torch.bfloat16)
    lw = (1 + 0.1 * torch.randn(H, generator=g, device=device)).to(torch.bfloat16)  # LayerNorm-like
    b, lb = ((0.1 * torch.randn(H, generator=g, device=device)).to(torch.bfloat16) for _ in range(2))
    ref = lambda: residual_layernorm(F.linear(x, w), r, lw, lb, x_bias=b, impl="triton")
    if variant == "cublas_residual_ln":
        run = ref
    else:
        cfg = None if name == "default" else LINEAR_LN_CANDIDATES[name]
        run = lambda: linear_residual_layernorm(x, w, b, r, lw, lb, impl="triton", config=cfg)
    n = min(tokens, 4096)
    # bf16: cuBLAS rounds the product before the add & norm, the fused GEMM does not; ~1-2 ulp of
    # |y| <= 5.  A broken GEMM or statistic is off by O(1)
    torch.testing.assert_close(run()[:n].float(), ref()[:n].float(), rtol=2e-2, atol=5e-2)
    return run


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", DENSE_LN_VARIANTS)
@pytest.mark.parametrize("projection", list(DENSE_LN_PROJECTIONS))
@pytest.mark.parametrize("tokens", list(DENSE_LN_TOKENS))
@pytest.mark.parametrize("model", list(FFN_SHAPES))
def test_cuda_linear_ln(benchmark, model, tokens, projection, variant):
    H = FFN_SHAPES[model][0]
    K = H * DENSE_LN_PROJECTIONS[projection]
    T = DENSE_LN_TOKENS[tokens]
    run = dense_ln_case(model, T, projection, variant, "cuda")
    if run is None:
        pytest.skip(f"{variant} does not suit width {H} (linear_residual_ln.sweep_candidates)")
    median = _time_cuda(benchmark, run, f"encoder-linear-ln-{model}-{tokens}-{projection}")
    benchmark.extra_info.update(
        method=variant, model=model, device=torch.cuda.get_device_name(), dtype="bfloat16", tokens=T,
        in_features=K, out_features=H, tflops=2 * T * K * H / median / 1e12,
        gb_per_s=2 * (T * K + H * K + 2 * T * H) / median / 1e9, median_ms=median * 1e3,
    )


# The whole FFN block, LayerNorm(x + down(gelu(up(x)))), at MiniLM's width (the one-kernel FFN takes
# H <= 512): the encoder's default (cuBLAS, bias_gelu, cuBLAS, residual_layernorm), the two fused
# GEMMs (linear_gelu, then linear_residual_layernorm) and the one kernel under its default and each
# candidate tile shape, at the same two token counts.
FUSED_FFN_VARIANTS = ["unfused", "fused_gemms", "triton_default",
                      *(f"triton_{n}" for n in FUSED_FFN_CANDIDATES)]


def fused_ffn_case(tokens: int, variant: str, device: str):
    """A callable running one FUSED_FFN_VARIANTS variant at MiniLM's FFN shape on random bf16 inputs;
    it checks its first rows against the encoder's default path once (CPU: TRITON_INTERPRET=1)."""
    H, Fd = FFN_SHAPES["minilm"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, H, generator=g, device=device).to(torch.bfloat16)
    w1 = (torch.randn(Fd, H, generator=g, device=device) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(H, Fd, generator=g, device=device) / Fd ** 0.5).to(torch.bfloat16)
    lw = (1 + 0.1 * torch.randn(H, generator=g, device=device)).to(torch.bfloat16)  # LayerNorm-like
    b1 = (0.1 * torch.randn(Fd, generator=g, device=device)).to(torch.bfloat16)
    b2, lb = ((0.1 * torch.randn(H, generator=g, device=device)).to(torch.bfloat16) for _ in range(2))

    def ref():
        mid = bias_gelu(F.linear(x, w1), b1, impl="triton")
        return residual_layernorm(F.linear(mid, w2), x, lw, lb, x_bias=b2, impl="triton")

    if variant == "unfused":
        run = ref
    elif variant == "fused_gemms":
        run = lambda: linear_residual_layernorm(linear_gelu(x, w1, b1, impl="triton"), w2, b2, x, lw, lb,
                                                impl="triton")
    else:
        name = variant.removeprefix("triton_")
        cfg = None if name == "default" else FUSED_FFN_CANDIDATES[name]
        run = lambda: fused_ffn(x, w1, b1, w2, b2, lw, lb, impl="triton", config=cfg)
    n = min(tokens, 4096)
    # bf16: the paths round at different points (1-2 ulp of |y| <= 5); a broken kernel is off by O(1)
    torch.testing.assert_close(run()[:n].float(), ref()[:n].float(), rtol=2e-2, atol=5e-2)
    return run


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", FUSED_FFN_VARIANTS)
@pytest.mark.parametrize("tokens", list(DENSE_LN_TOKENS))
def test_cuda_fused_ffn(benchmark, tokens, variant):
    H, Fd = FFN_SHAPES["minilm"]
    T = DENSE_LN_TOKENS[tokens]
    run = fused_ffn_case(T, variant, "cuda")
    median = _time_cuda(benchmark, run, f"encoder-fused-ffn-minilm-{tokens}")
    benchmark.extra_info.update(
        method=variant, model="minilm", device=torch.cuda.get_device_name(), dtype="bfloat16", tokens=T,
        hidden=H, intermediate=Fd, tflops=4 * T * H * Fd / median / 1e12, median_ms=median * 1e3,
    )


# The two bandwidth-bound epilogues under their default launch shape and each candidate, against
# eager torch, at the 24-96 throughput row's token count: GB/s says how close to the card's memory
# bandwidth each gets.
EPILOGUE_CANDIDATES = {"gelu": GELU_CONFIG_CANDIDATES, "ln": LN_CONFIG_CANDIDATES}


def epilogue_case(model: str, tokens: int, kernel: str, variant: str, device: str):
    """(callable, bytes it moves) for ``kernel`` ("gelu" or "ln") under ``variant`` ("torch",
    "default" or a candidate's name) on random bf16 inputs; checks itself once against the default
    launch (CPU runs need TRITON_INTERPRET=1)."""
    H, Fd = FFN_SHAPES[model]
    g = torch.Generator(device=device).manual_seed(0)
    cfg = None if variant in ("torch", "default") else EPILOGUE_CANDIDATES[kernel][variant]
    if kernel == "gelu":
        x = torch.randn(tokens, Fd, generator=g, device=device).to(torch.bfloat16)
        b = torch.randn(Fd, generator=g, device=device).to(torch.bfloat16)
        ref = lambda: bias_gelu(x, b, impl="triton")
        run = (lambda: F.gelu(x + b)) if variant == "torch" else (
            lambda: bias_gelu(x, b, impl="triton", config=cfg))
        moved = 2 * x.numel() * x.element_size()
    else:
        x, r = (torch.randn(tokens, H, generator=g, device=device).to(torch.bfloat16) for _ in range(2))
        w = (1 + 0.1 * torch.randn(H, generator=g, device=device)).to(torch.bfloat16)  # LayerNorm-like
        b, xb = ((0.1 * torch.randn(H, generator=g, device=device)).to(torch.bfloat16) for _ in range(2))
        ref = lambda: residual_layernorm(x, r, w, b, x_bias=xb, impl="triton")
        run = (lambda: F.layer_norm(x + xb + r, (H,), w, b, 1e-12)) if variant == "torch" else (
            lambda: residual_layernorm(x, r, w, b, x_bias=xb, impl="triton", config=cfg))
        moved = 3 * x.numel() * x.element_size()
    # eager torch adds in bf16 before its fp32 math, ours in fp32: ~1 ulp apart; a broken launch, O(1)
    torch.testing.assert_close(run().float(), ref().float(), rtol=2e-2, atol=2e-2)
    return run, moved


def _time_epilogue(benchmark, model, kernel, variant):
    tokens = FFN_TOKENS["24-96"]
    run, moved = epilogue_case(model, tokens, kernel, variant, "cuda")
    median = _time_cuda(benchmark, run, f"encoder-epilogue-{kernel}-{model}")
    benchmark.extra_info.update(method=f"{kernel}_{variant}", model=model,
                                device=torch.cuda.get_device_name(), dtype="bfloat16", tokens=tokens,
                                gb_per_s=moved / median / 1e9, median_ms=median * 1e3)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", ["torch", "default", *GELU_CONFIG_CANDIDATES])
@pytest.mark.parametrize("model", list(FFN_SHAPES))
def test_cuda_gelu_tiles(benchmark, model, variant):
    _time_epilogue(benchmark, model, "gelu", variant)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", ["torch", "default", *LN_CONFIG_CANDIDATES])
@pytest.mark.parametrize("model", list(FFN_SHAPES))
def test_cuda_ln_tiles(benchmark, model, variant):
    _time_epilogue(benchmark, model, "ln", variant)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", ["default", *CONFIG_CANDIDATES])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda r: f"{r[0]}-{r[1]}")
@pytest.mark.parametrize("model", list(MODELS))
def test_cuda_attention_tiles(benchmark, model, lengths, variant):
    """The Triton kernel under each candidate tile shape (``default`` = what ``_triton_config``
    picks today), so one GPU run says which tiling each shape wants."""
    heads, head_dim = MODELS[model]
    dtype = torch.bfloat16
    lens, cu, qkv = _batch(1024, *lengths, heads, head_dim, dtype, "cuda")
    max_len = int(lens.max())
    q, k, v = qkv.unbind(1)
    cfg = None if variant == "default" else CONFIG_CANDIDATES[variant]
    if cfg and cfg.get("SHORT") and max_len > SHORT_MAX_SEQLEN:
        pytest.skip(f"the one-key-tile kernel takes max_seqlen <= {SHORT_MAX_SEQLEN}")
    ref = varlen_attention(q, k, v, cu, max_len, impl="triton")
    run = lambda: _triton_varlen(q, k, v, cu, max_len, head_dim ** -0.5, config=cfg)
    torch.testing.assert_close(run(), ref, rtol=0, atol=2e-2)  # bf16 output: a mis-tiled kernel is far off
    chosen = _triton_config(max_len, head_dim, dtype)
    _time_cuda(benchmark, run, f"encoder-attention-tiles-{model}-{lengths[0]}-{lengths[1]}")
    _record(benchmark, method=f"tiles_{variant}", model=model, lens=lens, heads=heads, head_dim=head_dim,
            dtype=dtype, device=torch.cuda.get_device_name())
    benchmark.extra_info.update(
        tiles=variant if cfg else f"default (BLOCK_M {chosen['BLOCK_M']}, BLOCK_N {chosen['BLOCK_N']}, "
                                 f"{chosen['num_warps']} warps)")
