"""gelu(x @ W^T + b) as one Triton GEMM whose epilogue adds the bias and applies the exact erf GELU,
forward only.

Why: in a BERT layer the FFN up-projection writes [tokens, 4H] and the separate ``bias_gelu`` pass
reads and writes it again.  At MiniLM's shape and 60k tokens that pass moves about 0.37 GB a layer,
roughly 0.5 ms of a 6 ms H200 forward over six layers (estimated from the card's bandwidth, not
measured).  Here the [tokens, 4H] tensor is written once.
Whether a Triton GEMM loses less to cuBLAS than the pass it saves is a GPU measurement
(``benchmarks/test_bench_encoder_kernels.py::test_cuda_linear_gelu``), so the encoder uses this
only when asked (``PackedBertEncoder.fused_ffn_up``).

Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1; forward only, it raises where autograd would
want a graph), torch path (differentiable) and fp64 reference.  The accumulator, bias and GELU are
fp32; the output has x's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    as_rows,
    check_floating,
    check_forward_only,
    dot_precision,
    gemm_config,
    gemm_k_loop,
    interpreting,
    resolve_impl,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

if HAS_TRITON:

    @triton.jit
    def _linear_gelu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        # Column tiles vary fastest, so the programs in flight share a few row tiles of x in L2
        # (the whole weight, 4H x H, stays there anyway).
        pid = tl.program_id(0)
        n_tiles_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // n_tiles_n
        pid_n = pid % n_tiles_n
        # 64-bit tile bases, 32-bit offsets inside a tile (fewer registers than 64-bit ones).  Loads
        # clamp out-of-range rows/columns onto the last valid one instead of masking them (unmasked
        # loads vectorise); the store below drops them.
        r = tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        r_ld = tl.minimum(r, M - 1 - pid_m * BLOCK_M)
        c_ld = tl.minimum(c, N - 1 - pid_n * BLOCK_N)
        x_base = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
        w_base = w_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_wn
        x_ptrs = x_base + (r_ld[:, None] * stride_xm + ks[None, :])
        w_ptrs = w_base + (c_ld[None, :] * stride_wn + ks[:, None])  # a [BLOCK_K, BLOCK_N] tile of W^T
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc = gemm_k_loop(acc, x_ptrs, w_ptrs, K, BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
        rows = pid_m * BLOCK_M + r
        cols = pid_n * BLOCK_N + c
        cmask = cols < N
        z = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        out = y_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_ym + (r[:, None] * stride_ym + cols[None, :])
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & cmask[None, :])


# Tile shapes a GPU run compares (test_cuda_linear_gelu); names read m<BLOCK_M>n<BLOCK_N>k<BLOCK_K>
# w<warps>s<pipeline stages>.  All compile for sm_90 without register spills (a CI test checks);
# 128x128 tiles on 4 warps and 128x256 on 8 spill (128 accumulator registers a thread plus the GELU).
CONFIG_CANDIDATES = {
    "m128n128k64w8s3": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "m128n128k64w8s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    "m64n256k64w8s3": dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    "m64n128k64w4s4": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "m128n64k64w4s4": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    "m64n64k64w4s3": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
}
# Triton's matmul tutorial's usual Hopper pick for bf16 at these sizes; the sweep may overrule it.
DEFAULT_CONFIG = "m128n128k64w8s3"


def _config(K: int, dtype: torch.dtype) -> dict:
    return gemm_config(K, dtype, CONFIG_CANDIDATES[DEFAULT_CONFIG])


def _check_args(x, weight, bias):
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_floating(name, t)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [T, K] (or [..., K]) with K > 0, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("empty batch: x has no rows")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] (nn.Linear layout), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def linear_gelu(x, weight, bias, *, impl="auto", config: dict | None = None):
    """gelu(x @ weight^T + bias), exact erf GELU (BERT's "gelu").

    x [T, K] (or [..., K]); weight [N, K] (nn.Linear layout, x's dtype); bias [N] (any float dtype,
    read as fp32).  Returns [..., N] in x's dtype.  ``config`` overrides the Triton tile shape (one of
    ``CONFIG_CANDIDATES``' values; for tile sweeps).
    """
    _check_args(x, weight, bias)
    impl = resolve_impl(impl, x)
    if impl == "torch":
        if x.dtype == torch.float32 and bias.dtype == torch.float32:
            return F.gelu(F.linear(x, weight, bias))
        return F.gelu(F.linear(x, weight).float() + bias.float()).to(x.dtype)
    check_forward_only("linear_gelu", x, weight, bias)
    x2 = as_rows(x)
    w = as_rows(weight)
    M, K = x2.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = dict(config) if config is not None else _config(K, x.dtype)
    upcast = interpreting()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _linear_gelu_kernel[grid](
        x2, w, bias.contiguous(), y, M, N, K, x2.stride(0), w.stride(0), y.stride(0),
        EVEN_K=K % cfg["BLOCK_K"] == 0, UPCAST=upcast,
        DOT_PREC=dot_precision(upcast or x.dtype == torch.float32), **cfg,
    )
    return y.reshape(*x.shape[:-1], N)


def linear_gelu_reference(x, weight, bias):
    z = x.double() @ weight.double().t() + bias.double()
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
