"""Bidirectional attention over a packed (varlen) token stream, forward only.

Sequences of different lengths sit back to back in one stream of ``total_tokens`` rows; sequence b
owns rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (the flash-attention varlen convention).  Each token
attends to every token of its own sequence and to nothing else:

    out[t, h] = softmax_j(scale * q[t, h] . k[j, h]) v[j, h]      over j in seq(t)

Two implementations:

* Triton (CUDA, or CPU under TRITON_INTERPRET=1): one program per (sequence, head, query tile),
  flash-style online softmax over the key tiles of that sequence, fp32 accumulation.  No padding
  is ever materialised; programs whose query tile lies past their sequence's end exit at once.
* torch: sequences sorted by length and grouped into a few length buckets; each bucket is padded
  to its own longest sequence and goes through one ``scaled_dot_product_attention`` call with a
  key-padding mask, and the rows are scattered back.  Used on CPU.

``varlen_attention_reference`` is the plain per-sequence fp64 softmax the tests hold both to.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, check_floating, check_forward_only, dot_precision, interpreting, resolve_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_HEAD_DIM = 128
# torch path: a bucket longer than (shortest + max(slack, shortest * ratio)) starts a new bucket,
# which bounds the padding to ~25% while keeping the number of SDPA calls small (~7 for 24..512).
BUCKET_RATIO = 0.25
BUCKET_SLACK = 8
# torch path: elements of B * H * L * L one SDPA call may cover, in case a backend materialises scores.
TORCH_SCORE_ELEMS = 1 << 25

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _attn_key_tile(acc, l_i, m_i, q, k_base, v_base, n0, seqlen, offs_n, offs_d, d_mask,
                       stride_kt, stride_vt, qk_scale, MASK_KEYS: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PREC: tl.constexpr):
        """One online-softmax step over keys n0 .. n0 + BLOCK_N of the program's sequence."""
        cols = n0 + offs_n
        if MASK_KEYS:
            n_mask = cols < seqlen
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=d_mask[:, None] & n_mask[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=d_mask[:, None],
                         other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=d_mask[None, :],
                        other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASK_KEYS:
            # the tile holds at least one real key (n0 < seqlen), so rows never go all -inf
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        # tensor cores take p in the value dtype; accumulation stays fp32
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        return acc, l_i, m_new

    @triton.jit
    def _varlen_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr,
        n_heads, head_dim, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_TAIL: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # Axis 0 is (sequence, head): it may exceed 65535, which only axis 0 allows.
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        start32 = tl.load(cu_ptr + b).to(tl.int32)
        seqlen = tl.load(cu_ptr + b + 1).to(tl.int32) - start32
        m0 = pid_m * BLOCK_M
        if m0 >= seqlen:  # the grid is sized for max_seqlen; shorter sequences need fewer tiles
            return
        start = start32.to(tl.int64)  # row offsets times strides can pass 2**31 on big streams

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < seqlen
        d_mask = offs_d < head_dim

        q_base = q_ptr + start * stride_qt + h * stride_qh
        k_base = k_ptr + start * stride_kt + h * stride_kh
        v_base = v_ptr + start * stride_vt + h * stride_vh
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 dots wrongly: do them in fp32 there
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if SPLIT_TAIL:
            # Full key tiles need no key mask; only a ragged last one does (a select a score less).
            n_full = seqlen - seqlen % BLOCK_N
            for n0 in range(0, n_full, BLOCK_N):
                acc, l_i, m_i = _attn_key_tile(acc, l_i, m_i, q, k_base, v_base, n0, seqlen, offs_n, offs_d,
                                               d_mask, stride_kt, stride_vt, qk_scale, False, UPCAST,
                                               DOT_PREC)
            if n_full < seqlen:
                acc, l_i, m_i = _attn_key_tile(acc, l_i, m_i, q, k_base, v_base, n_full, seqlen, offs_n,
                                               offs_d, d_mask, stride_kt, stride_vt, qk_scale, True, UPCAST,
                                               DOT_PREC)
        else:  # one loop body: fp32 FMA dots at head_dim 64 spill with two
            for n0 in range(0, seqlen, BLOCK_N):
                acc, l_i, m_i = _attn_key_tile(acc, l_i, m_i, q, k_base, v_base, n0, seqlen, offs_n, offs_d,
                                               d_mask, stride_kt, stride_vt, qk_scale, True, UPCAST, DOT_PREC)
        acc = acc / l_i[:, None]
        o_base = o_ptr + start * stride_ot + h * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


    @triton.jit
    def _varlen_attn_short_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr,
        head_dim, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # Batches whose longest sequence fits one key tile (max_seqlen <= BLOCK_N): a plain softmax
        # over that tile, no online rescaling.  A program takes HEADS heads of one query tile in a
        # loop the pipeliner can overlap (the next head's loads under this head's math): short
        # sequences leave the one-head-a-program kernel waiting on memory with little work to hide it.
        b = tl.program_id(0)
        h0 = tl.program_id(1) * HEADS
        m0 = tl.program_id(2) * BLOCK_M
        start32 = tl.load(cu_ptr + b).to(tl.int32)
        seqlen = tl.load(cu_ptr + b + 1).to(tl.int32) - start32
        if m0 >= seqlen:
            return
        start = start32.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < seqlen
        n_mask = offs_n < seqlen
        d_mask = offs_d < head_dim
        q_off = offs_m[:, None] * stride_qt + offs_d[None, :]
        kt_off = offs_n[None, :] * stride_kt + offs_d[:, None]
        v_off = offs_n[:, None] * stride_vt + offs_d[None, :]
        o_off = offs_m[:, None] * stride_ot + offs_d[None, :]
        for hh in range(HEADS):
            h = h0 + hh
            q = tl.load(q_ptr + start * stride_qt + h * stride_qh + q_off,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            kt = tl.load(k_ptr + start * stride_kt + h * stride_kh + kt_off,
                         mask=d_mask[:, None] & n_mask[None, :], other=0.0)
            v = tl.load(v_ptr + start * stride_vt + h * stride_vh + v_off,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PREC)
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
            p = tl.exp2(s - tl.max(s, axis=1)[:, None])
            l_i = tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) / l_i[:, None]
            tl.store(o_ptr + start * stride_ot + h * stride_oh + o_off, acc.to(o_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & d_mask[None, :])


# Tile shapes for 16-bit inputs that a GPU run should time against the choice _triton_config makes
# (benchmarks/test_bench_encoder_kernels.py sweeps them; all compile for sm_90 without spills).
# Short sequences (24-96 tokens) leave most of a 64-row tile empty, so smaller tiles are candidates.
# "short_*": the one-key-tile kernel (batches with max_seqlen <= SHORT_MAX_SEQLEN; BLOCK_N is then the
# padded max_seqlen), HEADS heads a program.
CONFIG_CANDIDATES = {
    "m32_n32_w2": dict(BLOCK_M=32, BLOCK_N=32, num_warps=2, num_stages=2),
    "m32_n64_w4": dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    "m64_n32_w4": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    "m64_n64_w4": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "m128_n32_w4": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2),
    "m128_n64_w8": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    # the 16-bit defaults with every key tile masked, as before the ragged tile was split off (the
    # H200 numbers in benchmarks/results/gpu-h200 are from that kernel)
    "m64_n64_w4_masked": dict(BLOCK_M=64, BLOCK_N=64, SPLIT_TAIL=False, num_warps=4, num_stages=2),
    "m128_n64_w8_masked": dict(BLOCK_M=128, BLOCK_N=64, SPLIT_TAIL=False, num_warps=8, num_stages=2),
    "short_m64_h1_w4": dict(SHORT=True, HEADS=1, BLOCK_M=64, num_warps=4, num_stages=2),
    "short_m64_h4_w4": dict(SHORT=True, HEADS=4, BLOCK_M=64, num_warps=4, num_stages=2),
    "short_m64_h4_w4_s1": dict(SHORT=True, HEADS=4, BLOCK_M=64, num_warps=4, num_stages=1),
    "short_m64_h12_w4": dict(SHORT=True, HEADS=12, BLOCK_M=64, num_warps=4, num_stages=3),
    "short_m128_h4_w8": dict(SHORT=True, HEADS=4, BLOCK_M=128, num_warps=8, num_stages=2),
    "short_m32_h4_w2": dict(SHORT=True, HEADS=4, BLOCK_M=32, num_warps=2, num_stages=2),
}
# The one-key-tile kernel holds a [BLOCK_M, max_seqlen] score tile in registers.
SHORT_MAX_SEQLEN = 128
_CONFIG_INTS = ("BLOCK_M", "BLOCK_N", "HEADS", "num_warps", "num_stages")
_CONFIG_FLAGS = ("SPLIT_TAIL", "SHORT")


def resolve_config(config) -> dict | None:
    """A tile override as ``varlen_attention(config=...)`` takes it: None, a ``CONFIG_CANDIDATES``
    name, or a dict of some of its keys.  Checked here, on the host: a misspelt key or a tile Triton
    cannot build would otherwise be ignored or fail inside the kernel's compile."""
    if config is None:
        return None
    if isinstance(config, str):
        if config not in CONFIG_CANDIDATES:
            raise ValueError(f"unknown attention config {config!r}; choose one of "
                             f"{sorted(CONFIG_CANDIDATES)}")
        return dict(CONFIG_CANDIDATES[config])
    if not isinstance(config, dict):
        raise TypeError(f"an attention config is None, a CONFIG_CANDIDATES name or a dict, got "
                        f"{type(config).__name__}")
    unknown = sorted(set(config) - set(_CONFIG_INTS) - set(_CONFIG_FLAGS))
    if unknown:
        raise ValueError(f"unknown attention config keys {unknown}; allowed: "
                         f"{sorted(_CONFIG_INTS + _CONFIG_FLAGS)}")
    for key in _CONFIG_INTS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"attention config {key} must be a positive int, got {value!r}")
        if key in ("BLOCK_M", "BLOCK_N") and (value < 16 or value & (value - 1)):
            raise ValueError(f"attention config {key} must be a power of two >= 16 (a tl.dot tile), "
                             f"got {value}")
        if key == "num_warps" and value & (value - 1):
            raise ValueError(f"attention config num_warps must be a power of two, got {value}")
    for key in _CONFIG_FLAGS:
        if key in config and not isinstance(config[key], bool):
            raise ValueError(f"attention config {key} must be True or False, got {config[key]!r}")
    # each kernel takes only its own keys (a stray keyword fails inside Triton's launch on a GPU)
    own = {"HEADS"} if config.get("SHORT") else {"BLOCK_N", "SPLIT_TAIL"}
    foreign = sorted((set(config) & {"HEADS", "BLOCK_N", "SPLIT_TAIL"}) - own)
    if foreign:
        kernel = "the one-key-tile (SHORT=True) kernel" if config.get("SHORT") else "the tiled kernel"
        raise ValueError(f"attention config keys {foreign} do not apply to {kernel}")
    return dict(config)


def _triton_config(max_seqlen: int, head_dim: int, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreting():  # small tiles keep the interpreter quick and exercise tile edges
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d, SPLIT_TAIL=True, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # ieee fp32 dots run on FMA units; 32x32 tiles are the largest that compile for sm_90 without
        # register spills at head_dim 32..128 (ptxas -v, as launched: aligned strides), on 8 warps
        # (on 4 warps head_dim 64 spills 12 bytes), and only with one loop body.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, SPLIT_TAIL=False, num_warps=8, num_stages=2)
    block_m = 128 if (max_seqlen >= 256 and head_dim <= 64) else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d, SPLIT_TAIL=True,
                num_warps=4 if block_m == 64 else 8, num_stages=2)


def _triton_varlen(q, k, v, cu_seqlens, max_seqlen, scale, config: dict | None = None):
    """``config``: tile shape override (BLOCK_M, BLOCK_N, num_warps, num_stages; SHORT=True with
    HEADS picks the one-key-tile kernel, for batches it can hold: others keep the default tiles)."""
    T, H, D = q.shape
    batch = cu_seqlens.numel() - 1
    # The kernels read cu_seqlens with unit stride; a no-op (capture-safe) when it already has one.
    cu_seqlens = cu_seqlens.contiguous()
    out = torch.empty((T, H, D), device=q.device, dtype=q.dtype)
    cfg = _triton_config(max_seqlen, D, q.dtype)
    if config is not None and not (config.get("SHORT") and max_seqlen > SHORT_MAX_SEQLEN):
        cfg.update(config)
    upcast = interpreting()
    if cfg.pop("SHORT", False):
        return _triton_varlen_short(q, k, v, out, cu_seqlens, max_seqlen, scale, cfg, upcast)
    grid = (batch * H, triton.cdiv(max_seqlen, cfg["BLOCK_M"]))
    _varlen_attn_fwd_kernel[grid](
        q, k, v, out, cu_seqlens,
        H, D, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        UPCAST=upcast, DOT_PREC=dot_precision(upcast or q.dtype == torch.float32), **cfg,
    )
    return out


def _triton_varlen_short(q, k, v, out, cu_seqlens, max_seqlen, scale, cfg, upcast):
    """The one-key-tile kernel (max_seqlen <= SHORT_MAX_SEQLEN); ``cfg``: BLOCK_M, BLOCK_D, HEADS,
    num_warps, num_stages (BLOCK_N is the padded max_seqlen)."""
    if max_seqlen > SHORT_MAX_SEQLEN:
        raise ValueError(f"the short-sequence kernel takes max_seqlen <= {SHORT_MAX_SEQLEN}, "
                         f"got {max_seqlen}")
    _, H, D = q.shape
    cfg.pop("SPLIT_TAIL", None)  # one key tile: nothing to split
    heads = cfg.pop("HEADS", 1)
    heads = max(d for d in range(1, min(heads, H) + 1) if H % d == 0)  # a divisor of H: no head masks
    cfg.pop("BLOCK_N", None)
    block_n = max(16, triton.next_power_of_2(max_seqlen))
    grid = (cu_seqlens.numel() - 1, H // heads, triton.cdiv(max_seqlen, cfg["BLOCK_M"]))
    _varlen_attn_short_kernel[grid](
        q, k, v, out, cu_seqlens, D, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        HEADS=heads, BLOCK_N=block_n, UPCAST=upcast,
        DOT_PREC=dot_precision(upcast or q.dtype == torch.float32), **cfg,
    )
    return out


# --------------------------------------------------------------------------------------------
# torch path: length buckets, one SDPA call each
# --------------------------------------------------------------------------------------------
def _length_buckets(sorted_lens: list[int]) -> list[tuple[int, int]]:
    """[i0, i1) ranges over ascending lengths, each padded to its last (longest) length."""
    out = []
    i0 = 0
    n = len(sorted_lens)
    while i0 < n:
        limit = sorted_lens[i0] + max(BUCKET_SLACK, int(sorted_lens[i0] * BUCKET_RATIO))
        i1 = i0 + 1
        while i1 < n and sorted_lens[i1] <= limit:
            i1 += 1
        out.append((i0, i1))
        i0 = i1
    return out


def _fused_qkv_rows(q, k, v):
    """[T, 3*H*D] view when q, k, v are the three slices of one packed QKV projection, else None.

    Only without autograd: the view is taken from q, so a backward through it would give k and v
    (and the key/value weights behind them) no gradient at all."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    T, H, D = q.shape
    hd = H * D
    if not (q.stride() == k.stride() == v.stride() and q.stride(1) == D and q.stride(2) == 1):
        return None
    step = hd * q.element_size()
    if k.data_ptr() - q.data_ptr() != step or v.data_ptr() - k.data_ptr() != step or q.stride(0) != 3 * hd:
        return None
    base = q.untyped_storage().data_ptr()
    if k.untyped_storage().data_ptr() != base or v.untyped_storage().data_ptr() != base:
        return None
    return q.as_strided((T, 3 * hd), (3 * hd, 1))


def _bucket_plan(cu_host: list[int], H: int, device) -> tuple[torch.Tensor, list[tuple]]:
    """All gather rows (one index_select serves every bucket) and, per SDPA call, (B, L, offset
    into the gathered rows, scatter rows [B*L] (T = dump row), key mask or None)."""
    T = cu_host[-1]
    cu = torch.tensor(cu_host, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    lens_sorted, order = torch.sort(lens, stable=True)
    starts_sorted = cu[:-1][order]
    lens_list = lens_sorted.tolist()
    first = next((i for i, n in enumerate(lens_list) if n > 0), len(lens_list))  # skip empty sequences
    plan = []
    gathers = []
    offset = 0
    for i0, i1 in _length_buckets(lens_list[first:]):
        i0 += first
        i1 += first
        L = lens_list[i1 - 1]
        uniform = lens_list[i0] == L
        step = max(1, TORCH_SCORE_ELEMS // (H * L * L))
        for c0 in range(i0, i1, step):
            c1 = min(i1, c0 + step)
            ln = lens_sorted[c0:c1]
            st = starts_sorted[c0:c1]
            ar = torch.arange(L)
            valid = ar[None, :] < ln[:, None]
            # Padded slots read their sequence's first row (any real row works, the mask hides it)
            # and write to the dump row.
            rows_in = st[:, None] + ar[None, :]
            idx = torch.where(valid, rows_in, st[:, None]).reshape(-1)
            dst = idx if uniform else torch.where(valid, rows_in, T).reshape(-1)
            mask = None if uniform else valid.to(device)[:, None, None, :]
            gathers.append(idx)
            plan.append((c1 - c0, L, offset, dst.to(device), mask))
            offset += idx.numel()
    return torch.cat(gathers).to(device), plan


# The last plan, keyed by the host offsets (compared by value: a few microseconds): every layer of
# one encoder forward reuses it.
_PLAN_CACHE: tuple = (None, None, None)


def _cached_plan(cu_host: list[int], H: int, device) -> tuple[torch.Tensor, list[tuple]]:
    global _PLAN_CACHE
    key, key_hd, plan = _PLAN_CACHE
    # Index tensors made under inference_mode cannot be saved for a backward: one plan per mode.
    mode = (H, device, torch.is_inference_mode_enabled())
    if key_hd == mode and key == cu_host:
        return plan
    plan = _bucket_plan(cu_host, H, device)
    _PLAN_CACHE = (list(cu_host), mode, plan)
    return plan


def _torch_varlen(q, k, v, cu_host: list[int], scale):
    T, H, D = q.shape
    dev = q.device
    # Row gathers use index_select on [T, H*D] views: several times faster than advanced indexing.
    qkv = _fused_qkv_rows(q, k, v)
    rows = None if qkv is not None else [t.reshape(T, H * D) for t in (q, k, v)]
    # Row T is a dump for the padded slots, so each bucket scatters back with one index_copy_.
    out = torch.empty((T + 1, H * D), device=dev, dtype=q.dtype)
    # CPU half SDPA is slow and loose; compute there in fp32 and round once at the end.
    cdt = torch.float32 if (dev.type == "cpu" and q.dtype == torch.float16) else q.dtype
    # One gather for all buckets (each parallel op costs a thread hand-off on CPU); bucket slices
    # of the gathered rows are views.
    idx_all, plan = _cached_plan(cu_host, H, dev)
    if qkv is not None:
        gathered = qkv.index_select(0, idx_all).to(cdt)
    else:
        gathered = [r.index_select(0, idx_all).to(cdt) for r in rows]
    for B, L, off, dst, mask in plan:
        n = B * L
        if qkv is not None:
            g = gathered[off:off + n].view(B, L, 3, H, D)
            qb, kb, vb = (g[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, L, D]
        else:
            qb, kb, vb = (t[off:off + n].view(B, L, H, D).transpose(1, 2) for t in gathered)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        ob = ob.transpose(1, 2).reshape(n, H * D).to(q.dtype)  # a view: SDPA returns [B, L, H, D] memory
        out.index_copy_(0, dst, ob)
    return out[:T].view(T, H, D)


# --------------------------------------------------------------------------------------------
# validation and the public functions
# --------------------------------------------------------------------------------------------
# The last CUDA cu_seqlens seen and its host copy: an encoder passes one cu_seqlens to every layer,
# and on CUDA each .tolist() is a device sync that would stall the launch queue once per layer.
_HOST_CACHE: tuple = (None, -1, None)


class _HostSeqlens:
    """cu_seqlens on the host, with the facts validation needs computed once."""

    def __init__(self, values: list[int]):
        self.values = values
        lens = [b - a for a, b in zip(values[:-1], values[1:])]
        self.longest = max(lens)
        self.first_negative = next((i for i, n in enumerate(lens) if n < 0), None)
        self.first_empty = next((i for i, n in enumerate(lens) if n <= 0), None)


def _host_seqlens(cu_seqlens: torch.Tensor) -> _HostSeqlens:
    global _HOST_CACHE
    # Inference tensors have no version counter, so an in-place edit could not be seen: no cache.
    # Nor on the CPU, where .tolist() costs no sync and writes that skip the counter (a numpy alias,
    # .data) are common.
    tracked = cu_seqlens.is_cuda and not cu_seqlens.is_inference()
    if tracked:
        ref, version, host = _HOST_CACHE
        if ref is not None and ref() is cu_seqlens and cu_seqlens._version == version:
            return host
    host = _HostSeqlens(cu_seqlens.tolist())
    if tracked:
        _HOST_CACHE = (weakref.ref(cu_seqlens), cu_seqlens._version, host)
    return host


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_cu_seqlens(cu_seqlens, total: int, device, *, allow_empty_seqs: bool) -> _HostSeqlens | None:
    """Shape/dtype/device checks always; value checks need a host copy (returned), so they are
    skipped while a CUDA graph is being captured (returns None)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() < 2:
        raise ValueError("empty batch: cu_seqlens needs at least 2 entries [0, ..., total_tokens]")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    if _capturing(cu_seqlens):
        return None
    host = _host_seqlens(cu_seqlens)
    cu = host.values
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at total_tokens={total}, got {cu[-1]}")
    bad = host.first_negative if allow_empty_seqs else host.first_empty
    if bad is not None:
        what = "non-decreasing" if allow_empty_seqs else "strictly increasing (no empty sequences)"
        raise ValueError(f"cu_seqlens must be {what}: cu_seqlens[{bad}]={cu[bad]}, "
                         f"cu_seqlens[{bad + 1}]={cu[bad + 1]}")
    return host


def _validate(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_floating(name, t)
    if q.dim() != 3:
        raise ValueError(f"q must be [total_tokens, n_heads, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share a shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    T, H, D = q.shape
    if T == 0:
        raise ValueError("empty batch: q has no tokens")
    if H == 0 or D == 0:
        raise ValueError(f"n_heads and head_dim must be positive, got shape {tuple(q.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {D}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    return _check_cu_seqlens(cu_seqlens, T, q.device, allow_empty_seqs=True)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None, impl="auto",
                     config: dict | None = None):
    """Bidirectional attention within each packed sequence.

    q, k, v: [total_tokens, n_heads, head_dim] (fp32/fp16/bf16, one dtype and device; any token and
    head strides, head_dim contiguous is best), head_dim <= 128.  cu_seqlens: int32 [batch + 1],
    0 = cu_seqlens[0] <= ... <= cu_seqlens[-1] = total_tokens.  max_seqlen: an int >= the longest
    sequence (it sizes the Triton grid).  softmax_scale defaults to 1/sqrt(head_dim).  Returns
    [total_tokens, n_heads, head_dim] in q's dtype.  ``impl``: "triton", "torch" or "auto" (Triton
    on CUDA tensors, torch elsewhere).  Value checks of cu_seqlens copy it to the host (a device
    sync on CUDA), except while a CUDA graph is being captured (then the caller vouches for it).
    For a CUDA cu_seqlens the copy is reused while the same tensor is passed unchanged (its version
    counter), so an encoder pays it once per forward, not once per layer; a write that skips the
    counter (through ``.data``, DLPack or another alias) goes unseen until a different tensor is
    passed.  Inference-mode and CPU tensors are read every call.  The Triton path is forward only:
    with grad enabled and an input that requires grad it raises (use impl="torch" to train through
    it).  ``config``: a Triton tile override, a ``CONFIG_CANDIDATES`` name or value (a ``short_*`` one
    applies when max_seqlen <= SHORT_MAX_SEQLEN, else the default tiles run; see `resolve_config`);
    the torch path checks it and ignores it.
    """
    host = _validate(q, k, v, cu_seqlens, max_seqlen, softmax_scale)
    config = resolve_config(config)
    if host is not None and host.longest > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({host.longest})")
    impl = resolve_impl(impl, q)
    D = q.shape[2]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if impl == "torch":
        if host is None:
            raise RuntimeError("impl='torch' needs host lengths and cannot run under CUDA-graph capture")
        return _torch_varlen(q, k, v, host.values, scale)
    check_forward_only("varlen_attention", q, k, v)
    # The kernel addresses head_dim with unit stride.
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    return _triton_varlen(q, k, v, cu_seqlens, max_seqlen, scale, config)


def varlen_attention_reference(q, k, v, cu_seqlens, *, softmax_scale=None):
    """Plain per-sequence softmax attention in fp64 (returns fp64): the ground truth for tests."""
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        if b == a:
            continue
        qs, ks, vs = (t[a:b].double().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[a:b] = (p @ vs).transpose(0, 1)
    return out
