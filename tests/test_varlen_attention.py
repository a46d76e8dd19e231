import importlib

import pytest
import torch
import torch.nn.functional as F
from sm90 import compile_offline, needs_offline_compiler

from relsum_kernels import varlen_attention, varlen_attention_reference

from conftest import impl_device, rel_err, triton_device

# The package re-exports the function under the module's name, so fetch the module itself.
va_mod = importlib.import_module("relsum_kernels.varlen_attention")

# Relative-norm tolerances against fp64: outputs come back in the input dtype (bf16 keeps 8 bits).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["triton", "torch"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cu(lens, device="cpu"):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu.to(device)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _qkv(lens, H, D, dtype, device="cpu"):
    T = sum(lens)
    return tuple(torch.randn(T, H, D, device=device).to(dtype) for _ in range(3))


def _check(impl, lens, H, D, dtype, *, scale=None):
    dev = impl_device(impl)
    q, k, v = _qkv(lens, H, D, dtype, dev)
    cu = _cu(lens, dev)
    out = varlen_attention(q, k, v, cu, max(lens), softmax_scale=scale, impl=impl)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    ref = varlen_attention_reference(q, k, v, cu, softmax_scale=scale)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{impl} {dtype} lens={lens} D={D}: rel err {err:.2e}"
    return out, ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64])
def test_ragged_batch_matches_reference(impl, dtype, D):
    # 1 and tile-edge lengths (16, 17, 33 around the interpreter's 16/32 tiles), one empty sequence.
    _check(impl, [1, 17, 33, 5, 0, 40, 16], 2, D, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequences_up_to_512(impl, dtype):
    _check(impl, [512, 1, 300, 7], 1, 16, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", [16, 20, 128])
def test_other_head_dims(impl, D):
    # 20 is not a power of two: the kernel masks the head dim.
    _check(impl, [3, 19, 1], 2, D, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_sequence(impl):
    _check(impl, [77], 3, 32, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_length_one_is_identity_on_v(impl):
    dev = impl_device(impl)
    q, k, v = _qkv([1] * 5, 2, 32, torch.float32, dev)
    out = varlen_attention(q, k, v, _cu([1] * 5, dev), 1, impl=impl)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_scale_and_loose_max_seqlen(impl):
    lens = [9, 30, 2]
    dev = impl_device(impl)
    q, k, v = _qkv(lens, 2, 32, torch.float32, dev)
    cu = _cu(lens, dev)
    # max_seqlen above the true maximum only sizes the grid bigger.
    out = varlen_attention(q, k, v, cu, 64, softmax_scale=0.5, impl=impl)
    ref = varlen_attention_reference(q, k, v, cu, softmax_scale=0.5)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, varlen_attention_reference(q, k, v, cu)) > 1e-2  # the scale mattered


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views_of_fused_qkv(impl):
    lens = [5, 33, 12]
    dev = impl_device(impl)
    H, D = 2, 32
    qkv = torch.randn(sum(lens), 3, H, D, device=dev)
    q, k, v = qkv.unbind(1)  # token stride 3*H*D: no copies needed
    cu = _cu(lens, dev)
    out = varlen_attention(q, k, v, cu, 33, impl=impl)
    ref = varlen_attention_reference(q, k, v, cu)
    assert rel_err(out, ref) < 1e-5
    # Non-unit head_dim stride works too (copied internally on the Triton path).
    qt = torch.randn(sum(lens), H, D, device=dev).transpose(0, 1).contiguous().transpose(0, 1)
    qd = torch.randn(sum(lens), D, H, device=dev).transpose(1, 2)
    out2 = varlen_attention(qt, k, qd, cu, 33, impl=impl)
    assert rel_err(out2, varlen_attention_reference(qt, k, qd, cu)) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_sequences_do_not_leak(impl):
    # Changing one sequence's keys must leave every other sequence's output untouched.
    lens = [4, 9, 6]
    dev = impl_device(impl)
    q, k, v = _qkv(lens, 2, 32, torch.float32, dev)
    cu = _cu(lens, dev)
    a = varlen_attention(q, k, v, cu, 9, impl=impl)
    k2 = k.clone()
    k2[4:13] += 5.0
    b = varlen_attention(q, k2, v, cu, 9, impl=impl)
    assert torch.equal(a[:4], b[:4]) and torch.equal(a[13:], b[13:])
    assert not torch.allclose(a[4:13], b[4:13])


def test_torch_path_buckets_instead_of_looping(monkeypatch):
    # 600 sequences of lengths 1..64 must take a handful of SDPA calls, not one per sequence.
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(va_mod.F, "scaled_dot_product_attention", counting)
    lens = torch.randint(1, 65, (600,)).tolist()
    q, k, v = _qkv(lens, 1, 16, torch.float32)
    cu = _cu(lens)
    out = varlen_attention(q, k, v, cu, max(lens), impl="torch")
    assert 1 < len(calls) <= 15, len(calls)
    assert sum(s[0] for s in calls) == 600
    assert rel_err(out, varlen_attention_reference(q, k, v, cu)) < 1e-5


def test_torch_path_chunks_big_buckets(monkeypatch):
    monkeypatch.setattr(va_mod, "TORCH_SCORE_ELEMS", 2 * 40 * 40)
    lens = [40] * 7 + [38, 3]
    _check("torch", lens, 1, 16, torch.float32)


def test_length_buckets_bound_padding():
    lens = sorted(torch.randint(1, 513, (1000,)).tolist())
    buckets = va_mod._length_buckets(lens)
    assert buckets[0][0] == 0 and buckets[-1][1] == len(lens)
    assert all(a[1] == b[0] for a, b in zip(buckets[:-1], buckets[1:]))
    for i0, i1 in buckets:
        lo, hi = lens[i0], lens[i1 - 1]
        assert hi <= lo + max(va_mod.BUCKET_SLACK, int(lo * va_mod.BUCKET_RATIO))
    assert len(buckets) <= 30


@pytest.mark.parametrize("impl", IMPLS)
def test_host_copy_is_cached_until_cu_seqlens_changes(impl):
    # On CUDA one host copy per cu_seqlens serves every layer (on the CPU a read costs no sync, so
    # there is no cache); an in-place edit must be seen again.
    lens = [3, 8, 5]
    dev = impl_device(impl)
    q, k, v = _qkv(lens, 2, 32, torch.float32, dev)
    cu = _cu(lens, dev)
    first = va_mod._host_seqlens(cu)
    assert (va_mod._host_seqlens(cu) is first) == cu.is_cuda
    a = varlen_attention(q, k, v, cu, 8, impl=impl)
    assert torch.equal(a, varlen_attention(q, k, v, cu, 8, impl=impl))
    cu[1] = 6  # lengths 6, 5, 5: same total, different split
    assert va_mod._host_seqlens(cu) is not first
    out = varlen_attention(q, k, v, cu, 8, impl=impl)
    assert rel_err(out, varlen_attention_reference(q, k, v, cu)) < 1e-5
    cu[1] = 12  # now decreasing: the stale copy must not hide it
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, cu, 8, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_cu_seqlens_is_read_every_call(impl):
    # A numpy alias writes without bumping the version counter: a cached host copy would go stale.
    import numpy as np

    if impl_device(impl) != "cpu":
        pytest.skip("a CUDA cu_seqlens is cached by its version counter (documented)")
    q, k, v = _qkv([4, 6], 2, 16, torch.float32)
    arr = np.array([0, 4, 10], dtype=np.int32)
    cu = torch.from_numpy(arr)
    varlen_attention(q, k, v, cu, 6, impl=impl)
    arr[1] = 7
    with pytest.raises(ValueError, match="below the longest"):
        varlen_attention(q, k, v, cu, 6, impl=impl)
    out = varlen_attention(q, k, v, cu, 7, impl=impl)
    assert rel_err(out, varlen_attention_reference(q, k, v, cu)) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_cu_seqlens(impl):
    # A strided view passes validation; the kernels must not read it with unit stride.
    lens = [3, 4, 3]
    dev = impl_device(impl)
    q, k, v = _qkv(lens, 2, 16, torch.float32, dev)
    cu = _cu(lens, dev).repeat_interleave(2)[::2]
    assert not cu.is_contiguous()
    out = varlen_attention(q, k, v, cu, 4, impl=impl)
    assert rel_err(out, varlen_attention_reference(q, k, v, cu)) < TOL[torch.float32]


def test_triton_path_is_forward_only():
    # The Triton output has no grad_fn: refuse to hand it to autograd instead of training silently
    # without gradients; no_grad / inference_mode callers and the torch path are fine.
    lens = [3, 5]
    dev = impl_device("triton")
    q, k, v = _qkv(lens, 2, 16, torch.float32, dev)
    cu = _cu(lens, dev)
    with pytest.raises(RuntimeError, match=r"varlen_attention\(impl='triton'\) is forward only.*'torch'"):
        varlen_attention(q.requires_grad_(), k, v, cu, 5, impl="triton")
    with torch.no_grad():
        varlen_attention(q, k, v, cu, 5, impl="triton")
    with torch.inference_mode():
        varlen_attention(q, k, v, cu, 5, impl="triton")
    out = varlen_attention(q.detach().cpu().requires_grad_(), k.cpu(), v.cpu(), cu.cpu(), 5, impl="torch")
    assert out.grad_fn is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_inference_mode_tensors(impl):
    # Inference tensors carry no version counter: every call must read cu_seqlens afresh.
    lens = [3, 8, 5]
    dev = impl_device(impl)
    with torch.inference_mode():
        q, k, v = _qkv(lens, 2, 32, torch.float32, dev)
        cu = _cu(lens, dev)
        for first_len in (3, 6):  # same total, different split the second time
            cu[1] = first_len
            out = varlen_attention(q, k, v, cu, 8, impl=impl)
            assert rel_err(out, varlen_attention_reference(q, k, v, cu)) < 1e-5
        cu[1] = 12
        with pytest.raises(ValueError, match="non-decreasing"):
            varlen_attention(q, k, v, cu, 8, impl=impl)


def test_torch_path_backward_after_an_inference_call_on_the_same_batch():
    # The bucket plan is cached by cu_seqlens; one built under inference_mode must not serve autograd.
    lens = [3, 8, 5]
    q, k, v = _qkv(lens, 2, 32, torch.float32)
    cu = _cu(lens)
    with torch.inference_mode():
        varlen_attention(q, k, v, cu, 8, impl="torch")
    q.requires_grad_(True)
    varlen_attention(q, k, v, cu, 8, impl="torch").sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_fused_qkv_detection():
    qkv = torch.randn(10, 3, 2, 4)
    q, k, v = qkv.unbind(1)
    rows = va_mod._fused_qkv_rows(q, k, v)
    assert rows is not None and torch.equal(rows, qkv.reshape(10, 24))
    assert va_mod._fused_qkv_rows(*qkv[3:].unbind(1)) is not None  # a slice of the stream too
    assert va_mod._fused_qkv_rows(q.clone(), k, v) is None
    assert va_mod._fused_qkv_rows(q, v, k) is None
    kv = torch.randn(10, 2, 2, 4)
    assert va_mod._fused_qkv_rows(q, *kv.unbind(1)) is None


def test_auto_uses_torch_on_cpu():
    lens = [3, 8]
    q, k, v = _qkv(lens, 2, 32, torch.float32)
    cu = _cu(lens)
    assert torch.equal(varlen_attention(q, k, v, cu, 8), varlen_attention(q, k, v, cu, 8, impl="torch"))


def test_int64_cu_seqlens_accepted():
    lens = [3, 8]
    dev = impl_device("triton")
    q, k, v = _qkv(lens, 2, 32, torch.float32, dev)
    for impl in IMPLS:
        q, k, v = (t.to(impl_device(impl)) for t in (q, k, v))
        out = varlen_attention(q, k, v, _cu(lens, q.device).long(), 8, impl=impl)
        assert rel_err(out, varlen_attention_reference(q, k, v, _cu(lens))) < 1e-5


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda q, k, v, cu: (q, k, v, _i32([1, 4, 10]), 6), ValueError, "start at 0"),
        (lambda q, k, v, cu: (q, k, v, _i32([0, 4, 9]), 6), ValueError, "end at"),
        (lambda q, k, v, cu: (q, k, v, _i32([0, 7, 4, 10]), 7), ValueError, "non-decreasing"),
        (lambda q, k, v, cu: (q, k, v, cu.float(), 6), TypeError, "int32"),
        (lambda q, k, v, cu: (q, k, v, cu[None], 6), ValueError, "1-D"),
        (lambda q, k, v, cu: (q, k, v, _i32([0]), 6), ValueError, "empty batch"),
        (lambda q, k, v, cu: (q, k, v, [0, 4, 10], 6), TypeError, "cu_seqlens must be a torch.Tensor"),
        (lambda q, k, v, cu: (q, k, v, cu, 5), ValueError, "below the longest"),
        (lambda q, k, v, cu: (q, k, v, cu, 0), ValueError, "max_seqlen"),
        (lambda q, k, v, cu: (q, k, v, cu, 6.0), ValueError, "max_seqlen"),
        (lambda q, k, v, cu: (q, k.half(), v, cu, 6), TypeError, "share a dtype"),
        (lambda q, k, v, cu: (q, k[:, :1], v, cu, 6), ValueError, "share a shape"),
        (lambda q, k, v, cu: (q[:, 0], k[:, 0], v[:, 0], cu, 6), ValueError, "total_tokens, n_heads"),
        (lambda q, k, v, cu: (q.long(), k, v, cu, 6), TypeError, "float32, float16 or bfloat16"),
        (lambda q, k, v, cu: (q[:0], k[:0], v[:0], torch.zeros(2, dtype=torch.int32), 1), ValueError,
         "empty batch"),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise(make, exc, match, impl):
    q, k, v = _qkv([4, 6], 2, 32, torch.float32)
    args = make(q, k, v, _cu([4, 6]))
    with pytest.raises(exc, match=match):
        varlen_attention(*args, impl=impl)


def test_head_dim_limit_and_bad_impl():
    q, k, v = _qkv([4, 6], 1, 256, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be <= 128"):
        varlen_attention(q, k, v, _cu([4, 6]), 6)
    q, k, v = _qkv([4, 6], 1, 32, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        varlen_attention(q, k, v, _cu([4, 6]), 6, impl="flash")
    with pytest.raises(ValueError, match="softmax_scale"):
        varlen_attention(q, k, v, _cu([4, 6]), 6, softmax_scale=float("nan"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_raises():
    q, k, v = _qkv([4, 6], 2, 32, torch.float32, "cuda")
    with pytest.raises(ValueError, match="cu_seqlens is on"):
        varlen_attention(q, k, v, _cu([4, 6]), 6)
    with pytest.raises(ValueError, match="one device"):
        varlen_attention(q, k.cpu(), v, _cu([4, 6], "cuda"), 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_triton_matches_torch_sdpa_on_larger_batch(dtype):
    lens = torch.randint(24, 97, (256,)).tolist() + [512, 1]
    _check("triton", lens, 12, 32, dtype)
    _check("torch", lens, 12, 64, dtype)


@needs_offline_compiler
def test_kernel_compiles_for_sm90():
    """The configurations varlen_attention launches on a GPU, and every tile shape the GPU benchmark
    sweeps (CONFIG_CANDIDATES, bf16 at head dims 32 and 64), compile for sm_90 without spills."""
    out = compile_offline("""
        import torch
        va = importlib.import_module("relsum_kernels.varlen_attention")
        strides = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                   "stride_ot", "stride_oh")
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        launched = ((torch.bfloat16, 32, 96), (torch.bfloat16, 64, 512), (torch.float16, 128, 512),
                    (torch.float32, 64, 96))
        cases = [(dtype, va._triton_config(max_seqlen, D, dtype)) for dtype, D, max_seqlen in launched]
        cases += [(torch.bfloat16, {**({} if c.get("SHORT") else {"SPLIT_TAIL": True}), **c, "BLOCK_D": D})
                  for D in (32, 64) for c in va.CONFIG_CANDIDATES.values()]
        # as a real launch specialises them: aligned buffers, head_dim and strides multiples of 16
        aligned = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "cu_ptr", "head_dim", *strides)
        for dtype, cfg in cases:
            dt = names[dtype]
            cfg = dict(cfg)
            nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
            sig = {"q_ptr": "*" + dt, "k_ptr": "*" + dt, "v_ptr": "*" + dt, "o_ptr": "*" + dt,
                   "cu_ptr": "*i32", "n_heads": "i32", "head_dim": "i32", "qk_scale": "fp32",
                   **{s: "i32" for s in strides}}
            consts = {**cfg, "UPCAST": False, "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32"}
            if consts.pop("SHORT", False):  # the one-key-tile kernel at the 24-96 rows' key tile
                del sig["n_heads"]
                compile_sm90(va._varlen_attn_short_kernel, sig, {**consts, "BLOCK_N": va.SHORT_MAX_SEQLEN},
                             num_warps=nw, num_stages=ns, aligned=aligned)
            else:
                compile_sm90(va._varlen_attn_fwd_kernel, sig, consts, num_warps=nw, num_stages=ns,
                             aligned=aligned)
    """)
    assert out.count("compiled") == 4 + 2 * len(va_mod.CONFIG_CANDIDATES)


@pytest.mark.parametrize("name", list(va_mod.CONFIG_CANDIDATES))
def test_config_override_keeps_the_result(name):
    """Every tile shape the GPU benchmark sweeps changes only the tiling (interpreter, fp32, ragged
    lengths within the one-key-tile kernel's limit)."""
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([1, 37, 70, 5])
    dev = triton_device()  # CPU tensors only under the interpreter: a GPU run launches for real
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).to(torch.int32)]).to(dev)
    q, k, v = (torch.randn(int(cu[-1]), 2, 16, generator=g).to(dev) for _ in range(3))
    got = va_mod._triton_varlen(q, k, v, cu, int(lens.max()), 0.25, config=va_mod.CONFIG_CANDIDATES[name])
    ref = varlen_attention_reference(q, k, v, cu, softmax_scale=0.25)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ one-key-tile kernel (a sweep candidate)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, heads", [(32, 4), (64, 2), (16, 3)])  # 3 of 4 heads falls back to 2 (a divisor)
def test_short_kernel_matches_reference(dtype, D, heads):
    dev = triton_device()
    lens = [1, 17, 33, 5, 0, 40, 16, 128]  # an empty sequence and one that fills the key tile
    q, k, v = _qkv(lens, 4, D, dtype, dev)
    cu = _cu(lens, dev)
    out = va_mod._triton_varlen(q, k, v, cu, max(lens), D ** -0.5,
                                config=dict(SHORT=True, HEADS=heads, BLOCK_M=32))
    err = rel_err(out, varlen_attention_reference(q, k, v, cu))
    assert err < TOL[dtype], f"{dtype} D={D} heads={heads}: rel err {err:.2e}"


def test_short_kernel_reads_fused_qkv_views_and_checks_its_limit():
    dev = triton_device()
    lens = [7, 60, 2]
    qkv = torch.randn(sum(lens), 3, 6, 16, device=dev)
    q, k, v = qkv.unbind(1)  # token stride 3 * 6 * 16
    cu = _cu(lens, dev)
    cfg = dict(SHORT=True, HEADS=3, BLOCK_M=16)
    out = va_mod._triton_varlen(q, k, v, cu, 60, 0.25, config=dict(cfg))
    ref = varlen_attention_reference(q, k, v, cu, softmax_scale=0.25)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_seqlen <= 128"):
        va_mod._triton_varlen_short(q, k, v, torch.empty_like(q), cu, 129, 0.25, dict(cfg), True)


def test_public_config_picks_the_short_kernel_only_where_it_fits(monkeypatch):
    dev = triton_device()
    calls = []
    real = va_mod._triton_varlen_short
    monkeypatch.setattr(va_mod, "_triton_varlen_short", lambda *a: calls.append(a[5]) or real(*a))
    cfg = va_mod.CONFIG_CANDIDATES["short_m32_h4_w2"]
    for lens in ([5, 100, 1], [5, 130, 1]):
        q, k, v = _qkv(lens, 4, 16, torch.float32, dev)
        cu = _cu(lens, dev)
        out = varlen_attention(q, k, v, cu, max(lens), impl="triton", config=cfg)
        assert rel_err(out, varlen_attention_reference(q, k, v, cu)) < TOL[torch.float32]
    assert calls == [100]  # the 130-token batch ran the default tiles
    assert cfg["SHORT"] and cfg["HEADS"] == 4  # the caller's dict is left as it was


def test_tile_configs_are_checked_by_name_and_by_value():
    from relsum_kernels.varlen_attention import CONFIG_CANDIDATES, resolve_config

    assert resolve_config(None) is None
    assert resolve_config("short_m64_h4_w4") == CONFIG_CANDIDATES["short_m64_h4_w4"]
    assert resolve_config({"BLOCK_M": 32}) == {"BLOCK_M": 32}
    for bad, message in [("m64_n64", "unknown attention config 'm64_n64'"),
                         ({"BLOCK_Q": 64}, r"unknown attention config keys \['BLOCK_Q'\]"),
                         ({"BLOCK_M": 48}, "BLOCK_M must be a power of two >= 16"),
                         ({"BLOCK_N": 8}, "BLOCK_N must be a power of two >= 16"),
                         ({"num_warps": 3}, "num_warps must be a power of two"),
                         ({"HEADS": 0}, "HEADS must be a positive int"),
                         ({"num_stages": 2.0}, "num_stages must be a positive int"),
                         ({"SHORT": 1}, "SHORT must be True or False"),
                         ({"HEADS": 4}, r"keys \['HEADS'\] do not apply to the tiled kernel"),
                         ({"SHORT": True, "BLOCK_N": 64}, r"\['BLOCK_N'\] do not apply to the one-key-tile")]:
        with pytest.raises(ValueError, match=message):
            resolve_config(bad)
    with pytest.raises(TypeError, match="got tuple"):
        resolve_config(("BLOCK_M", 64))
    # the public entry point checks it too, also on the torch path that ignores it
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown attention config keys"):
        varlen_attention(q, q, q, cu, 3, impl="torch", config={"block_m": 64})


def test_tile_config_values_are_checked_strictly_and_candidates_copied():
    from relsum_kernels.varlen_attention import CONFIG_CANDIDATES, resolve_config

    with pytest.raises(ValueError, match="HEADS must be a positive int"):
        resolve_config({"SHORT": True, "HEADS": True})
    resolve_config("short_m64_h4_w4")["HEADS"] = 99  # the caller's copy, not the table's
    assert CONFIG_CANDIDATES["short_m64_h4_w4"]["HEADS"] != 99
