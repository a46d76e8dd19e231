import pytest
import torch
import torch.nn.functional as F
from sm90 import compile_offline, needs_offline_compiler

from relsum_kernels import fused_ffn, fused_ffn_reference

from conftest import impl_device, rel_err, triton_device

# Output rounding of the dtype; 16-bit runs also round the GELU output (the down-projection's operand)
TOL = {torch.float32: 1e-6, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
IMPLS = ["triton", "torch"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(M, H, inter, dtype, device, vec_dtype=None):
    x = torch.randn(M, H).to(device=device, dtype=dtype)
    w1 = (torch.randn(inter, H) / H ** 0.5).to(device=device, dtype=dtype)
    w2 = (torch.randn(H, inter) / inter ** 0.5).to(device=device, dtype=dtype)
    b1 = torch.randn(inter).to(device=device, dtype=vec_dtype or dtype)
    b2, g, beta = (torch.randn(H).to(device=device, dtype=vec_dtype or dtype) for _ in range(3))
    return x, w1, b1, w2, b2, g, beta


# The row accumulator is 1-4 tiles (H 16 -> one, 64 -> four of 16, 100 -> four of 32, the last ragged);
# the intermediate width is walked in 32-column tiles under the interpreter (70: a ragged last one);
# H 40 is not a multiple of BLOCK_K; one row.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, H, inter", [(37, 64, 96), (5, 100, 70), (20, 40, 64), (1, 16, 32), (9, 384, 64)])
def test_fused_ffn_matches_reference(impl, dtype, M, H, inter):
    args = _args(M, H, inter, dtype, impl_device(impl))
    y = fused_ffn(*args, eps=1e-5, impl=impl)
    assert y.shape == (M, H) and y.dtype == dtype and y.device == args[0].device
    err = rel_err(y, fused_ffn_reference(*args, eps=1e-5))
    assert err < TOL[dtype], f"{impl} {dtype} {(M, H, inter)}: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_is_bert_output_block(impl):
    """The reference is LayerNorm(Linear2(gelu(Linear1(x))) + x), as HF's BertIntermediate +
    BertOutput compute it; the kernel keeps rows whose mean dwarfs their spread."""
    x, w1, b1, w2, b2, g, beta = _args(24, 64, 96, torch.float32, impl_device(impl))
    xd = x.double()
    u = F.gelu(F.linear(xd, w1.double(), b1.double()))
    want = F.layer_norm(F.linear(u, w2.double(), b2.double()) + xd, (64,), g.double(), beta.double(), 1e-12)
    torch.testing.assert_close(fused_ffn_reference(x, w1, b1, w2, b2, g, beta).cpu(), want.cpu())
    x = x + 1e4
    y = fused_ffn(x, w1, b1, w2, b2, g, beta, impl=impl)
    assert rel_err(y, fused_ffn_reference(x, w1, b1, w2, b2, g, beta)) < 5e-3


def test_tile_override_keeps_the_result():
    dev = triton_device()
    args = _args(45, 96, 80, torch.float32, dev)
    base = fused_ffn(*args, impl="triton")
    cfg = dict(BLOCK_M=32, BLOCK_I=16, BLOCK_K=32, BLOCK_H=32, num_warps=4, num_stages=1)
    torch.testing.assert_close(fused_ffn(*args, impl="triton", config=cfg), base, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="BLOCK_H 16 needs 6 row tiles for H 96"):
        fused_ffn(*args, impl="triton", config={**cfg, "BLOCK_H": 16})


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_strided_and_mixed_vectors(impl):
    dev = impl_device(impl)
    x = torch.randn(2, 9, 80, device=dev)[..., :64]  # row stride 80: read in place
    w1 = torch.randn(96, 64, device=dev) / 8
    w2 = torch.randn(96, 64, device=dev).t() / 10  # a transposed view gets copied
    b1 = torch.randn(96, device=dev).half()
    b2, g, beta = (torch.randn(64, device=dev).half() for _ in range(3))
    y = fused_ffn(x, w1, b1, w2, b2, g, beta, impl=impl)
    assert y.shape == (2, 9, 64)
    assert rel_err(y, fused_ffn_reference(x, w1, b1, w2, b2, g, beta)) < 1e-6


def test_triton_path_is_forward_only():
    x, w1, b1, w2, b2, g, beta = _args(4, 16, 32, torch.float32, triton_device())
    with pytest.raises(RuntimeError, match=r"fused_ffn\(impl='triton'\) is forward only"):
        fused_ffn(x, w1, b1, w2, b2, g.requires_grad_(), beta, impl="triton")
    with torch.no_grad():
        fused_ffn(x, w1, b1, w2, b2, g, beta, impl="triton")


def test_triton_takes_at_most_512_wide_rows():
    args = _args(3, 520, 32, torch.float32, triton_device())
    with pytest.raises(ValueError, match="H <= 512, got 520"):
        fused_ffn(*args, impl="triton")
    assert rel_err(fused_ffn(*[a.cpu() for a in args], impl="torch"), fused_ffn_reference(*args)) < 1e-6


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(x=torch.randn(0, 8)), ValueError, "empty batch"),
        (dict(x=torch.randn(4, 0)), ValueError, "H > 0"),
        (dict(w1=torch.randn(12, 7)), ValueError, r"w1 must be \[I, 8\]"),
        (dict(w2=torch.randn(8, 11)), ValueError, r"w2 must have shape \(8, 12\)"),
        (dict(w2=torch.randn(8, 12).half()), TypeError, r"w2 \(torch.float16\) must share a dtype"),
        (dict(b1=torch.randn(8)), ValueError, r"b1 must have shape \(12,\)"),
        (dict(b2=torch.randn(12)), ValueError, r"b2 must have shape \(8,\)"),
        (dict(g=None), TypeError, "ln_weight must be a torch.Tensor"),
        (dict(x=torch.randn(4, 8).long()), TypeError, "x must be float32"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
    ],
)
def test_bad_inputs(change, exc, match):
    args = dict(x=torch.randn(4, 8), w1=torch.randn(12, 8), b1=torch.randn(12), w2=torch.randn(8, 12),
                b2=torch.randn(8), g=torch.randn(8), beta=torch.randn(8), eps=1e-12)
    args.update(change)
    for impl in IMPLS:
        with pytest.raises(exc, match=match):
            fused_ffn(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], args["g"], args["beta"],
                      eps=args["eps"], impl=impl)


@needs_offline_compiler
def test_compiles_for_sm90():
    """The sweep's candidates (bf16) at MiniLM's H 384 (three row tiles) and at H 512 (four), and
    the launched fp32 configuration, compile without spills."""
    out = compile_offline("""
        import torch
        m = importlib.import_module("relsum_kernels.fused_ffn")
        assert m.DEFAULT_CONFIG in m.CONFIG_CANDIDATES
        cases = [("bf16", dict(c), H) for H in (384, 512) for c in m.CONFIG_CANDIDATES.values()]
        cases += [("fp32", m._config(384, torch.float32), 384)]
        for dt, cfg, H in cases:
            nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
            ptrs = ("x_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "g_ptr", "beta_ptr", "y_ptr")
            bh = m._chunk_width(H)
            compile_sm90(m._fused_ffn_kernel,
                         {**{p: "*" + dt for p in ptrs}, "M": "i32", "H": "i32", "I": "i32",
                          "stride_xm": "i32", "stride_w1": "i32", "stride_w2": "i32", "stride_ym": "i32",
                          "eps": "fp32"},
                         {**cfg, "BLOCK_H": bh, "N_CHUNKS": -(-H // bh), "EVEN_K": True, "UPCAST": False,
                          "DOT_PREC": "ieee" if dt == "fp32" else "tf32"},
                         num_warps=nw, num_stages=ns,
                         # as launched on BERT shapes: aligned buffers, sizes and strides multiples of 16
                         aligned=ptrs + ("H", "I", "stride_xm", "stride_w1", "stride_w2", "stride_ym"))
    """)
    assert out.count("compiled") == 2 * 5 + 1
