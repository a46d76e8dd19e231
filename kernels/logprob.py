"""Fused LM-head log-prob and entropy without the [tokens x vocab] logits.

For hidden h [N, d], LM head W [V, d], optional bias b [V] and temperature T the logits are
z = (h W^T + b) / T.  We return log p(target) = z_t - logsumexp(z) and, on request, the entropy
H = logsumexp(z) - E_p[z], both in fp32.  Gradients with respect to z:

    d logp / dz_j = [j == t] - p_j          d H / dz_j = -p_j (z_j - E_p[z])

so the backward only needs logsumexp and E_p[z] per row (saved by the forward) and recomputes z
tile by tile.  Two implementations share that math:

* Triton (CUDA, or CPU under TRITON_INTERPRET=1): the forward streams vocab tiles with an online
  logsumexp, split over the vocab for parallelism and merged on the host; the backward recomputes
  each [rows x vocab] tile once and atomically adds its share of grad_h and grad_W, skipping
  ("gradient filtering", as Cut Cross-Entropy does) tiles whose softmax values are all below
  ``grad_filter_eps`` and that hold no target (see `fused_logprob`).
* torch: [rows x vocab-chunk] blocks whose logits stay under a fixed budget, with the same online
  logsumexp over vocab chunks.  Used on CPU; `logprob_reference` (full fp64 logits) is the ground
  truth both are tested against.
"""

from __future__ import annotations

import math

import torch

from ._common import HAS_TRITON, check_floating, dot_precision, interpreting, resolve_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

# torch path: bytes of fp32 logits one chunk may hold (two temporaries of this size live at once),
# rows per block, and the narrowest vocab chunk worth a matmul.  8 MiB chunks stay in cache: on the
# 2-core CPU they ran at 1.1x the naive time, 32 MiB chunks at 1.2x.
TORCH_CHUNK_BYTES = 8 << 20
TORCH_ROW_BLOCK = 8192
TORCH_MIN_COLS = 256
# Triton backward on half inputs: fp32 workspaces for grad_h and grad_W rows (bounds extra memory).
WORKSPACE_H_BYTES = 40 << 20
WORKSPACE_W_BYTES = 16 << 20
# Triton backward, grad_filter_eps="auto" on fp16/bf16 inputs: skip vocab tiles whose softmax
# values all lie below this (see fused_logprob's docstring for what that drops).
GRAD_FILTER_EPS_HALF = 2.0**-12
_F32_MIN = torch.finfo(torch.float32).min


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _load_rows(ptr, rows, ks, row_mask, kmask, stride, UPCAST: tl.constexpr):
        x = tl.load(ptr + rows[:, None] * stride + ks[None, :], mask=row_mask[:, None] & kmask[None, :],
                    other=0.0)
        if UPCAST:  # the interpreter computes bf16 dots wrongly: do them in fp32 there
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            kmask = ks < D
            h = _load_rows(h_ptr, rows, ks, row_mask, kmask, stride_h, UPCAST)
            w = _load_rows(w_ptr, cols, ks, col_mask, kmask, stride_w, UPCAST)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        return acc * inv_temp

    @triton.jit
    def _logprob_fwd_kernel(
        h_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr,
        N, V, D, stride_h, stride_w, inv_temp, cols_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # One program: BLOCK_N rows x one vocab split.  Writes the split's running max m, sum of
        # exp(z - m), sum of exp(z - m) * z and the target logit (0 if the target is elsewhere).
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        t = tl.zeros((BLOCK_N,), tl.float32)
        zt = tl.zeros((BLOCK_N,), tl.float32)
        v_start = pid_s * cols_per_split
        v_end = tl.minimum(v_start + cols_per_split, V)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w,
                             inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PREC)
            z = tl.where(col_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            # A row with only -inf logits so far (a -inf bias on padded vocab entries) exponentiates
            # against 0: exp(-inf - -inf) would be NaN.
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_exp)
            e = tl.exp(z - m_exp[:, None])
            s = s * alpha + tl.sum(e, axis=1)
            # p z counts 0 where z = -inf (masked columns, a -inf bias), not 0 * -inf = NaN
            t = t * alpha + tl.sum(e * tl.where(z == float("-inf"), 0.0, z), axis=1)
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
            m = m_new
        base = part_ptr + pid_s * N + rows
        stride_q = n_splits * N
        tl.store(base, m, mask=row_mask)
        tl.store(base + stride_q, s, mask=row_mask)
        tl.store(base + 2 * stride_q, t, mask=row_mask)
        tl.store(base + 3 * stride_q, zt, mask=row_mask)

    @triton.jit
    def _logprob_bwd_kernel(
        h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr,
        gh_ptr, gw_ptr, gb_ptr,
        n_rows, n_cols, D, stride_h, stride_w, stride_gh, stride_gw, inv_temp, log_filter_eps,
        HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # Pointers arrive offset to the current row/vocab chunk; gh/gw/gb are fp32 accumulators
        # indexed from the chunk start.  Gradient filtering skips the whole d-loop (and the bias
        # atomic) of a tile that holds no target and whose p all lie below exp(log_filter_eps).
        # The test sits before p and the bias sum inside the branch: other orders spill on sm_90.
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w,
                         inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, DOT_PREC)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        glp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-1)
        valid = row_mask[:, None] & col_mask[None, :]
        # Filter test, in the log domain and before p exists (fewer live registers): keep the tile
        # if some log p >= log_filter_eps (-inf: keep all), or if it holds a target column of a row
        # whose log-prob gradient is nonzero (that dz is g (1 - p), not small).
        c0 = pid_v * BLOCK_V
        tgt_here = row_mask & (tgt >= c0) & (tgt < c0 + BLOCK_V) & (tgt < n_cols) & (glp != 0.0)
        row_top = tl.max(tl.where(valid, z, float("-inf")), axis=1) - lse
        top = tl.max(tl.where(tgt_here, float("inf"), row_top), axis=0)
        keep = (top >= log_filter_eps) | (top != top)
        p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
        dz = tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0) - glp[:, None] * p
        if HAS_ENT_GRAD:
            ez = tl.load(ez_ptr + rows, mask=row_mask, other=0.0)
            gent = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
            # p (z - E[z]) is 0, not 0 * -inf = NaN, where z = -inf (a -inf bias)
            dz -= gent[:, None] * p * tl.where(p > 0.0, z - ez[:, None], 0.0)
        dz = tl.where(valid, dz * inv_temp, 0.0)
        if keep:
            if HAS_BIAS:
                tl.atomic_add(gb_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)
            if UPCAST:
                dzc = dz
            else:  # tensor cores take the input dtype; accumulation stays fp32
                dzc = dz.to(h_ptr.dtype.element_ty)
            for k0 in range(0, D, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                kmask = ks < D
                h = _load_rows(h_ptr, rows, ks, row_mask, kmask, stride_h, UPCAST)
                w = _load_rows(w_ptr, cols, ks, col_mask, kmask, stride_w, UPCAST)
                gh = tl.dot(dzc, w, input_precision=DOT_PREC)
                tl.atomic_add(gh_ptr + rows[:, None] * stride_gh + ks[None, :], gh,
                              mask=row_mask[:, None] & kmask[None, :])
                gw = tl.dot(tl.trans(dzc), h, input_precision=DOT_PREC)
                tl.atomic_add(gw_ptr + cols[:, None] * stride_gw + ks[None, :], gw,
                              mask=col_mask[:, None] & kmask[None, :])


def _launch_config(dtype: torch.dtype) -> dict:
    """Tile sizes and warps.  GPU ones compile for sm_90 without register spills (ptxas -v) with
    triton 3.7: fp32 tiles are smaller because their dot operands take twice the registers.
    Triton 3.6 (the GPU image's) spills 44 bytes in the 16-bit backward at 255 registers; BLOCK_D 16
    (218 registers) or 16 warps (128) do not spill on either, but a smaller tile would multiply the
    backward's atomics, and neither has been timed, so the tile stays."""
    if interpreting():  # small tiles keep the interpreter quick
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=32)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)


def _triton_forward(h, w, b, targets, inv_temp, need_ez=True):
    # E_p[z] costs one multiply-add per logit next to the matmul: always computed.
    N, D = h.shape
    V = w.shape[0]
    cfg = _launch_config(h.dtype)
    BN, BV = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks = triton.cdiv(N, BN)
    # Split the vocab so that small batches still fill the GPU; each split is whole tiles.
    if h.is_cuda:
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count
        want = max(1, (2 * sms + n_blocks - 1) // n_blocks)
    else:
        want = 2  # exercise the split merge in interpreter tests
    tiles = triton.cdiv(V, BV)
    splits = max(1, min(want, tiles))
    cols_per_split = triton.cdiv(tiles, splits) * BV
    splits = triton.cdiv(V, cols_per_split)
    part = torch.empty((4, splits, N), device=h.device, dtype=torch.float32)
    _logprob_fwd_kernel[(n_blocks, splits)](
        h, w, b if b is not None else h, targets, part,
        N, V, D, h.stride(0), w.stride(0), inv_temp, cols_per_split,
        HAS_BIAS=b is not None, UPCAST=interpreting(), DOT_PREC=dot_precision(h.dtype == torch.float32),
        **cfg,
    )
    m, s, t, zt = part.unbind(0)
    m_all = m.max(dim=0).values
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(0)
    lse = m_all + torch.log(s_all)
    ez = (t * scale).sum(0) / s_all
    return zt.sum(0) - lse, lse - ez, lse, ez


def _chunk_rows(total: int, budget_bytes: int, row_bytes: int, multiple: int) -> int:
    rows = max(multiple, budget_bytes // max(row_bytes, 1) // multiple * multiple)
    return min(total, rows)


def _triton_backward(h, w, b, targets, lse, ez, g_lp, g_ent, inv_temp, filter_eps=0.0):
    N, D = h.shape
    V = w.shape[0]
    cfg = _launch_config(h.dtype)
    BN, BV = cfg["BLOCK_N"], cfg["BLOCK_V"]
    fp32 = h.dtype == torch.float32
    # fp32 inputs: accumulate straight into the gradients.  Half inputs: accumulate each
    # (row chunk, vocab chunk) in bounded fp32 workspaces; grad_h is rounded once, grad_W gets one
    # 16-bit add (and rounding) per row chunk.
    grad_h = torch.zeros_like(h) if fp32 else torch.empty_like(h)
    grad_w = torch.zeros_like(w)
    grad_b = torch.zeros(V, device=h.device, dtype=torch.float32) if b is not None else None
    n_chunk = N if fp32 else _chunk_rows(N, WORKSPACE_H_BYTES, 4 * D, BN)
    v_chunk = V if fp32 else _chunk_rows(V, WORKSPACE_W_BYTES, 4 * D, BV)
    ws_h = None if fp32 else torch.empty((n_chunk, D), device=h.device, dtype=torch.float32)
    ws_w = None if fp32 else torch.empty((v_chunk, D), device=h.device, dtype=torch.float32)
    has_ent = g_ent is not None
    log_eps = math.log(filter_eps) if filter_eps > 0 else float("-inf")  # -inf: keep every tile
    for n0 in range(0, N, n_chunk):
        n1 = min(N, n0 + n_chunk)
        gh = grad_h[n0:n1] if fp32 else ws_h[: n1 - n0].zero_()
        for v0 in range(0, V, v_chunk):
            v1 = min(V, v0 + v_chunk)
            gw = grad_w[v0:v1] if fp32 else ws_w[: v1 - v0].zero_()
            grid = (triton.cdiv(n1 - n0, BN), triton.cdiv(v1 - v0, BV))
            _logprob_bwd_kernel[grid](
                h[n0:n1], w[v0:v1], b[v0:v1] if b is not None else h, targets[n0:n1] - v0,
                lse[n0:n1], ez[n0:n1], g_lp[n0:n1], g_ent[n0:n1] if has_ent else g_lp[n0:n1],
                gh, gw, grad_b[v0:v1] if b is not None else gh,
                n1 - n0, v1 - v0, D, h.stride(0), w.stride(0), gh.stride(0), gw.stride(0), inv_temp,
                log_eps, HAS_BIAS=b is not None, HAS_ENT_GRAD=has_ent, UPCAST=interpreting(),
                DOT_PREC=dot_precision(h.dtype == torch.float32), **cfg,
            )
            if not fp32:
                grad_w[v0:v1] += gw
        if not fp32:
            grad_h[n0:n1] = gh
    return grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------
# torch path (CPU, and the reference)
# --------------------------------------------------------------------------------------------
def _torch_blocks(N: int, V: int):
    """Row blocks x vocab chunks.  Chunking the vocab lets each chunk write its grad_W rows once;
    only grad_h [rows, d] accumulates, which is small beside the [V, d] head."""
    rows = min(N, TORCH_ROW_BLOCK)
    cols = min(V, max(TORCH_MIN_COLS, TORCH_CHUNK_BYTES // (4 * rows)))
    for n0 in range(0, N, rows):
        yield n0, min(N, n0 + rows), [(v0, min(V, v0 + cols)) for v0 in range(0, V, cols)]


def _torch_logits(h_rows, w32, b32, v0, v1, inv_temp):
    z = h_rows @ w32[v0:v1].t()
    if b32 is not None:
        z += b32[v0:v1]
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _torch_forward(h, w, b, targets, inv_temp, need_ez=True):
    N = h.shape[0]
    V = w.shape[0]
    w32 = w.float()
    b32 = b.float() if b is not None else None
    logp = torch.empty(N, device=h.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ez = torch.zeros_like(logp)
    for n0, n1, chunks in _torch_blocks(N, V):
        h32 = h[n0:n1].float()
        tgt = targets[n0:n1]
        run_lse = torch.full((n1 - n0,), float("-inf"), device=h.device)
        run_ez = torch.zeros_like(run_lse)
        zt = torch.zeros_like(run_lse)
        for v0, v1 in chunks:  # merge per-chunk logsumexp (and E_p[z]) across the vocab
            z = _torch_logits(h32, w32, b32, v0, v1, inv_temp)
            here = (tgt >= v0) & (tgt < v1)
            zt += torch.where(here, z.gather(1, (tgt - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
            # A chunk of -inf logits (a -inf bias on padded vocab entries) exponentiates against 0:
            # exp(-inf - -inf) would be NaN.  Its s_c is then 0 and lse_c -inf.
            m_c = z.amax(dim=1)
            m_c.masked_fill_(m_c == float("-inf"), 0.0)
            if need_ez:
                e = (z - m_c[:, None]).exp_()
                s_c = e.sum(1)
                # E[z] under this chunk's softmax; p z counts 0 where z = -inf (not 0 * -inf = NaN),
                # and s_c >= 1 unless the chunk is all -inf (then the sum is 0 too)
                ez_c = e.mul_(z.clamp_min_(_F32_MIN)).sum(1) / s_c.clamp_min(1.0)
            else:  # z is not needed again: exponentiate in place
                s_c = z.sub_(m_c[:, None]).exp_().sum(1)
            lse_c = m_c + torch.log(s_c)
            new_lse = torch.logaddexp(run_lse, lse_c)
            if need_ez:
                # all -inf so far: the weights are exp(-inf - 0) = 0, not NaN
                ref = new_lse.masked_fill(new_lse == float("-inf"), 0.0)
                run_ez = run_ez * torch.exp(run_lse - ref) + ez_c * torch.exp(lse_c - ref)
            run_lse = new_lse
        lse[n0:n1] = run_lse
        logp[n0:n1] = zt - run_lse
        if need_ez:
            ez[n0:n1] = run_ez
    return logp, lse - ez, lse, ez


def _torch_backward(h, w, b, targets, lse, ez, g_lp, g_ent, inv_temp, filter_eps=0.0):
    # filter_eps is ignored: the torch path is always exact (its chunks are dense matmuls anyway).
    N, D = h.shape
    V = w.shape[0]
    w32 = w.float()
    b32 = b.float() if b is not None else None
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros((V, D), device=h.device, dtype=torch.float32)
    grad_b = torch.zeros(V, device=h.device, dtype=torch.float32) if b is not None else None
    # dL/dlogits = g_lp onehot - p (g_lp + g_ent (z - E[z])), times 1/T.  Per-row factors are
    # applied to the small [rows, d] matmul operands instead of the [rows, vocab] chunk, and the
    # one-hot part is a gather / index_add, so a chunk needs only exp(z - lse) (plus one pass with
    # entropy).
    a = (g_lp if g_ent is None else g_lp - g_ent * ez) * inv_temp
    for n0, n1, chunks in _torch_blocks(N, V):
        h32 = h[n0:n1].float()
        tgt = targets[n0:n1]
        g = g_lp[n0:n1] * inv_temp
        a_rows = a[n0:n1, None]
        h_neg = h32 * -a_rows if g_ent is None else -h32
        gh = g[:, None] * w32[tgt]
        neg_lse = -lse[n0:n1, None]
        for v0, v1 in chunks:
            if g_ent is None:
                # p = exp(z - lse), with -lse folded into the matmul; the row factor -a rides on
                # h_neg and on the small q @ W product.
                q = torch.addmm(neg_lse, h32, w32[v0:v1].t(), alpha=inv_temp)
                if b32 is not None:
                    q.add_(b32[v0:v1], alpha=inv_temp)
                q.exp_()
                gh.addcmul_(q @ w32[v0:v1], a_rows, value=-1.0)
            else:
                z = _torch_logits(h32, w32, b32, v0, v1, inv_temp)
                p = (z - lse[n0:n1, None]).exp_()
                z.masked_fill_(p == 0, 0.0)  # q = 0 there; a -inf logit would make it 0 * -inf = NaN
                q = z.mul_(g_ent[n0:n1, None] * inv_temp).add_(a_rows).mul_(p)  # p (a + b z) = -dz
                gh.sub_(q @ w32[v0:v1])
            grad_w[v0:v1].addmm_(q.t(), h_neg)
            if grad_b is not None:
                grad_b[v0:v1] -= q.t() @ a_rows.squeeze(1) if g_ent is None else q.sum(0)
        grad_w.index_add_(0, tgt, g[:, None] * h32)
        if grad_b is not None:
            grad_b.index_add_(0, tgt, g)
        grad_h[n0:n1] = gh
    return grad_h, grad_w.to(w.dtype), grad_b


# --------------------------------------------------------------------------------------------
# autograd and the public function
# --------------------------------------------------------------------------------------------
class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore, temperature, with_entropy, impl, filter_eps):
        inv_temp = 1.0 / temperature
        fwd = _triton_forward if impl == "triton" else _torch_forward
        logp, entropy, lse, ez = fwd(hidden, weight, bias, targets, inv_temp, with_entropy)
        logp = logp.masked_fill_(ignore, 0.0)
        entropy = entropy.masked_fill_(ignore | (not with_entropy), 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, ignore, lse, ez)
        ctx.inv_temp = inv_temp
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)  # an unused entropy output then costs no backward work
        ctx.impl = impl
        ctx.filter_eps = filter_eps
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # second derivatives would be silently wrong
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets, ignore, lse, ez = ctx.saved_tensors
        keep = ~ignore
        g_lp = (g_lp if g_lp is not None else torch.zeros_like(lse)).float() * keep
        g_ent = g_ent.float() * keep if (g_ent is not None and ctx.with_entropy) else None
        bwd = _triton_backward if ctx.impl == "triton" else _torch_backward
        grad_h, grad_w, grad_b = bwd(hidden, weight, bias, targets, lse, ez, g_lp, g_ent, ctx.inv_temp,
                                     ctx.filter_eps)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _validate(hidden, weight, targets, bias, temperature):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_floating(name, t)
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, d] and weight [V, d]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    N, D = hidden.shape
    V, Dw = weight.shape
    if D != Dw:
        raise ValueError(f"hidden has d={D} but weight has d={Dw}")
    if N == 0:
        raise ValueError("empty batch: hidden has no rows")
    if V == 0 or D == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("targets must be an int64 or int32 tensor")
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape ({N},), got {tuple(targets.shape)}")
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        check_floating("bias", bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must have shape ({V},), got {tuple(bias.shape)}")
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError("hidden, weight, targets and bias must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _resolve_filter_eps(grad_filter_eps, dtype: torch.dtype) -> float:
    """grad_filter_eps "auto" -> GRAD_FILTER_EPS_HALF for fp16/bf16, 0.0 (exact) for fp32."""
    if isinstance(grad_filter_eps, str):
        if grad_filter_eps != "auto":
            raise ValueError(f'grad_filter_eps must be "auto" or a finite number >= 0, '
                             f'got {grad_filter_eps!r}')
        return GRAD_FILTER_EPS_HALF if dtype in (torch.float16, torch.bfloat16) else 0.0
    if (isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float))
            or not math.isfinite(grad_filter_eps) or grad_filter_eps < 0):
        raise ValueError(f'grad_filter_eps must be "auto" or a finite number >= 0, '
                         f'got {grad_filter_eps!r}')
    return float(grad_filter_eps)


def fused_logprob(hidden, weight, targets, *, bias=None, temperature=1.0, with_entropy=False,
                  ignore_index=-100, impl="auto", grad_filter_eps="auto"):
    """log softmax((hidden @ weight.T + bias) / temperature)[target] per row, never building [N, V].

    hidden [N, d], weight [V, d] (the LM head), targets [N] -> fp32 log-probs [N]; with
    ``with_entropy`` also the fp32 entropy [N] of the same distribution.  Differentiable in hidden,
    weight and bias.  Rows whose target is ``ignore_index`` give 0 and pass no gradient.
    ``impl``: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked, bounded memory)
    or "auto" (Triton on CUDA tensors, torch elsewhere).

    ``grad_filter_eps`` (gradient filtering, Triton backward only; the torch path ignores it and is
    always exact): the backward skips every [rows x vocab] tile (128 x 128 for half inputs on the
    GPU) that holds no target column of a row with nonzero log-prob gradient and whose softmax
    values p are all below ``grad_filter_eps``.  "auto" (default) means 2**-12 for fp16/bf16 inputs
    and 0.0 for fp32; 0.0 turns filtering off, giving exact gradients.  Forward outputs are never
    affected.  What is dropped: in a skipped tile the logit gradient of row i, column j is
    -(g_lp_i + g_ent_i (z_ij - E_p[z]_i)) p_ij / T, and z_ij - E_p[z]_i = log p_ij + H_i, so for
    eps <= 1/e each dropped value is below eps / T * (|g_lp_i| + |g_ent_i| (ln(1/eps) + H_i))
    (H_i the row's entropy; the entropy gradient is filtered by the same test).  The target term
    g_lp_i (1 - p_it) is never dropped.  Summed over a row, the dropped log-prob part is g_lp_i / T
    times the row's softmax mass in skipped tiles, weighted by the W rows there: negligible for
    peaked rows, but for near-uniform rows (every p below eps) it is the whole -g_lp_i E_p[W] term.
    Vocab rows that are nobody's target and lie only in skipped tiles get exactly zero grad_W
    (and bias) gradient.
    """
    _validate(hidden, weight, targets, bias, temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    filter_eps = _resolve_filter_eps(grad_filter_eps, hidden.dtype)
    impl = resolve_impl(impl, hidden)
    V = weight.shape[0]
    targets = targets.long()
    ignore = targets == ignore_index
    bad = (~ignore) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"row {first} has {int(targets[first])}")
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    logp, entropy = _FusedLogprob.apply(hidden, weight, bias, targets.masked_fill(ignore, 0), ignore,
                                        float(temperature), bool(with_entropy), impl, filter_eps)
    return (logp, entropy) if with_entropy else logp


def logprob_reference(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100):
    """Plain full-logits log-prob and entropy in fp64: the ground truth for tests."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    logq = torch.log_softmax(z, dim=-1)
    ignore = targets == ignore_index
    safe = targets.masked_fill(ignore, 0).long()
    logp = logq.gather(1, safe[:, None]).squeeze(1).masked_fill(ignore, 0.0)
    p = logq.exp()
    # p log p counts 0 at p = 0 (a -inf logit), in the forward and its gradient alike
    entropy = -(p * logq.masked_fill(p == 0, 0.0)).sum(-1).masked_fill(ignore, 0.0)
    return logp, entropy
