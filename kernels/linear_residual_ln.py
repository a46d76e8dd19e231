"""LayerNorm(x @ W^T + b + residual) as one Triton GEMM whose epilogue adds the bias and the
residual and normalises each row, forward only.

Why: a post-LN BERT layer ends twice in a dense layer of width H (attention output, FFN down),
whose [tokens, H] result the separate ``residual_layernorm`` pass reads again beside the residual
and writes once more.  At MiniLM's shape and 60k tokens that pass moves about 0.14 GB, twice a
layer (estimated from the shapes, not measured).  Here the GEMM reads the residual itself and
writes the normalised rows once.
Whether a Triton GEMM loses less to cuBLAS than the pass it saves is a GPU measurement
(``benchmarks/test_bench_encoder_kernels.py::test_cuda_linear_ln``), so the encoder uses this only
when asked (``PackedBertEncoder.fused_dense_ln``).

One program owns BLOCK_M whole rows and walks their H columns in BLOCK_N tiles, merging each tile's
row mean and squared deviations into running ones (Chan's parallel update: no cancellation on rows
with a large mean).  When one tile spans the row the rows are normalised in registers; otherwise the
unnormalised tiles are parked in the output (in its dtype, still in L2 when read back) and a second
sweep normalises them in place.  A parked value is z - shift, shift the first tile's row mean (kept
in registers), so a 16-bit output rounds the row's deviations, not its mean: the error does not grow
with the mean (two roundings to the output dtype, up to about twice the one-tile path's), and fp16
overflows only where some |z - shift| passes 65504.

Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1; forward only, it raises where autograd would
want a graph), torch path (differentiable) and fp64 reference.  Accumulator, bias, residual and
statistics are fp32; the output has x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    as_rows,
    check_eps,
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
    def _dense_residual_tile(x_base, w_ptr, b_ptr, r_base, n0, r_ld, rmask, N, K,
                             stride_xm, stride_wn, stride_rm,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """x[rows] @ W[n0:n0+BLOCK_N]^T + b + residual, fp32, and the tile's column mask."""
        c = tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        cols = n0 + c
        cmask = cols < N
        # Loads clamp out-of-range rows/columns onto the last valid one instead of masking them
        # (unmasked loads vectorise); the statistics and the store leave them out.
        c_ld = tl.minimum(cols, N - 1)
        x_ptrs = x_base + (r_ld[:, None] * stride_xm + ks[None, :])
        w_ptrs = w_ptr + (c_ld[None, :].to(tl.int64) * stride_wn + ks[:, None])  # [BLOCK_K, BLOCK_N] of W^T
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc = gemm_k_loop(acc, x_ptrs, w_ptrs, K, BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
        mask = rmask[:, None] & cmask[None, :]
        res = tl.load(r_base + (tl.arange(0, BLOCK_M)[:, None] * stride_rm + cols[None, :]), mask=mask,
                      other=0.0)
        z = acc + res.to(tl.float32) + tl.load(b_ptr + c_ld).to(tl.float32)[None, :]
        return tl.where(cmask[None, :], z, 0.0), cmask

    @triton.jit
    def _linear_residual_ln_kernel(x_ptr, w_ptr, b_ptr, r_ptr, g_ptr, beta_ptr, y_ptr, M, N, K,
                                   stride_xm, stride_wn, stride_rm, stride_ym, eps,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   ONE_TILE: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                                   DOT_PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        r = tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_N)
        rmask = r < M - pid_m * BLOCK_M
        r_ld = tl.minimum(r, M - 1 - pid_m * BLOCK_M)
        row0 = (pid_m * BLOCK_M).to(tl.int64)  # 64-bit tile bases, 32-bit offsets inside a tile
        x_base = x_ptr + row0 * stride_xm
        r_base = r_ptr + row0 * stride_rm
        y_base = y_ptr + row0 * stride_ym
        if ONE_TILE:
            z, cmask = _dense_residual_tile(x_base, w_ptr, b_ptr, r_base, 0, r_ld, rmask, N, K,
                                            stride_xm, stride_wn, stride_rm, BLOCK_M, BLOCK_N, BLOCK_K,
                                            EVEN_K, UPCAST, DOT_PREC)
            mean = tl.sum(z, axis=1) / N
            d = tl.where(cmask[None, :], z - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
            g = tl.load(g_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + c, mask=cmask, other=0.0).to(tl.float32)
            y = d * rstd[:, None] * g[None, :] + beta[None, :]
            tl.store(y_base + (r[:, None] * stride_ym + c[None, :]), y.to(y_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])
        else:
            mean = tl.zeros([BLOCK_M], tl.float32)
            m2 = tl.zeros([BLOCK_M], tl.float32)  # sum of squared deviations from the running mean
            # Tiles are parked as z - shift (shift: the first tile's row mean), so a 16-bit output
            # rounds the rows' deviations, not their mean, and does not overflow on a large mean.
            shift = tl.zeros([BLOCK_M], tl.float32)
            for n0 in range(0, N, BLOCK_N):
                z, cmask = _dense_residual_tile(x_base, w_ptr, b_ptr, r_base, n0, r_ld, rmask, N, K,
                                                stride_xm, stride_wn, stride_rm, BLOCK_M, BLOCK_N,
                                                BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
                n_new = tl.minimum(N - n0, BLOCK_N).to(tl.float32)
                n_old = n0 * 1.0  # columns merged so far
                t_mean = tl.sum(z, axis=1) / n_new
                shift = tl.where(n0 == 0, t_mean, shift)
                d = tl.where(cmask[None, :], z - t_mean[:, None], 0.0)
                delta = t_mean - mean
                mean += delta * (n_new / (n_old + n_new))
                m2 += tl.sum(d * d, axis=1) + delta * delta * (n_old * n_new / (n_old + n_new))
                cols = n0 + c
                parked = (z - shift[:, None]).to(y_ptr.dtype.element_ty)
                tl.store(y_base + (r[:, None] * stride_ym + cols[None, :]), parked,
                         mask=rmask[:, None] & cmask[None, :])
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
            mean -= shift  # the row mean of the parked values
            tl.debug_barrier()  # the parked tiles were stored by other threads of this program
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + c
                cmask = cols < N
                mask = rmask[:, None] & cmask[None, :]
                ptrs = y_base + (r[:, None] * stride_ym + cols[None, :])
                zs = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                y = (zs - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
                tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# Tile shapes a GPU run compares (test_cuda_linear_ln); names read m<BLOCK_M>n<BLOCK_N>k<BLOCK_K>
# w<warps>s<pipeline stages>.  All compile for sm_90 without register spills (a CI test checks).
# n512 spans a MiniLM row (H 384) in one tile: no parked tiles, but a quarter of its MMA columns
# are padding; n128 walks the row in three tiles.  m32 gives 6k-token reranks more programs.
CONFIG_CANDIDATES = {
    "m64n128k64w4s3": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    "m128n128k64w8s3": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    "m64n256k64w8s3": dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    "m32n128k64w4s4": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "m64n512k32w8s2": dict(BLOCK_M=64, BLOCK_N=512, BLOCK_K=32, num_warps=8, num_stages=2),
    "m32n512k64w8s2": dict(BLOCK_M=32, BLOCK_N=512, BLOCK_K=64, num_warps=8, num_stages=2),
}
DEFAULT_CONFIG = "m64n128k64w4s3"


def sweep_candidates(N: int) -> dict:
    """The candidates worth timing at width N: the n512 shapes only where one tile spans the row
    (walking 768 columns in two 512-wide tiles wastes a third of the MMA, and m64n512 spills)."""
    return {k: c for k, c in CONFIG_CANDIDATES.items() if c["BLOCK_N"] < 512 or N <= c["BLOCK_N"]}


def _config(K: int, dtype: torch.dtype) -> dict:
    return gemm_config(K, dtype, CONFIG_CANDIDATES[DEFAULT_CONFIG])


def _check_args(x, weight, bias, residual, ln_weight, ln_bias, eps):
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual),
                    ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_floating(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [T, K] (or [..., K]) with K > 0, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("empty batch: x has no rows")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] (nn.Linear layout), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    N = weight.shape[0]
    want = (*x.shape[:-1], N)
    if residual.shape != want:
        raise ValueError(f"residual must have shape {want} (x's rows, weight's N), "
                         f"got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"x ({x.dtype}) and residual ({residual.dtype}) must share a dtype")
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},), got {tuple(t.shape)}")
    check_eps(eps)


def linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, *, eps=1e-12, impl="auto",
                              config: dict | None = None):
    """LayerNorm(x @ weight^T + bias + residual) over the last dim (post-LN BERT's dense + add & norm).

    x [T, K] (or [..., K]); weight [N, K] (nn.Linear layout, x's dtype); residual [..., N] (x's
    dtype); bias, ln_weight, ln_bias [N] (any float dtype, read as fp32).  Returns [..., N] in x's
    dtype.  ``config`` overrides the Triton tile shape (one of ``CONFIG_CANDIDATES``' values; for
    tile sweeps).
    """
    _check_args(x, weight, bias, residual, ln_weight, ln_bias, eps)
    impl = resolve_impl(impl, x)
    N = weight.shape[0]
    if impl == "torch":
        if x.dtype == torch.float32:
            s = F.linear(x, weight, bias.float()) + residual
            return F.layer_norm(s, (N,), ln_weight.float(), ln_bias.float(), eps)
        s = F.linear(x, weight).float() + bias.float() + residual.float()
        return F.layer_norm(s, (N,), ln_weight.float(), ln_bias.float(), eps).to(x.dtype)
    check_forward_only("linear_residual_layernorm", x, weight, bias, residual, ln_weight, ln_bias)
    x2 = as_rows(x)
    r2 = as_rows(residual)
    w = as_rows(weight)
    M, K = x2.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = dict(config) if config is not None else _config(K, x.dtype)
    upcast = interpreting()
    _linear_residual_ln_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x2, w, bias.contiguous(), r2, ln_weight.contiguous(), ln_bias.contiguous(), y, M, N, K,
        x2.stride(0), w.stride(0), r2.stride(0), y.stride(0), float(eps),
        ONE_TILE=N <= cfg["BLOCK_N"], EVEN_K=K % cfg["BLOCK_K"] == 0, UPCAST=upcast,
        DOT_PREC=dot_precision(upcast or x.dtype == torch.float32), **cfg,
    )
    return y.reshape(*x.shape[:-1], N)


def linear_residual_layernorm_reference(x, weight, bias, residual, ln_weight, ln_bias, *, eps=1e-12):
    s = x.double() @ weight.double().t() + bias.double() + residual.double()
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps) * ln_weight.double() + ln_bias.double()
