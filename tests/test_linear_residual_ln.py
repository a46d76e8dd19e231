import pytest
import torch
import torch.nn.functional as F
from sm90 import compile_offline, needs_offline_compiler

from relsum_kernels import linear_residual_layernorm, linear_residual_layernorm_reference

from conftest import impl_device, rel_err, triton_device

# Output rounding of the dtype; bf16/fp16 inputs also carry their own rounding into the products.
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
IMPLS = ["triton", "torch"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(M, K, N, dtype, device, vec_dtype=None, shift=0.0):
    x = torch.randn(M, K).to(device=device, dtype=dtype)
    w = (torch.randn(N, K) / K ** 0.5).to(device=device, dtype=dtype)
    res = (torch.randn(M, N) + shift).to(device=device, dtype=dtype)
    b, g, beta = (torch.randn(N).to(device=device, dtype=vec_dtype or dtype) for _ in range(3))
    return x, w, b, res, g, beta


# Under the interpreter a program walks 32-column tiles: N 96 is three full tiles, 80 ends on a ragged
# one, 20 and 1 fit in one (normalised in registers); K 40 is not a multiple of BLOCK_K; one row.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, K, N", [(37, 64, 96), (1, 32, 48), (50, 40, 80), (3, 16, 20), (5, 24, 1)])
def test_linear_residual_ln_matches_reference(impl, dtype, M, K, N):
    args = _args(M, K, N, dtype, impl_device(impl))
    y = linear_residual_layernorm(*args, eps=1e-5, impl=impl)
    assert y.shape == (M, N) and y.dtype == dtype and y.device == args[0].device
    ref = linear_residual_layernorm_reference(*args, eps=1e-5)
    if N == 1:  # a one-wide row normalises to 0: the output is ln_bias
        torch.testing.assert_close(y.double().cpu(), ref.cpu(), rtol=TOL[dtype], atol=TOL[dtype])
        return
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"{impl} {dtype} {(M, K, N)}: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_is_bert_dense_add_and_norm(impl):
    """The fp64 reference is LayerNorm(Linear(x) + residual); the kernel keeps rows whose mean
    dwarfs their spread exact (the tile-by-tile statistics do not cancel)."""
    dev = impl_device(impl)
    x, w, b, res, g, beta = _args(24, 32, 96, torch.float32, dev)
    ref = F.layer_norm(F.linear(x.double(), w.double(), b.double()) + res.double(), (96,), g.double(),
                       beta.double(), 1e-12)
    torch.testing.assert_close(linear_residual_layernorm_reference(x, w, b, res, g, beta).cpu(), ref.cpu())
    x, w, b, res, g, beta = _args(24, 32, 96, torch.float32, dev, shift=1e4)
    y = linear_residual_layernorm(x, w, b, res, g, beta, impl=impl)
    # fp32 holds values near 1e4 to ~1e-3, which is what the normalised rows can keep
    assert rel_err(y, linear_residual_layernorm_reference(x, w, b, res, g, beta)) < 5e-3


def test_tile_walk_matches_one_tile():
    """The same rows normalised in registers (one tile spans N) and through parked tiles agree."""
    dev = triton_device()
    x, w, b, res, g, beta = _args(45, 64, 96, torch.float32, dev)
    walked = linear_residual_layernorm(x, w, b, res, g, beta, impl="triton",
                                       config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4,
                                                   num_stages=1))
    one = linear_residual_layernorm(x, w, b, res, g, beta, impl="triton",
                                    config=dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, num_warps=4,
                                                num_stages=1))
    torch.testing.assert_close(walked, one, rtol=1e-6, atol=1e-6)
    assert rel_err(one, linear_residual_layernorm_reference(x, w, b, res, g, beta)) < 1e-6


WALK = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)  # N 96: three parked tiles


# Parked tiles hold z minus the first tile's row mean: a 16-bit output must neither round a large row
# mean into them (bf16 at 200 lost 0.7) nor overflow (fp16 past 65504).
@pytest.mark.parametrize("dtype, shift", [(torch.bfloat16, 200.0), (torch.float16, 200.0),
                                          (torch.float16, 7e4)])
def test_tile_walk_keeps_large_mean_rows(dtype, shift):
    x, w, b, res, g, beta = _args(16, 32, 96, dtype, triton_device(), vec_dtype=torch.float32)
    b = b * 4 + shift  # an fp32 bias: the mean lives in z, not in rounded inputs
    ref = linear_residual_layernorm_reference(x, w, b, res, g, beta)
    y = linear_residual_layernorm(x, w, b, res, g, beta, impl="triton", config=WALK)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype]


def test_triton_path_is_forward_only():
    x, w, b, res, g, beta = _args(4, 16, 8, torch.float32, triton_device())
    with pytest.raises(RuntimeError, match=r"linear_residual_layernorm\(impl='triton'\) is forward only"):
        linear_residual_layernorm(x, w.requires_grad_(), b, res, g, beta, impl="triton")
    with torch.no_grad():
        linear_residual_layernorm(x, w, b, res, g, beta, impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_strided_and_mixed_vectors(impl):
    dev = impl_device(impl)
    big = torch.randn(2, 9, 80, device=dev)
    x = big[..., :64]  # row stride 80: read in place
    w = torch.randn(48, 64, device=dev) / 8
    res = torch.randn(2, 9, 50, device=dev)[..., :48]
    b, g, beta = (torch.randn(48, device=dev).half() for _ in range(3))
    y = linear_residual_layernorm(x, w, b, res, g, beta, impl=impl)
    assert y.shape == (2, 9, 48)
    assert rel_err(y, linear_residual_layernorm_reference(x, w, b, res, g, beta)) < 1e-6
    wt = torch.randn(64, 48, device=dev).t()  # a transposed weight view gets copied, same result
    assert rel_err(linear_residual_layernorm(x, wt, b, res, g, beta, impl=impl),
                   linear_residual_layernorm_reference(x, wt, b, res, g, beta)) < 1e-6


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(x=torch.randn(0, 8), r=torch.randn(0, 6)), ValueError, "empty batch"),
        (dict(x=torch.randn(4, 0)), ValueError, "K > 0"),
        (dict(w=torch.randn(6, 7)), ValueError, r"weight must be \[N, 8\]"),
        (dict(w=torch.randn(6, 8).half()), TypeError, "must share a dtype"),
        (dict(r=torch.randn(4, 5)), ValueError, r"residual must have shape \(4, 6\)"),
        (dict(r=torch.randn(4, 6).half()), TypeError, r"residual \(torch.float16\) must share"),
        (dict(b=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
        (dict(g=torch.randn(5)), ValueError, r"ln_weight must have shape \(6,\)"),
        (dict(beta=None), TypeError, "ln_bias must be a torch.Tensor"),
        (dict(x=torch.randn(4, 8).long()), TypeError, "x must be float32"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    ],
)
def test_bad_inputs(change, exc, match):
    args = dict(x=torch.randn(4, 8), w=torch.randn(6, 8), b=torch.randn(6), r=torch.randn(4, 6),
                g=torch.randn(6), beta=torch.randn(6), eps=1e-12)
    args.update(change)
    for impl in IMPLS:
        with pytest.raises(exc, match=match):
            linear_residual_layernorm(args["x"], args["w"], args["b"], args["r"], args["g"], args["beta"],
                                      eps=args["eps"], impl=impl)


def test_sweep_candidates_follow_the_width():
    from relsum_kernels.linear_residual_ln import CONFIG_CANDIDATES, DEFAULT_CONFIG, sweep_candidates

    assert sweep_candidates(384) == CONFIG_CANDIDATES
    wide = sweep_candidates(768)
    assert DEFAULT_CONFIG in wide and all(c["BLOCK_N"] < 512 for c in wide.values())


@needs_offline_compiler
def test_compiles_for_sm90():
    """The sweep's candidates (bf16) at MiniLM's width 384 and BERT-base's 768, and the launched fp32
    configuration, compile without spills."""
    out = compile_offline("""
        import torch
        m = importlib.import_module("relsum_kernels.linear_residual_ln")
        assert m.DEFAULT_CONFIG in m.CONFIG_CANDIDATES
        cases = [("bf16", dict(c), N <= c["BLOCK_N"])
                 for N in (384, 768) for c in m.sweep_candidates(N).values()]
        cases.append(("fp32", m._config(384, torch.float32), False))
        for dt, cfg, one_tile in cases:
            nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
            ptrs = ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "g_ptr", "beta_ptr", "y_ptr")
            compile_sm90(m._linear_residual_ln_kernel,
                         {**{p: "*" + dt for p in ptrs}, "M": "i32", "N": "i32", "K": "i32",
                          "stride_xm": "i32", "stride_wn": "i32", "stride_rm": "i32", "stride_ym": "i32",
                          "eps": "fp32"},
                         {**cfg, "ONE_TILE": one_tile, "EVEN_K": True, "UPCAST": False,
                          "DOT_PREC": "ieee" if dt == "fp32" else "tf32"},
                         num_warps=nw, num_stages=ns,
                         # as launched on BERT shapes: aligned buffers, K, N and strides multiples of 16
                         aligned=ptrs + ("N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_ym"))
    """)
    assert out.count("compiled") == 6 + 4 + 1
