import math

import pytest
import torch
import torch.nn.functional as F
from sm90 import compile_offline, needs_offline_compiler

from relsum_kernels import (
    bias_gelu,
    bias_gelu_reference,
    cls_score,
    cls_score_reference,
    residual_layernorm,
    residual_layernorm_reference,
)

from conftest import impl_device, rel_err, triton_device

# Outputs in the input dtype carry its rounding; scores are fp32 from fp32 accumulation.
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TOL_SCORE = 2e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["triton", "torch"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cu(lens, device="cpu"):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(device)


# --------------------------------------------------------------------------------------------
# bias + GELU
# --------------------------------------------------------------------------------------------
def test_gelu_reference_is_bert_erf_gelu():
    x = torch.randn(50, 7, dtype=torch.float64) * 4
    b = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(bias_gelu_reference(x, b), F.gelu(x + b, approximate="none"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 100), (1, 1), (5, 1536)])
def test_bias_gelu_matches_reference(impl, dtype, shape):
    dev = impl_device(impl)
    x = (torch.randn(shape, device=dev) * 3).to(dtype)
    b = torch.randn(shape[-1], device=dev).to(dtype)
    y = bias_gelu(x, b, impl=impl)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    err = rel_err(y, bias_gelu_reference(x, b))
    assert err < TOL[dtype], f"{impl} {dtype} {shape}: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_gelu_tails_and_batched_shape(impl):
    dev = impl_device(impl)
    # Large |x|: gelu -> x on the right, -> 0 (not NaN) on the left; the tanh approximation differs
    # from erf by ~1e-4 around |x| ~ 2, which fp32 resolves.
    x = torch.linspace(-12, 12, 2 * 3 * 40, device=dev).reshape(2, 3, 40)
    b = torch.zeros(40, device=dev)
    y = bias_gelu(x, b, impl=impl)
    assert y.shape == x.shape
    ref = bias_gelu_reference(x, b)
    assert (y.double().cpu() - ref.cpu()).abs().max().item() < 1e-6
    assert (F.gelu(x, approximate="tanh").double().cpu() - ref.cpu()).abs().max().item() > 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_gelu_mixed_bias_dtype_and_strided_input(impl):
    dev = impl_device(impl)
    x = torch.randn(20, 64, device=dev)[:, :48]  # row stride 64: handled without a copy
    b = torch.randn(48, device=dev).half()
    assert rel_err(bias_gelu(x, b, impl=impl), bias_gelu_reference(x, b)) < 1e-6


@pytest.mark.parametrize(
    "x, b, exc, match",
    [
        (torch.randn(4, 8), torch.randn(7), ValueError, r"bias must have shape \(8,\)"),
        (torch.randn(4, 8), torch.randn(1, 8), ValueError, "bias must have shape"),
        (torch.randn(0, 8), torch.randn(8), ValueError, "empty batch"),
        (torch.randn(4, 8).long(), torch.randn(8), TypeError, "x must be float32"),
        (torch.randn(4, 8), torch.randn(8).int(), TypeError, "bias must be float32"),
        (torch.randn(4, 8), None, TypeError, "bias must be a torch.Tensor"),
    ],
)
def test_bias_gelu_bad_inputs(x, b, exc, match):
    for impl in IMPLS:
        with pytest.raises(exc, match=match):
            bias_gelu(x, b, impl=impl)


# --------------------------------------------------------------------------------------------
# residual + LayerNorm
# --------------------------------------------------------------------------------------------
def _ln_inputs(T, H, dtype, dev, *, offset=0.0, param_dtype=None):
    pd = param_dtype or dtype
    x = (torch.randn(T, H, device=dev) + offset).to(dtype)
    r = torch.randn(T, H, device=dev).to(dtype)
    w = (1 + 0.1 * torch.randn(H, device=dev)).to(pd)
    b = (0.1 * torch.randn(H, device=dev)).to(pd)
    xb = torch.randn(H, device=dev).to(pd)
    return x, r, w, b, xb


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_xb", [False, True])
@pytest.mark.parametrize("H", [384, 64])
def test_residual_layernorm_matches_reference(impl, dtype, with_xb, H):
    dev = impl_device(impl)
    x, r, w, b, xb = _ln_inputs(37, H, dtype, dev)
    xb = xb if with_xb else None
    y = residual_layernorm(x, r, w, b, x_bias=xb, impl=impl)
    assert y.shape == x.shape and y.dtype == dtype
    ref = residual_layernorm_reference(x, r, w, b, x_bias=xb)
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"{impl} {dtype} H={H}: {err:.2e}"
    if with_xb:  # the fused bias really entered the sum
        assert rel_err(ref, residual_layernorm_reference(x, r, w, b)) > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_layernorm_large_mean_and_eps(impl):
    # Rows with a mean of 300 and unit spread: one-pass E[s^2] - E[s]^2 in fp32 is off by ~5e-3.
    dev = impl_device(impl)
    x, r, w, b, _ = _ln_inputs(9, 96, torch.float32, dev)
    x = 300.0 + x
    y = residual_layernorm(x, r, w, b, eps=1e-5, impl=impl)
    # Hold the statistics to the fp32 sum x + r (its own rounding is no kernel's fault).
    ref = residual_layernorm_reference(x + r, torch.zeros_like(x), w, b, eps=1e-5)
    assert rel_err(y, ref) < 1e-4
    # eps matters when the variance is comparable to it.
    y2 = residual_layernorm(x, r, w, b, eps=1.0, impl=impl)
    assert rel_err(y2, ref) > 1e-1


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_layernorm_half_activations_fp32_params(impl):
    dev = impl_device(impl)
    x, r, w, b, xb = _ln_inputs(16, 100, torch.bfloat16, dev, param_dtype=torch.float32)
    y = residual_layernorm(x, r, w, b, x_bias=xb, impl=impl)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, residual_layernorm_reference(x, r, w, b, x_bias=xb)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_layernorm_single_row_single_feature(impl):
    x, r, w, b, _ = _ln_inputs(1, 1, torch.float32, impl_device(impl))
    y = residual_layernorm(x, r, w, b, impl=impl)
    torch.testing.assert_close(y, b[None, :])  # one feature: normalised value is 0


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(residual=torch.randn(4, 7)), ValueError, "residual must match"),
        (dict(residual=torch.randn(4, 8).half()), TypeError, "share a dtype"),
        (dict(weight=torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
        (dict(bias=torch.randn(8, 1)), ValueError, "bias must have shape"),
        (dict(x_bias=torch.randn(9)), ValueError, "x_bias must have shape"),
        (dict(x=torch.randn(0, 8), residual=torch.randn(0, 8)), ValueError, "empty batch"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must be float32"),
    ],
)
def test_residual_layernorm_bad_inputs(change, exc, match):
    args = dict(x=torch.randn(4, 8), residual=torch.randn(4, 8), weight=torch.ones(8), bias=torch.zeros(8))
    args.update(change)
    kw = {k: args.pop(k) for k in ("eps", "x_bias") if k in args}
    for impl in IMPLS:
        with pytest.raises(exc, match=match):
            residual_layernorm(args["x"], args["residual"], args["weight"], args["bias"], impl=impl, **kw)


# --------------------------------------------------------------------------------------------
# [CLS] gather + pooler + classifier
# --------------------------------------------------------------------------------------------
def _head(H, dtype, dev, *, flat_cls_w=False):
    pw = (torch.randn(H, H, device=dev) / math.sqrt(H) * 2).to(dtype)
    pb = torch.randn(H, device=dev).to(dtype)
    cw = torch.randn(H if flat_cls_w else (1, H), device=dev).to(dtype)
    cb = torch.randn(1, device=dev).to(dtype)
    return pw, pb, cw, cb


def _hidden_with_poisoned_tails(lens, H, dtype, dev):
    """Only [CLS] rows are finite: any read of another token turns the score into NaN."""
    cu = _cu(lens, dev)
    h = torch.full((sum(lens), H), float("nan"), device=dev)
    h[cu[:-1].long()] = torch.randn(len(lens), H, device=dev)
    return h.to(dtype), cu


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [72, 384])
def test_cls_score_matches_reference(impl, dtype, H):
    dev = impl_device(impl)
    lens = [1, 5, 30, 2, 9] * 4 + [3]  # 21 sequences: two blocks of 16 on the Triton path
    h, cu = _hidden_with_poisoned_tails(lens, H, dtype, dev)
    pw, pb, cw, cb = _head(H, dtype, dev)
    s = cls_score(h, cu, pw, pb, cw, cb, impl=impl)
    assert s.shape == (len(lens),) and s.dtype == torch.float32 and s.device == h.device
    assert torch.isfinite(s).all()
    err = rel_err(s, cls_score_reference(h, cu, pw, pb, cw, cb))
    assert err < TOL_SCORE, f"{impl} {dtype} H={H}: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_cls_score_single_pair_and_head_variants(impl):
    dev = impl_device(impl)
    H = 48
    h, cu = _hidden_with_poisoned_tails([13], H, torch.float32, dev)
    pw, pb, cw, cb = _head(H, torch.float32, dev, flat_cls_w=True)
    ref = cls_score_reference(h, cu, pw, pb, cw, cb)
    for bias in (cb, cb.reshape(()), float(cb)):
        s = cls_score(h, cu, pw, pb, cw, bias, impl=impl)
        assert s.shape == (1,)
        assert rel_err(s, ref) < TOL_SCORE


@pytest.mark.parametrize("impl", IMPLS)
def test_cls_score_bf16_hidden_fp32_head(impl):
    dev = impl_device(impl)
    h, cu = _hidden_with_poisoned_tails([4, 1, 7], 64, torch.bfloat16, dev)
    pw, pb, cw, cb = _head(64, torch.float32, dev)
    s = cls_score(h, cu, pw, pb, cw, cb, impl=impl)
    assert rel_err(s, cls_score_reference(h, cu, pw, pb, cw, cb)) < TOL_SCORE


@pytest.mark.parametrize("impl", IMPLS)
def test_cls_score_non_contiguous_cu_seqlens(impl):
    # A strided view passes validation; the kernel must not read it with unit stride.
    dev = impl_device(impl)
    h, cu = _hidden_with_poisoned_tails([3, 4, 3], 32, torch.float32, dev)
    cu = cu.repeat_interleave(2)[::2]
    assert not cu.is_contiguous()
    pw, pb, cw, cb = _head(32, torch.float32, dev)
    s = cls_score(h, cu, pw, pb, cw, cb, impl=impl)
    assert rel_err(s, cls_score_reference(h, cu, pw, pb, cw, cb)) < TOL_SCORE


def test_triton_paths_are_forward_only():
    # Their outputs have no grad_fn: refuse inputs that want a backward rather than train silently
    # without gradients; under no_grad / inference_mode they run.
    dev = triton_device()
    x = torch.randn(3, 16, device=dev)
    v = torch.randn(16, device=dev)
    h, cu = _hidden_with_poisoned_tails([2, 1], 16, torch.float32, dev)
    pw, pb, cw, cb = _head(16, torch.float32, dev)
    calls = {
        "bias_gelu": lambda t: bias_gelu(x, t, impl="triton"),
        "residual_layernorm": lambda t: residual_layernorm(x, x, v, v, x_bias=t, impl="triton"),
        "cls_score": lambda t: cls_score(h, cu, pw, pb, cw, t, impl="triton"),
    }
    for name, call in calls.items():
        t = (cb if name == "cls_score" else v).clone().requires_grad_()
        with pytest.raises(RuntimeError, match=rf"{name}\(impl='triton'\) is forward only"):
            call(t)
        with torch.no_grad():
            call(t)
        with torch.inference_mode():
            call(t)
    assert bias_gelu(x.cpu(), v.cpu().requires_grad_(), impl="torch").grad_fn is not None


def test_cls_score_reference_matches_bert_head():
    # The reference is BertPooler (dense + tanh on token 0) then a one-label nn.Linear.
    H = 32
    lens = [3, 1, 6]
    h = torch.randn(sum(lens), H, dtype=torch.float64)
    cu = _cu(lens)
    pool, clf = torch.nn.Linear(H, H).double(), torch.nn.Linear(H, 1).double()
    want = torch.stack([clf(torch.tanh(pool(h[a]))) for a in cu[:-1].tolist()]).squeeze(1)
    got = cls_score_reference(h, cu, pool.weight, pool.bias, clf.weight, clf.bias)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(cu=torch.tensor([0, 4, 4, 10], dtype=torch.int32)), ValueError, "no empty sequences"),
        (dict(cu=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "strictly increasing"),
        (dict(cu=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "end at"),
        (dict(cu=torch.tensor([2, 4, 10], dtype=torch.int32)), ValueError, "start at 0"),
        (dict(cu=torch.tensor([0], dtype=torch.int32)), ValueError, "empty batch"),
        (dict(cu=torch.tensor([0.0, 4.0, 10.0])), TypeError, "int32"),
        (dict(h=torch.randn(10, 16, 1)), ValueError, "hidden must be 2-D"),
        (dict(h=torch.randn(0, 16)), ValueError, "non-empty"),
        (dict(pw=torch.randn(16, 8)), ValueError, r"pooler_w must have shape \(16, 16\)"),
        (dict(pb=torch.randn(8)), ValueError, "pooler_b must have shape"),
        (dict(cw=torch.randn(2, 16)), ValueError, "one label"),
        (dict(cb=torch.randn(2)), ValueError, "cls_b must hold one value"),
        (dict(pw=torch.randn(16, 16).long()), TypeError, "pooler_w must be float32"),
    ],
)
def test_cls_score_bad_inputs(change, exc, match):
    args = dict(h=torch.randn(10, 16), cu=_cu([4, 6]), pw=torch.randn(16, 16), pb=torch.randn(16),
                cw=torch.randn(1, 16), cb=torch.randn(1))
    args.update(change)
    for impl in IMPLS:
        with pytest.raises(exc, match=match):
            cls_score(args["h"], args["cu"], args["pw"], args["pb"], args["cw"], args["cb"], impl=impl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatches_raise():
    h = torch.randn(10, 16, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens is on"):
        cls_score(h, _cu([4, 6]), torch.randn(16, 16, device="cuda"), torch.randn(16, device="cuda"),
                  torch.randn(16, device="cuda"), 0.0)
    with pytest.raises(ValueError, match="bias is on"):
        bias_gelu(h, torch.randn(16))
    with pytest.raises(ValueError, match="residual is on"):
        residual_layernorm(h, h.cpu(), torch.ones(16, device="cuda"), torch.zeros(16, device="cuda"))


def test_launch_shape_overrides_keep_the_result():
    """The benchmark sweep's override changes only how rows and columns split over programs."""
    dev = triton_device()
    x = torch.randn(37, 96, device=dev)
    b = torch.randn(96, device=dev)
    r = torch.randn(37, 96, device=dev)
    w = torch.rand(96, device=dev) + 0.5
    base = bias_gelu(x, b, impl="triton")
    for cfg in (dict(BLOCK_T=4, BLOCK_F=128, num_warps=4), dict(BLOCK_T=8, BLOCK_F=32, num_warps=2)):
        torch.testing.assert_close(bias_gelu(x, b, impl="triton", config=cfg), base, rtol=0, atol=0)
    base = residual_layernorm(x, r, w, b, impl="triton", x_bias=b)
    for cfg in (dict(BLOCK_T=2, num_warps=2), dict(BLOCK_T=16, num_warps=8)):
        got = residual_layernorm(x, r, w, b, impl="triton", x_bias=b, config=cfg)
        torch.testing.assert_close(got, base, rtol=0, atol=1e-6)


@needs_offline_compiler
def test_kernels_compile_for_sm90():
    out = compile_offline("""
        ep = importlib.import_module("relsum_kernels.encoder_epilogues")

        def go(fn, sig, cfg, aligned=(), **consts):
            cfg = dict(cfg)  # the launch configuration the wrapper uses on a GPU
            nw = cfg.pop("num_warps")
            compile_sm90(fn, sig, {**cfg, **consts}, num_warps=nw, aligned=aligned)

        for dt in ("bf16", "fp32"):
            go(ep._bias_gelu_kernel, {"x_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*" + dt, "T": "i32",
               "Fdim": "i32", "stride_x": "i32", "stride_y": "i32"}, ep._gelu_config())
            for H in (384, 768, 4096):
                go(ep._residual_ln_kernel, {"x_ptr": "*" + dt, "xb_ptr": "*" + dt, "r_ptr": "*" + dt,
                   "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*" + dt, "T": "i32", "H": "i32",
                   "stride_x": "i32", "stride_r": "i32", "stride_y": "i32", "eps": "fp32"}, ep._ln_config(H),
                   HAS_XB=True)
            for wdt in sorted({dt, "fp32"}):
                up = wdt != dt
                go(ep._cls_score_kernel, {"h_ptr": "*" + dt, "cu_ptr": "*i32", "pw_ptr": "*" + wdt,
                   "pb_ptr": "*" + wdt, "cw_ptr": "*" + wdt, "cb_ptr": "*" + wdt, "part_ptr": "*fp32",
                   "B": "i32", "H": "i32", "stride_h": "i32", "stride_pw": "i32"}, ep._cls_config(),
                   UPCAST=up, DOT_PREC="ieee" if up or dt == "fp32" else "tf32")
        # the sweep's candidates, bf16 as a GPU run launches them (aligned buffers and strides)
        for cfg in ep.GELU_CONFIG_CANDIDATES.values():
            go(ep._bias_gelu_kernel, {"x_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "T": "i32",
               "Fdim": "i32", "stride_x": "i32", "stride_y": "i32"}, cfg,
               aligned=("x_ptr", "b_ptr", "y_ptr", "Fdim", "stride_x", "stride_y"))
        for H in (384, 768):
            for cfg in ep.LN_CONFIG_CANDIDATES.values():
                go(ep._residual_ln_kernel, {"x_ptr": "*bf16", "xb_ptr": "*bf16", "r_ptr": "*bf16",
                   "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "T": "i32", "H": "i32",
                   "stride_x": "i32", "stride_r": "i32", "stride_y": "i32", "eps": "fp32"},
                   {**ep._ln_config(H), **cfg}, HAS_XB=True,
                   aligned=("x_ptr", "xb_ptr", "r_ptr", "w_ptr", "b_ptr", "y_ptr", "H", "stride_x",
                            "stride_r", "stride_y"))
    """)
    assert out.count("compiled") == 11 + 4 + 2 * 4
