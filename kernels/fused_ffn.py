"""A post-LN BERT feed-forward block as one Triton kernel, forward only:

    LayerNorm(x + gelu(x @ W1^T + b1) @ W2^T + b2)

Why: unfused, the [tokens, 4H] activation is written by the up-projection and read by the
down-projection (twice more with a separate bias+GELU pass), and the block's output is read again
by the residual+LayerNorm pass.  At MiniLM's shape and 60k tokens that is about 0.4-0.8 GB a layer
(estimated from the shapes, not measured).  Here each program keeps its rows' 4H activations on
chip, BLOCK_I columns at a time: up-project, GELU, and fold them straight into the down-projection's
accumulator, so the kernel reads x once and writes the normalised rows once.
The down-projection's accumulator spans the whole row (it feeds the LayerNorm), as up to four
tiles of at most 128 columns in registers: H <= 512 (MiniLM-class encoders; BERT-base takes the
two-GEMM path).
Whether this beats cuBLAS plus the passes it removes is a GPU measurement
(``benchmarks/test_bench_encoder_kernels.py::test_cuda_fused_ffn``), so the encoder uses it only
when asked (``PackedBertEncoder.fused_ffn``).

The GELU output is rounded to x's dtype before the down-projection, as the unfused path stores it.
Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1; forward only, it raises where autograd would
want a graph), torch path (differentiable) and fp64 reference.  Accumulators, biases and statistics
are fp32; the output has x's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    as_rows,
    check_eps,
    check_floating,
    check_forward_only,
    dot_precision,
    gemm_k_loop,
    interpreting,
    resolve_impl,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

# The down-projection's row accumulator: up to MAX_CHUNKS register tiles of at most 128 columns.
MAX_CHUNKS = 4
MAX_HIDDEN = 128 * MAX_CHUNKS

if HAS_TRITON:

    @triton.jit
    def _down_chunk(acc, u, w2_ptr, i0, c0, H, I, stride_w2, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """acc + u @ W2[c0:c0+BLOCK_H, i0:i0+BLOCK_I]^T (out-of-range columns read clamped, dropped later)."""
        hs = tl.minimum(c0 + tl.arange(0, BLOCK_H), H - 1)
        js = i0 + tl.arange(0, BLOCK_I)
        w = tl.load(w2_ptr + (hs[None, :].to(tl.int64) * stride_w2 + js[:, None]), mask=(js < I)[:, None],
                    other=0.0)  # [BLOCK_I, BLOCK_H] of W2^T
        if UPCAST:
            w = w.to(tl.float32)
        return tl.dot(u, w, acc, input_precision=DOT_PREC)

    @triton.jit
    def _row_part(acc, x_base, b2_ptr, c0, r, rmask, H, stride_xm, BLOCK_H: tl.constexpr):
        """The chunk's pre-norm values (acc + b2 + residual x), zero outside the row, and its mask."""
        cols = c0 + tl.arange(0, BLOCK_H)
        cmask = cols < H
        res = tl.load(x_base + (r[:, None] * stride_xm + cols[None, :]), mask=rmask[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
        z = acc + res + tl.load(b2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        return tl.where(cmask[None, :], z, 0.0), cmask

    @triton.jit
    def _store_normed(z, cmask, mean, rstd, g_ptr, beta_ptr, y_base, c0, r, rmask, stride_ym,
                      BLOCK_H: tl.constexpr):
        cols = c0 + tl.arange(0, BLOCK_H)
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = (z - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
        tl.store(y_base + (r[:, None] * stride_ym + cols[None, :]), y.to(y_base.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _fused_ffn_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, g_ptr, beta_ptr, y_ptr, M, H, I,
                          stride_xm, stride_w1, stride_w2, stride_ym, eps,
                          BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_H: tl.constexpr, N_CHUNKS: tl.constexpr, EVEN_K: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        r = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        ii = tl.arange(0, BLOCK_I)
        rmask = r < M - pid_m * BLOCK_M
        r_ld = tl.minimum(r, M - 1 - pid_m * BLOCK_M)  # clamped rows: unmasked loads, dropped at the store
        row0 = (pid_m * BLOCK_M).to(tl.int64)  # 64-bit tile bases, 32-bit offsets inside a tile
        x_base = x_ptr + row0 * stride_xm
        y_base = y_ptr + row0 * stride_ym
        acc0 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        acc3 = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
        for i0 in range(0, I, BLOCK_I):
            # up-projection of BLOCK_I intermediate features for the program's rows
            js = tl.minimum(i0 + ii, I - 1)
            x_ptrs = x_base + (r_ld[:, None] * stride_xm + ks[None, :])
            # a [BLOCK_K, BLOCK_I] tile of W1^T
            w_ptrs = w1_ptr + (js[None, :].to(tl.int64) * stride_w1 + ks[:, None])
            u = tl.zeros([BLOCK_M, BLOCK_I], tl.float32)
            u = gemm_k_loop(u, x_ptrs, w_ptrs, H, BLOCK_K, EVEN_K, UPCAST, DOT_PREC)
            u += tl.load(b1_ptr + js).to(tl.float32)[None, :]
            u = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
            u = u.to(x_ptr.dtype.element_ty)  # what the unfused path stores; the MMA's operand type
            if UPCAST:
                u = u.to(tl.float32)
            # ...folded into the down-projection (W2's columns past I read as 0)
            acc0 = _down_chunk(acc0, u, w2_ptr, i0, 0, H, I, stride_w2, BLOCK_I, BLOCK_H, UPCAST, DOT_PREC)
            if N_CHUNKS > 1:
                acc1 = _down_chunk(acc1, u, w2_ptr, i0, BLOCK_H, H, I, stride_w2, BLOCK_I, BLOCK_H, UPCAST,
                                   DOT_PREC)
            if N_CHUNKS > 2:
                acc2 = _down_chunk(acc2, u, w2_ptr, i0, 2 * BLOCK_H, H, I, stride_w2, BLOCK_I, BLOCK_H,
                                   UPCAST, DOT_PREC)
            if N_CHUNKS > 3:
                acc3 = _down_chunk(acc3, u, w2_ptr, i0, 3 * BLOCK_H, H, I, stride_w2, BLOCK_I, BLOCK_H,
                                   UPCAST, DOT_PREC)
        # + b2 + residual, then LayerNorm over the row's chunks (two-pass statistics in registers)
        z0, m0 = _row_part(acc0, x_base, b2_ptr, 0, r, rmask, H, stride_xm, BLOCK_H)
        total = tl.sum(z0, axis=1)
        z1, m1 = _row_part(acc1, x_base, b2_ptr, BLOCK_H, r, rmask, H, stride_xm, BLOCK_H)
        z2, m2 = _row_part(acc2, x_base, b2_ptr, 2 * BLOCK_H, r, rmask, H, stride_xm, BLOCK_H)
        z3, m3 = _row_part(acc3, x_base, b2_ptr, 3 * BLOCK_H, r, rmask, H, stride_xm, BLOCK_H)
        if N_CHUNKS > 1:
            total += tl.sum(z1, axis=1)
        if N_CHUNKS > 2:
            total += tl.sum(z2, axis=1)
        if N_CHUNKS > 3:
            total += tl.sum(z3, axis=1)
        mean = total / H
        d0 = tl.where(m0[None, :], z0 - mean[:, None], 0.0)
        sq = tl.sum(d0 * d0, axis=1)
        if N_CHUNKS > 1:
            d1 = tl.where(m1[None, :], z1 - mean[:, None], 0.0)
            sq += tl.sum(d1 * d1, axis=1)
        if N_CHUNKS > 2:
            d2 = tl.where(m2[None, :], z2 - mean[:, None], 0.0)
            sq += tl.sum(d2 * d2, axis=1)
        if N_CHUNKS > 3:
            d3 = tl.where(m3[None, :], z3 - mean[:, None], 0.0)
            sq += tl.sum(d3 * d3, axis=1)
        rstd = 1.0 / tl.sqrt(sq / H + eps)
        _store_normed(z0, m0, mean, rstd, g_ptr, beta_ptr, y_base, 0, r, rmask, stride_ym, BLOCK_H)
        if N_CHUNKS > 1:
            _store_normed(z1, m1, mean, rstd, g_ptr, beta_ptr, y_base, BLOCK_H, r, rmask, stride_ym, BLOCK_H)
        if N_CHUNKS > 2:
            _store_normed(z2, m2, mean, rstd, g_ptr, beta_ptr, y_base, 2 * BLOCK_H, r, rmask, stride_ym,
                          BLOCK_H)
        if N_CHUNKS > 3:
            _store_normed(z3, m3, mean, rstd, g_ptr, beta_ptr, y_base, 3 * BLOCK_H, r, rmask, stride_ym,
                          BLOCK_H)


# Tile shapes a GPU run compares (test_cuda_fused_ffn); names read m<BLOCK_M>i<BLOCK_I>k<BLOCK_K>
# w<warps>s<pipeline stages>.  All compile for sm_90 at H 384 and 512 without register spills (a CI
# test checks); one program holds a [BLOCK_M, H] fp32 accumulator, so 8 warps (4 spill at 64 rows).
CONFIG_CANDIDATES = {
    "m64i64k64w8s2": dict(BLOCK_M=64, BLOCK_I=64, BLOCK_K=64, num_warps=8, num_stages=2),
    "m64i64k64w8s3": dict(BLOCK_M=64, BLOCK_I=64, BLOCK_K=64, num_warps=8, num_stages=3),
    "m64i32k64w8s2": dict(BLOCK_M=64, BLOCK_I=32, BLOCK_K=64, num_warps=8, num_stages=2),
    "m64i64k128w8s2": dict(BLOCK_M=64, BLOCK_I=64, BLOCK_K=128, num_warps=8, num_stages=2),
    # twice the programs for a 6k-token rerank (96 row tiles of 64 leave a third of an H100 idle);
    # mma.sync, not wgmma, below 64 rows
    "m32i64k64w8s2": dict(BLOCK_M=32, BLOCK_I=64, BLOCK_K=64, num_warps=8, num_stages=2),
}
DEFAULT_CONFIG = "m64i64k64w8s2"


def _chunk_width(H: int) -> int:
    """Columns a row tile of the down-projection spans: the fewest power-of-two widths <= 128 whose
    MAX_CHUNKS tiles cover H (384 -> 3 x 128; 100 -> 4 x 32)."""
    return min(128, max(16, triton.next_power_of_2(triton.cdiv(H, MAX_CHUNKS))))


def _config(H: int, dtype: torch.dtype) -> dict:
    if interpreting():
        cfg = dict(BLOCK_M=16, BLOCK_I=32, BLOCK_K=16, num_warps=4, num_stages=1)
    elif dtype == torch.float32:
        # ieee fp32 dots run on FMA units, operands in registers: small tiles, 8 warps to share the
        # row accumulator (no spills, ptxas -v)
        cfg = dict(BLOCK_M=16, BLOCK_I=16, BLOCK_K=32, num_warps=8, num_stages=1)
    else:
        cfg = dict(CONFIG_CANDIDATES[DEFAULT_CONFIG])
    if H < cfg["BLOCK_K"]:
        cfg["BLOCK_K"] = max(16, triton.next_power_of_2(H))
    return cfg


def _check_args(x, w1, b1, w2, b2, ln_weight, ln_bias, eps):
    named = (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("ln_weight", ln_weight),
             ("ln_bias", ln_bias))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_floating(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [T, H] (or [..., H]) with H > 0, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("empty batch: x has no rows")
    H = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != H or w1.shape[0] == 0:
        raise ValueError(f"w1 must be [I, {H}] (nn.Linear layout), got {tuple(w1.shape)}")
    inter = w1.shape[0]
    if w2.shape != (H, inter):
        raise ValueError(f"w2 must have shape ({H}, {inter}) (nn.Linear layout), got {tuple(w2.shape)}")
    for name, t in (("w1", w1), ("w2", w2)):
        if t.dtype != x.dtype:
            raise TypeError(f"x ({x.dtype}) and {name} ({t.dtype}) must share a dtype")
    vectors = (("b1", b1, inter), ("b2", b2, H), ("ln_weight", ln_weight, H), ("ln_bias", ln_bias, H))
    for name, t, n in vectors:
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    check_eps(eps)


def fused_ffn(x, w1, b1, w2, b2, ln_weight, ln_bias, *, eps=1e-12, impl="auto", config: dict | None = None):
    """LayerNorm(x + gelu(x @ w1^T + b1) @ w2^T + b2), exact erf GELU (BERT's output block).

    x [T, H] (or [..., H]; also the residual); w1 [I, H], w2 [H, I] (nn.Linear layouts, x's dtype);
    b1 [I], b2, ln_weight, ln_bias [H] (any float dtype, read as fp32).  Returns [..., H] in x's
    dtype.  impl="triton" takes H <= ``MAX_HIDDEN`` (512).  ``config`` overrides the Triton tile
    shape (one of ``CONFIG_CANDIDATES``' values; for tile sweeps).
    """
    _check_args(x, w1, b1, w2, b2, ln_weight, ln_bias, eps)
    impl = resolve_impl(impl, x)
    H = x.shape[-1]
    if impl == "torch":
        if x.dtype == torch.float32:
            u = F.gelu(F.linear(x, w1, b1.float()))
            s = F.linear(u, w2, b2.float()) + x
            return F.layer_norm(s, (H,), ln_weight.float(), ln_bias.float(), eps)
        u = F.gelu(F.linear(x, w1).float() + b1.float()).to(x.dtype)
        s = F.linear(u, w2).float() + b2.float() + x.float()
        return F.layer_norm(s, (H,), ln_weight.float(), ln_bias.float(), eps).to(x.dtype)
    if H > MAX_HIDDEN:
        raise ValueError(f"impl='triton' fused_ffn keeps a row in registers: H <= {MAX_HIDDEN}, got {H}")
    check_forward_only("fused_ffn", x, w1, b1, w2, b2, ln_weight, ln_bias)
    x2 = as_rows(x)
    w1c = as_rows(w1)
    w2c = as_rows(w2)
    M = x2.shape[0]
    inter = w1.shape[0]
    y = torch.empty((M, H), device=x.device, dtype=x.dtype)
    cfg = dict(config) if config is not None else _config(H, x.dtype)
    block_h = cfg.pop("BLOCK_H", None) or _chunk_width(H)
    if triton.cdiv(H, block_h) > MAX_CHUNKS:
        raise ValueError(f"BLOCK_H {block_h} needs {triton.cdiv(H, block_h)} row tiles for H {H}; "
                         f"the kernel holds {MAX_CHUNKS}")
    upcast = interpreting()
    _fused_ffn_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
        x2, w1c, b1.contiguous(), w2c, b2.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), y,
        M, H, inter, x2.stride(0), w1c.stride(0), w2c.stride(0), y.stride(0), float(eps),
        BLOCK_H=block_h, N_CHUNKS=triton.cdiv(H, block_h), EVEN_K=H % cfg["BLOCK_K"] == 0, UPCAST=upcast,
        DOT_PREC=dot_precision(upcast or x.dtype == torch.float32), **cfg,
    )
    return y.reshape(x.shape)


def fused_ffn_reference(x, w1, b1, w2, b2, ln_weight, ln_bias, *, eps=1e-12):
    z = x.double() @ w1.double().t() + b1.double()
    u = 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    s = u @ w2.double().t() + b2.double() + x.double()
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps) * ln_weight.double() + ln_bias.double()
