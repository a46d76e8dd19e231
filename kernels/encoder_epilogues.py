"""Fused epilogues of a BERT encoder layer on packed tokens, forward only.

* ``bias_gelu``: gelu(x + bias) with the exact erf GELU (BERT's "gelu"), after the FFN up-projection.
* ``residual_layernorm``: LayerNorm(x [+ x_bias] + residual), after the attention output and the FFN
  down-projection (post-LN BERT); statistics in fp32.
* ``cls_score``: the [CLS] row of each packed sequence, BERT's pooler (dense + tanh) and a one-label
  classifier, straight to fp32 scores.

Each has a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), a torch path (CPU) and an fp64
``*_reference``.  All internal arithmetic is fp32; outputs keep the input dtype except the scores.
The Triton paths are forward only: with grad enabled and an input that requires grad they raise
(impl="torch" is differentiable).
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
    interpreting,
    resolve_impl,
)
from .varlen_attention import _check_cu_seqlens

if HAS_TRITON:
    import triton
    import triton.language as tl

# Triton residual_layernorm keeps a whole row in registers.
MAX_LN_WIDTH = 16384


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _bias_gelu_kernel(x_ptr, b_ptr, y_ptr, T, Fdim, stride_x, stride_y,
                          BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        rmask = rows < T
        cmask = cols < Fdim
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        z = x + b[None, :]
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _residual_ln_kernel(x_ptr, xb_ptr, r_ptr, w_ptr, b_ptr, y_ptr, T, H,
                            stride_x, stride_r, stride_y, eps,
                            HAS_XB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_H)
        rmask = rows < T
        cmask = cols < H
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        s = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s += tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_XB:
            s += tl.load(xb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        mean = tl.sum(s, axis=1) / H  # masked lanes hold 0
        d = tl.where(mask, s - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / H  # two-pass: no cancellation on large-mean rows
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cls_score_kernel(h_ptr, cu_ptr, pw_ptr, pb_ptr, cw_ptr, cb_ptr, part_ptr, B, H,
                          stride_h, stride_pw,
                          BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        # One program: BLOCK_B sequences x BLOCK_J pooler features.  It writes its share of each
        # score, sum_j cls_w[j] * tanh(pooler(x)[j]), into part[pid_j, seqs]; the host sums the
        # column blocks (pid_j 0 adds cls_b), which keeps small batches spread over the GPU.
        pid_b = tl.program_id(0)
        pid_j = tl.program_id(1)
        seqs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        smask = seqs < B
        tok = tl.load(cu_ptr + seqs, mask=smask, other=0).to(tl.int64)  # [CLS] = first token
        js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        jmask = js < H
        acc = tl.zeros([BLOCK_B, BLOCK_J], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            a = tl.load(h_ptr + tok[:, None] * stride_h + ks[None, :],
                        mask=smask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(pw_ptr + js[None, :].to(tl.int64) * stride_pw + ks[:, None],
                         mask=kmask[:, None] & jmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_J] = W^T
            if UPCAST:  # interpreter (bf16 dots are wrong there) or mixed hidden/weight dtypes
                a = a.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
        z = acc + tl.load(pb_ptr + js, mask=jmask, other=0.0).to(tl.float32)[None, :]
        # tanh from exp of -2|z|: never overflows (no tl.tanh across triton versions)
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(z < 0, -t, t)
        cw = tl.load(cw_ptr + js, mask=jmask, other=0.0).to(tl.float32)
        part = tl.sum(t * cw[None, :], axis=1)
        if pid_j == 0:
            part += tl.load(cb_ptr).to(tl.float32)
        tl.store(part_ptr + pid_j * B + seqs, part, mask=smask)


# --------------------------------------------------------------------------------------------
# launch configurations (GPU ones chosen to compile for sm_90 without register spills, ptxas -v)
# --------------------------------------------------------------------------------------------
def _gelu_config() -> dict:
    if interpreting():
        return dict(BLOCK_T=16, BLOCK_F=64, num_warps=4)
    return dict(BLOCK_T=16, BLOCK_F=256, num_warps=4)


def _ln_config(H: int) -> dict:
    block_h = triton.next_power_of_2(H)
    block_t = max(1, min(16, 4096 // block_h))  # ~4096 elements a program
    return dict(BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4 if block_h * block_t <= 4096 else 8)


# Launch shapes a GPU run compares with the ones above (benchmarks/test_bench_encoder_kernels.py::
# test_cuda_gelu_tiles / test_cuda_ln_tiles); all compile for sm_90 without spills (a CI test
# checks).  Both kernels are pure bandwidth: the sweep says how close to it each shape gets.
GELU_CONFIG_CANDIDATES = {
    "t32_f256_w8": dict(BLOCK_T=32, BLOCK_F=256, num_warps=8),
    "t8_f512_w4": dict(BLOCK_T=8, BLOCK_F=512, num_warps=4),
    "t64_f128_w8": dict(BLOCK_T=64, BLOCK_F=128, num_warps=8),
    "t4_f1024_w4": dict(BLOCK_T=4, BLOCK_F=1024, num_warps=4),
}
# rows a program (BLOCK_H, the padded width, is fixed by H)
LN_CONFIG_CANDIDATES = {
    "t2_w2": dict(BLOCK_T=2, num_warps=2),
    "t4_w4": dict(BLOCK_T=4, num_warps=4),
    "t16_w8": dict(BLOCK_T=16, num_warps=8),
    "t32_w8": dict(BLOCK_T=32, num_warps=8),
}


def _cls_config() -> dict:
    if interpreting():
        return dict(BLOCK_B=16, BLOCK_J=32, BLOCK_K=32, num_warps=4)
    return dict(BLOCK_B=16, BLOCK_J=64, BLOCK_K=32, num_warps=4)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_tensor(name, t, *, dims=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_floating(name, t)
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")


def _check_vector(name, t, n, device):
    _check_tensor(name, t)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


# --------------------------------------------------------------------------------------------
# bias + GELU
# --------------------------------------------------------------------------------------------
def bias_gelu(x, bias, *, impl="auto", config: dict | None = None):
    """gelu(x + bias) with the exact erf GELU.  x [T, F] (or [..., F]), bias [F]; fp32 math,
    output in x's dtype.  ``config`` overrides the Triton launch shape (tile sweeps)."""
    _check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [T, F] with F > 0, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError("empty batch: x has no rows")
    _check_vector("bias", bias, x.shape[-1], x.device)
    impl = resolve_impl(impl, x)
    if impl == "torch":
        if x.dtype == torch.float32 and bias.dtype == torch.float32:
            return F.gelu(x + bias)
        return F.gelu(x.float() + bias.float()).to(x.dtype)
    check_forward_only("bias_gelu", x, bias)
    x2 = as_rows(x)
    T, Fd = x2.shape
    y = torch.empty((T, Fd), device=x.device, dtype=x.dtype)
    cfg = {**_gelu_config(), **(config or {})}
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(Fd, cfg["BLOCK_F"]))
    _bias_gelu_kernel[grid](x2, bias.contiguous(), y, T, Fd, x2.stride(0), y.stride(0), **cfg)
    return y.reshape(x.shape)


def bias_gelu_reference(x, bias):
    z = x.double() + bias.double()
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


# --------------------------------------------------------------------------------------------
# residual + LayerNorm
# --------------------------------------------------------------------------------------------
def residual_layernorm(x, residual, weight, bias, *, eps=1e-12, impl="auto", x_bias=None,
                       config: dict | None = None):
    """LayerNorm(x [+ x_bias] + residual) over the last dim, fp32 statistics, output in x's dtype.

    x, residual [T, H] (or [..., H], one shape and dtype); weight, bias, x_bias [H] (any float
    dtype: they are read as fp32).  ``x_bias`` fuses the preceding dense layer's bias add.
    ``config`` overrides the Triton launch shape (BLOCK_T, num_warps; tile sweeps).
    """
    _check_tensor("x", x)
    _check_tensor("residual", residual)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [T, H] with H > 0, got shape {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must match x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"x ({x.dtype}) and residual ({residual.dtype}) must share a dtype")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if x.numel() == 0:
        raise ValueError("empty batch: x has no rows")
    H = x.shape[-1]
    _check_vector("weight", weight, H, x.device)
    _check_vector("bias", bias, H, x.device)
    if x_bias is not None:
        _check_vector("x_bias", x_bias, H, x.device)
    check_eps(eps)
    impl = resolve_impl(impl, x)
    if impl == "torch":
        if x.dtype == torch.float32:
            s = x + residual
            if x_bias is not None:
                s = s.add_(x_bias.float())
            return F.layer_norm(s, (H,), weight.float(), bias.float(), eps)
        s = x.float() + residual.float()
        if x_bias is not None:
            s = s.add_(x_bias.float())
        return F.layer_norm(s, (H,), weight.float(), bias.float(), eps).to(x.dtype)
    if H > MAX_LN_WIDTH:
        raise ValueError(f"impl='triton' residual_layernorm supports H <= {MAX_LN_WIDTH}, got {H}")
    check_forward_only("residual_layernorm", x, residual, weight, bias, x_bias)
    x2 = as_rows(x)
    r2 = as_rows(residual)
    T = x2.shape[0]
    y = torch.empty((T, H), device=x.device, dtype=x.dtype)
    cfg = {**_ln_config(H), **(config or {})}
    _residual_ln_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        x2, x_bias.contiguous() if x_bias is not None else x2, r2, weight.contiguous(), bias.contiguous(),
        y, T, H, x2.stride(0), r2.stride(0), y.stride(0), float(eps), HAS_XB=x_bias is not None, **cfg,
    )
    return y.reshape(x.shape)


def residual_layernorm_reference(x, residual, weight, bias, *, eps=1e-12, x_bias=None):
    s = x.double() + residual.double()
    if x_bias is not None:
        s = s + x_bias.double()
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


# --------------------------------------------------------------------------------------------
# [CLS] gather + pooler + classifier
# --------------------------------------------------------------------------------------------
def _cls_head_args(hidden, pooler_w, pooler_b, cls_w, cls_b):
    _check_tensor("hidden", hidden, dims=(2,))
    T, H = hidden.shape
    if T == 0 or H == 0:
        raise ValueError(f"hidden must be non-empty [total_tokens, H], got shape {tuple(hidden.shape)}")
    _check_tensor("pooler_w", pooler_w)
    if pooler_w.shape != (H, H):
        raise ValueError(f"pooler_w must have shape ({H}, {H}), got {tuple(pooler_w.shape)}")
    if pooler_w.device != hidden.device:
        raise ValueError(f"pooler_w is on {pooler_w.device} but hidden is on {hidden.device}")
    _check_vector("pooler_b", pooler_b, H, hidden.device)
    _check_tensor("cls_w", cls_w)
    if cls_w.shape not in ((1, H), (H,)):
        raise ValueError(f"cls_w must have shape (1, {H}) or ({H},) (one label), got {tuple(cls_w.shape)}")
    if cls_w.device != hidden.device:
        raise ValueError(f"cls_w is on {cls_w.device} but hidden is on {hidden.device}")
    if isinstance(cls_b, (int, float)) and not isinstance(cls_b, bool):
        cls_b = torch.tensor([float(cls_b)], device=hidden.device, dtype=torch.float32)
    _check_tensor("cls_b", cls_b)
    if cls_b.numel() != 1:
        raise ValueError(f"cls_b must hold one value (one label), got shape {tuple(cls_b.shape)}")
    if cls_b.device != hidden.device:
        raise ValueError(f"cls_b is on {cls_b.device} but hidden is on {hidden.device}")
    return cls_w.reshape(H), cls_b.reshape(1)


def cls_score(hidden, cu_seqlens, pooler_w, pooler_b, cls_w, cls_b, *, impl="auto"):
    """fp32 scores [batch]: cls_w . tanh(pooler_w @ hidden[cu_seqlens[b]] + pooler_b) + cls_b.

    hidden [total_tokens, H]; cu_seqlens int32 [batch + 1] (every sequence non-empty: its first
    token is the [CLS]); pooler_w [H, H] (nn.Linear layout), pooler_b [H]; cls_w [1, H] or [H];
    cls_b [1], [] or a number.  Value checks of cu_seqlens are skipped under CUDA-graph capture.
    """
    cls_w, cls_b = _cls_head_args(hidden, pooler_w, pooler_b, cls_w, cls_b)
    _check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device, allow_empty_seqs=False)
    impl = resolve_impl(impl, hidden)
    B = cu_seqlens.numel() - 1
    H = hidden.shape[1]
    if impl == "torch":
        cls = hidden[cu_seqlens[:-1].long()].float()
        pooled = torch.tanh(torch.addmm(pooler_b.float(), cls, pooler_w.float().t()))
        return pooled @ cls_w.float() + cls_b.float()
    check_forward_only("cls_score", hidden, pooler_w, pooler_b, cls_w, cls_b)
    hidden = as_rows(hidden)
    cu_seqlens = cu_seqlens.contiguous()  # the kernel reads it with unit stride; capture-safe no-op
    pooler_w = as_rows(pooler_w)
    cfg = _cls_config()
    upcast = interpreting() or hidden.dtype != pooler_w.dtype
    n_j = triton.cdiv(H, cfg["BLOCK_J"])
    part = torch.empty((n_j, B), device=hidden.device, dtype=torch.float32)
    _cls_score_kernel[(triton.cdiv(B, cfg["BLOCK_B"]), n_j)](
        hidden, cu_seqlens, pooler_w, pooler_b.contiguous(), cls_w.contiguous(), cls_b, part, B, H,
        hidden.stride(0), pooler_w.stride(0),
        UPCAST=upcast, DOT_PREC=dot_precision(upcast or hidden.dtype == torch.float32), **cfg,
    )
    return part[0] if n_j == 1 else part.sum(0)


def cls_score_reference(hidden, cu_seqlens, pooler_w, pooler_b, cls_w, cls_b):
    cls = hidden[cu_seqlens[:-1].long()].double()
    pooled = torch.tanh(cls @ pooler_w.double().t() + pooler_b.double())
    cb = cls_b.double().reshape(()) if isinstance(cls_b, torch.Tensor) else float(cls_b)
    return pooled @ cls_w.double().reshape(-1) + cb
