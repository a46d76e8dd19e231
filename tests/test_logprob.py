import pytest
import torch
from sm90 import compile_offline, needs_offline_compiler

import relsum_kernels.logprob as lp_mod
from relsum_kernels import fused_logprob, logprob_reference

from conftest import impl_device, rel_err, triton_device

# Relative-norm tolerances against fp64.  Outputs are fp32 always; gradients come back in the
# input dtype, so half inputs carry its rounding.
TOL_OUT = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
TOL_GRAD = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(N, D, V, dtype, *, bias=True, ignored=(), device="cpu"):
    h = torch.randn(N, D, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=device) / D**0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(V, device=device).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), device=device)
    for i in ignored:
        t[i] = -100
    return h, w, b, t


def _reference_grads(h, w, b, t, temperature, g_lp, g_ent):
    hr = h.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    lr, er = logprob_reference(hr, wr, t, bias=br, temperature=temperature)
    loss = (lr * g_lp.double()).sum()
    if g_ent is not None:
        loss = loss + (er * g_ent.double()).sum()
    loss.backward()
    return lr, er, hr.grad, wr.grad, (br.grad if br is not None else None)


def _check(impl, dtype, N, D, V, *, temperature=1.0, bias=True, ignored=(), with_entropy=True,
           grad_filter_eps="auto"):
    device = impl_device(impl)
    h, w, b, t = _inputs(N, D, V, dtype, bias=bias, ignored=ignored, device=device)
    g_lp = torch.randn(N, device=device)
    g_ent = torch.randn(N, device=device) if with_entropy else None
    out = fused_logprob(h, w, t, bias=b, temperature=temperature, with_entropy=with_entropy, impl=impl,
                        grad_filter_eps=grad_filter_eps)
    logp, ent = out if with_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    loss = (logp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0)
    loss.backward()
    lr, er, ghr, gwr, gbr = _reference_grads(h, w, b, t, temperature, g_lp, g_ent)
    assert rel_err(logp, lr) < TOL_OUT[dtype]
    if with_entropy:
        assert ent.dtype == torch.float32
        assert rel_err(ent, er) < TOL_OUT[dtype]
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel_err(h.grad, ghr) < TOL_GRAD[dtype]
    assert rel_err(w.grad, gwr) < TOL_GRAD[dtype]
    if bias:
        assert rel_err(b.grad, gbr) < TOL_GRAD[dtype]
    for i in ignored:
        assert logp[i].item() == 0.0
        assert torch.all(h.grad[i] == 0)
        if with_entropy:
            assert ent[i].item() == 0.0


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, "auto"])
def test_values_and_grads_odd_shapes(impl, dtype, eps):
    # V=301 is no multiple of any block, d=48 no power of two; T != 1; one row ignored.
    # eps 0.0: exact backward (no gradient filtering); "auto": the default.
    _check(impl, dtype, N=37, D=48, V=301, temperature=0.7, ignored=(3, 20), grad_filter_eps=eps)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_single_row(impl):
    _check(impl, torch.float32, N=1, D=48, V=301, temperature=1.3)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_no_bias(impl, with_entropy):
    _check(impl, torch.float32, N=19, D=32, V=257, bias=False, with_entropy=with_entropy)


def test_all_rows_ignored_gives_zero_and_no_gradient():
    h, w, b, t = _inputs(4, 16, 50, torch.float32)
    t[:] = -100
    logp, ent = fused_logprob(h, w, t, bias=b, with_entropy=True, impl="torch")
    (logp.sum() + ent.sum()).backward()
    assert torch.all(logp == 0) and torch.all(ent == 0)
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0) and torch.all(b.grad == 0)


def test_custom_ignore_index():
    h, w, b, t = _inputs(5, 16, 50, torch.float32)
    t[1] = 7
    logp = fused_logprob(h, w, t, ignore_index=7, impl="torch")
    assert logp[1].item() == 0.0 and logp[0].item() != 0.0


@pytest.mark.parametrize("row_block", [1000, 7])
def test_torch_path_chunks_match(monkeypatch, row_block):
    # Force many vocab chunks (and row blocks): results must not depend on the chunking.
    h, w, b, t = _inputs(50, 24, 200, torch.float32, ignored=(0,))
    g = torch.randn(50)
    outs = []
    for chunked in (False, True):
        if chunked:
            monkeypatch.setattr(lp_mod, "TORCH_CHUNK_BYTES", 4 * min(50, row_block) * 30)
            monkeypatch.setattr(lp_mod, "TORCH_MIN_COLS", 1)
            monkeypatch.setattr(lp_mod, "TORCH_ROW_BLOCK", row_block)
        hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
        lp, ent = fused_logprob(hh, ww, t, bias=bb, with_entropy=True, impl="torch")
        (lp * g + ent).sum().backward()
        outs.append((lp, ent, hh.grad, ww.grad, bb.grad))
    blocks = list(lp_mod._torch_blocks(50, 200))
    assert len(blocks[0][2]) > 3 and (row_block == 1000 or len(blocks) > 3)
    for a, c in zip(*outs):
        assert rel_err(c, a) < 1e-5


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_minus_inf_bias_on_whole_tiles(monkeypatch, impl):
    # A -inf bias masks vocab entries: whole 32-column tiles / chunks of -inf logits (the first one,
    # and the last, a Triton vocab split of its own) must not turn exp(-inf - -inf) into NaN; their
    # p z terms count 0 in the entropy, and they get no gradient.
    monkeypatch.setattr(lp_mod, "TORCH_CHUNK_BYTES", 4 * 5 * 32)
    monkeypatch.setattr(lp_mod, "TORCH_MIN_COLS", 1)
    dev = impl_device(impl)
    h, w, b, _ = _inputs(5, 16, 96, torch.float32, device=dev)
    with torch.no_grad():
        b[:32] = float("-inf")
        b[64:] = float("-inf")
        b[40] = float("-inf")
    t = torch.randint(32, 64, (5,), device=dev)
    t[t == 40] = 41
    g_lp, g_ent = torch.randn(5, device=dev), torch.randn(5, device=dev)
    lp, ent = fused_logprob(h, w, t, bias=b, with_entropy=True, impl=impl, grad_filter_eps=0.0)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    lr, er, ghr, gwr, gbr = _reference_grads(h, w, b, t, 1.0, g_lp, g_ent)
    assert torch.isfinite(er).all() and torch.isfinite(ghr).all()
    assert rel_err(lp, lr) < TOL_OUT[torch.float32] and rel_err(ent, er) < TOL_OUT[torch.float32]
    assert rel_err(h.grad, ghr) < TOL_GRAD[torch.float32] and rel_err(w.grad, gwr) < TOL_GRAD[torch.float32]
    assert rel_err(b.grad, gbr) < TOL_GRAD[torch.float32]
    masked = torch.isinf(b.detach())
    assert torch.all(b.grad[masked] == 0) and torch.all(w.grad[masked] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_backward_workspace_chunks(monkeypatch, dtype):
    # Half inputs accumulate in bounded fp32 workspaces; force several row and vocab chunks.
    monkeypatch.setattr(lp_mod, "WORKSPACE_H_BYTES", 16 * 48 * 4)
    monkeypatch.setattr(lp_mod, "WORKSPACE_W_BYTES", 64 * 48 * 4)
    _check("triton", dtype, N=40, D=48, V=150, temperature=0.9, ignored=(5,), grad_filter_eps=0.0)


# ------------------------------------------------------------------------- gradient filtering
def _peaked(N, D, V, dtype, *, hot=(3, 5), lone_target=250):
    """Logits dominated by a +25 bias on a few hot columns: every other p is below ~1e-7, so at
    eps 1e-3 every tile without a hot column or a target is skipped.  Targets lie in [10, 96)
    except row 0's, `lone_target`, which is nobody else's."""
    dev = triton_device()  # CPU tensors only under the interpreter: a GPU run launches for real
    h, w, b, _ = _inputs(N, D, V, dtype, device=dev)
    with torch.no_grad():
        b[:] = 0
        b[list(hot)] = 25.0
    t = torch.randint(10, 96, (N,), device=dev)
    t[0] = lone_target
    return h, w, b, t


def _run(h, w, b, t, g_lp, g_ent, eps, temperature=1.0):
    hh, ww, bb = (x.detach().clone().requires_grad_() for x in (h, w, b))
    lp, ent = fused_logprob(hh, ww, t, bias=bb, temperature=temperature, with_entropy=True,
                            impl="triton", grad_filter_eps=eps)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp, ent, hh.grad, ww.grad, bb.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grad_filter_peaked_keeps_accuracy_and_target_term(dtype):
    N, D, V = 24, 32, 301
    h, w, b, t = _peaked(N, D, V, dtype)
    g_lp, g_ent = torch.randn(N, device=h.device), torch.randn(N, device=h.device)
    lp, ent, gh, gw, gb = _run(h, w, b, t, g_lp, g_ent, 1e-3)
    _, _, ghr, gwr, gbr = _reference_grads(h, w, b, t, 1.0, g_lp, g_ent)
    for got, want in ((gh, ghr), (gw, gwr), (gb, gbr)):
        assert rel_err(got, want) < TOL_GRAD[dtype]
    # Row 0's target has p ~ 1e-10, its tile is otherwise filtered: the target term
    # g_lp (1 - p) h survives.  Nobody else targets that column, so it is (nearly) all of grad_W.
    p_t = (lp[0].exp()).item()
    assert p_t < 1e-6
    assert rel_err(gw[250], gwr[250]) < TOL_GRAD[dtype]
    assert rel_err(gw[250], g_lp[0] * (1 - p_t) * h[0].detach().double()) < TOL_GRAD[dtype]
    # The branch really ran: a vocab row that is neither hot nor a target gets exactly zero
    # gradient with filtering and a nonzero one without.
    bv = lp_mod._launch_config(dtype)["BLOCK_V"]
    busy = {c // bv for c in [*t.tolist(), 3, 5]}
    cold = [c for c in range(V) if c // bv not in busy]
    assert len(cold) > bv
    _, _, _, gw0, gb0 = _run(h, w, b, t, g_lp, g_ent, 0.0)
    assert torch.all(gw[cold] == 0) and torch.all(gb[cold] == 0)
    assert gw0[cold].abs().sum() > 0 and gb0[cold].abs().sum() > 0


def test_grad_filter_huge_eps_changes_the_answer():
    # eps 0.5 drops every tile without a target on ordinary data: the -p part of the gradient is
    # mostly gone, so the gradients must miss the reference by far more than fp32 rounding.
    N, D, V = 20, 32, 301
    dev = triton_device()
    h, w, b, t = _inputs(N, D, V, torch.float32, device=dev)
    g_lp, g_ent = torch.randn(N, device=dev), torch.randn(N, device=dev)
    exact = _run(h, w, b, t, g_lp, g_ent, 0.0)
    huge = _run(h, w, b, t, g_lp, g_ent, 0.5)
    _, _, ghr, gwr, gbr = _reference_grads(h, w, b, t, 1.0, g_lp, g_ent)
    assert rel_err(exact[3], gwr) < TOL_GRAD[torch.float32]
    assert rel_err(huge[3], gwr) > 0.05 and rel_err(huge[4], gbr) > 0.05
    assert torch.equal(huge[0], exact[0]) and torch.equal(huge[1], exact[1])  # forward untouched


def test_grad_filter_auto_resolution():
    assert lp_mod._resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert lp_mod._resolve_filter_eps("auto", torch.float16) == 2.0**-12
    assert lp_mod._resolve_filter_eps("auto", torch.float32) == 0.0
    assert lp_mod._resolve_filter_eps(0, torch.bfloat16) == 0.0
    assert lp_mod._resolve_filter_eps(1e-3, torch.float32) == 1e-3


def test_triton_and_torch_agree():
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # real kernels need the GPU; else interpreter
    h, w, b, t = _inputs(33, 40, 333, torch.float32, ignored=(2,), device=dev)
    g = torch.randn(33, device=dev)
    outs, grads = [], []
    for impl in ("torch", "triton"):
        hh = h.detach().clone().requires_grad_()
        lp, ent = fused_logprob(hh, w.detach(), t, bias=b.detach(), with_entropy=True, impl=impl)
        (lp * g + ent).sum().backward()
        outs.append((lp, ent))
        grads.append(hh.grad)
    assert rel_err(outs[1][0], outs[0][0]) < 1e-6
    assert rel_err(outs[1][1], outs[0][1]) < 1e-6
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_auto_uses_torch_on_cpu():
    h, w, b, t = _inputs(3, 16, 40, torch.float32)
    a = fused_logprob(h, w, t, impl="auto")
    c = fused_logprob(h, w, t, impl="torch")
    assert torch.equal(a, c)


# ---------------------------------------------------------------------------------- bad input
def _ok():
    return torch.randn(4, 16), torch.randn(30, 16), torch.randint(0, 30, (4,))


def test_error_mismatched_d():
    h, w, t = _ok()
    with pytest.raises(ValueError, match="d=16 but weight has d=8"):
        fused_logprob(h, torch.randn(30, 8), t)


def test_error_targets_shape():
    h, w, t = _ok()
    with pytest.raises(ValueError, match="targets must have shape"):
        fused_logprob(h, w, t[:3])


def test_error_targets_out_of_range():
    h, w, t = _ok()
    t[2] = 30
    with pytest.raises(ValueError, match=r"\[0, 30\).*row 2 has 30"):
        fused_logprob(h, w, t)
    t[2] = -1
    with pytest.raises(ValueError, match="row 2 has -1"):
        fused_logprob(h, w, t)


def test_error_non_floating_hidden():
    h, w, t = _ok()
    with pytest.raises(TypeError, match="hidden must be float32, float16 or bfloat16"):
        fused_logprob(h.long(), w, t)


def test_error_float_targets():
    h, w, t = _ok()
    with pytest.raises(TypeError, match="targets must be an int64 or int32"):
        fused_logprob(h, w, t.float())


def test_error_dtype_mismatch():
    h, w, t = _ok()
    with pytest.raises(TypeError, match="share a dtype"):
        fused_logprob(h, w.half(), t)


def test_error_devices_differ():
    h, w, t = _ok()
    with pytest.raises(ValueError, match="one device"):
        fused_logprob(h, w.to("meta"), t)


def test_error_empty_batch():
    _, w, _ = _ok()
    with pytest.raises(ValueError, match="empty batch"):
        fused_logprob(torch.randn(0, 16), w, torch.zeros(0, dtype=torch.long))


def test_error_bad_rank_bias_temperature_impl():
    h, w, t = _ok()
    with pytest.raises(ValueError, match=r"hidden must be \[N, d\]"):
        fused_logprob(h[None], w, t)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_logprob(h, w, t, bias=torch.randn(29))
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_logprob(h, w, t, impl="cuda")
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got list"):
        fused_logprob(h, w, t, bias=[0.0] * w.shape[0])
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob(h, w, t, temperature=True)
    for bad in (None, True, 1.0):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            fused_logprob(h, w, t, ignore_index=bad)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_double_backward_is_refused_not_silently_wrong(impl):
    # Triton needs CUDA tensors on a GPU machine (the interpreter only takes CPU ones)
    h, w, t = (x.to(impl_device(impl)) for x in _ok())
    h.requires_grad_(True)
    (g,) = torch.autograd.grad(fused_logprob(h, w, t, impl=impl).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad((g * g).sum(), h)


@pytest.mark.parametrize("eps", [-1e-3, float("nan"), float("inf"), "fast", None, True, torch.tensor(1e-3)])
def test_error_bad_grad_filter_eps(eps):
    h, w, t = _ok()
    with pytest.raises(ValueError, match='grad_filter_eps must be "auto" or a finite number >= 0'):
        fused_logprob(h, w, t, grad_filter_eps=eps)


@needs_offline_compiler
def test_kernels_compile_for_sm90():
    out = compile_offline("""
        import torch
        import triton

        lp = importlib.import_module("relsum_kernels.logprob")
        # triton 3.6's ptxas spills a few bytes in the 16-bit backward (see _launch_config); 3.7 none
        old_triton = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        for dt, prec in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
            cfg = lp._launch_config(dtypes[dt])
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            common = {"HAS_BIAS": True, "UPCAST": False, "DOT_PREC": prec, **cfg}
            ptrs = {"h_ptr": "*" + dt, "w_ptr": "*" + dt, "b_ptr": "*" + dt, "tgt_ptr": "*i64"}
            compile_sm90(lp._logprob_fwd_kernel, {**ptrs, "part_ptr": "*fp32", "N": "i32", "V": "i32",
                         "D": "i32", "stride_h": "i32", "stride_w": "i32", "inv_temp": "fp32",
                         "cols_per_split": "i32"}, common, **opts)
            compile_sm90(lp._logprob_bwd_kernel, {**ptrs, "lse_ptr": "*fp32", "ez_ptr": "*fp32",
                         "glp_ptr": "*fp32", "gent_ptr": "*fp32", "gh_ptr": "*fp32", "gw_ptr": "*fp32",
                         "gb_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "D": "i32",
                         "stride_h": "i32", "stride_w": "i32", "stride_gh": "i32", "stride_gw": "i32",
                         "inv_temp": "fp32", "log_filter_eps": "fp32"}, {**common, "HAS_ENT_GRAD": True},
                         **opts, spill_ok=64 if old_triton and dt != "fp32" else 0)
    """)
    assert out.count("compiled") == 6


# ===================================================================== kernels/logprob.py: the fp64 reference
# target: tests/test_logprob.py
# kills: K06 (the reference computes in fp32: the fp32 checks at 1e-5 cannot tell), K08 (the
#        reference ignores -100 whatever ignore_index says)
def test_reference_is_fp64_and_honours_a_custom_ignore_index():
    h, w = torch.randn(5, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (5,))
    t[1], t[3] = 7, 9
    lr, er = logprob_reference(h, w, t, ignore_index=7)
    assert lr.dtype == er.dtype == torch.float64
    full = torch.log_softmax(h.double() @ w.double().t(), -1)  # the exact values, rounded once at the end
    assert torch.equal(lr[[0, 2, 3, 4]], full[[0, 2, 3, 4], t[[0, 2, 3, 4]]])
    assert lr[1].item() == 0.0 and er[1].item() == 0.0 and lr[3].item() != 0.0 and er[3].item() != 0.0
    lp, ent = fused_logprob(h, w, t, ignore_index=7, with_entropy=True, impl="torch")
    assert rel_err(lp, lr) < 1e-5 and rel_err(ent, er) < 1e-5
