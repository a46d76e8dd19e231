import pytest
import torch
import torch.nn.functional as F
from sm90 import compile_offline, needs_offline_compiler

from relsum_kernels import linear_gelu, linear_gelu_reference

from conftest import impl_device, rel_err, triton_device

# Output rounding of the dtype; bf16/fp16 inputs also carry their own rounding into the products.
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
IMPLS = ["triton", "torch"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(M, K, N, dtype, device, bias_dtype=None):
    x = torch.randn(M, K).to(device=device, dtype=dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(N).to(device=device, dtype=bias_dtype or dtype)
    return x, w, b


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# ragged tails on every axis (M, N not tile multiples; K = 40 is not a multiple of BLOCK_K), one row
@pytest.mark.parametrize("M, K, N", [(37, 64, 96), (1, 32, 48), (50, 40, 33), (3, 16, 1)])
def test_linear_gelu_matches_reference(impl, dtype, M, K, N):
    x, w, b = _args(M, K, N, dtype, impl_device(impl))
    y = linear_gelu(x, w, b, impl=impl)
    assert y.shape == (M, N) and y.dtype == dtype and y.device == x.device
    err = rel_err(y, linear_gelu_reference(x, w, b))
    assert err < TOL[dtype], f"{impl} {dtype} {(M, K, N)}: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_gelu_is_erf_gelu_of_the_linear_layer(impl):
    dev = impl_device(impl)
    x, w, b = _args(24, 32, 40, torch.float32, dev)
    ref = F.gelu(F.linear(x.double().cpu(), w.double().cpu(), b.double().cpu()))
    torch.testing.assert_close(linear_gelu_reference(x, w, b).cpu(), ref)
    y = linear_gelu(x * 4, w, b, impl=impl)  # large |z|: both tails, no NaN
    assert torch.isfinite(y).all()
    assert rel_err(y, linear_gelu_reference(x * 4, w, b)) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_gelu_batched_strided_and_mixed_bias(impl):
    dev = impl_device(impl)
    big = torch.randn(2, 9, 80, device=dev)
    x = big[..., :64]  # row stride 80: read in place
    w = torch.randn(48, 64, device=dev) / 8
    b = torch.randn(48, device=dev).half()
    y = linear_gelu(x, w, b, impl=impl)
    assert y.shape == (2, 9, 48)
    assert rel_err(y, linear_gelu_reference(x, w, b)) < 1e-6
    wt = torch.randn(64, 48, device=dev).t()  # a transposed weight view gets copied, same result
    assert rel_err(linear_gelu(x, wt, b, impl=impl), linear_gelu_reference(x, wt, b)) < 1e-6


def test_linear_gelu_tile_override_keeps_the_result():
    dev = triton_device()
    x, w, b = _args(45, 64, 70, torch.float32, dev)
    base = linear_gelu(x, w, b, impl="triton")
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
    torch.testing.assert_close(linear_gelu(x, w, b, impl="triton", config=cfg), base, rtol=1e-6, atol=1e-6)


def test_linear_gelu_triton_path_is_forward_only():
    x, w, b = _args(4, 16, 8, torch.float32, triton_device())
    with pytest.raises(RuntimeError, match=r"linear_gelu\(impl='triton'\) is forward only"):
        linear_gelu(x.requires_grad_(), w, b, impl="triton")
    with torch.no_grad():
        linear_gelu(x, w, b, impl="triton")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(x=torch.randn(0, 8)), ValueError, "empty batch"),
        (dict(x=torch.randn(4, 0)), ValueError, "K > 0"),
        (dict(w=torch.randn(6, 7)), ValueError, r"weight must be \[N, 8\]"),
        (dict(w=torch.randn(6)), ValueError, "weight must be"),
        (dict(w=torch.randn(6, 8).half()), TypeError, "must share a dtype"),
        (dict(b=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
        (dict(x=torch.randn(4, 8).long()), TypeError, "x must be float32"),
        (dict(b=None), TypeError, "bias must be a torch.Tensor"),
    ],
)
def test_linear_gelu_bad_inputs(change, exc, match):
    args = dict(x=torch.randn(4, 8), w=torch.randn(6, 8), b=torch.randn(6))
    args.update(change)
    for impl in IMPLS:
        with pytest.raises(exc, match=match):
            linear_gelu(args["x"], args["w"], args["b"], impl=impl)


@needs_offline_compiler
def test_linear_gelu_compiles_for_sm90():
    """The sweep's candidates (bf16) and the launched fp32 configuration compile without spills."""
    out = compile_offline("""
        import torch
        lg = importlib.import_module("relsum_kernels.linear_gelu")
        assert lg.DEFAULT_CONFIG in lg.CONFIG_CANDIDATES
        cases = [("bf16", dict(c)) for c in lg.CONFIG_CANDIDATES.values()]
        cases.append(("fp32", lg._config(384, torch.float32)))
        for dt, cfg in cases:
            nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
            compile_sm90(lg._linear_gelu_kernel,
                         {"x_ptr": "*" + dt, "w_ptr": "*" + dt, "b_ptr": "*" + dt, "y_ptr": "*" + dt,
                          "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                          "stride_ym": "i32"},
                         {**cfg, "EVEN_K": True, "UPCAST": False,
                          "DOT_PREC": "ieee" if dt == "fp32" else "tf32"},
                         num_warps=nw, num_stages=ns,
                         # as launched on BERT shapes: aligned buffers, K, N and strides multiples of 16
                         aligned=("x_ptr", "w_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn",
                                  "stride_ym"))
    """)
    assert out.count("compiled") == 7
