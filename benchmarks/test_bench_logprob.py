"""fused_logprob forward+backward against naive fp32 logits, torch.compile of it, Cut Cross-Entropy
and Liger's fused GRPO loss (the last two only when installed, on CUDA).

GPU: the two ANCHORS table-1 shapes in bf16.  CPU: small fp32 shapes.  Time is what
pytest-benchmark measures (device-synchronised); peak extra memory is in extra_info.
"""

import pytest
import torch

from relsum_core.bench_logprob import make_inputs, peak_extra_bytes, variants

from conftest import bench_device, device_name

DEV = bench_device()
if DEV.type == "cuda":
    SHAPES = [(16384, 1536, 151936), (16384, 768, 50257)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(1024, 128, 8000), (2048, 256, 32000)]
    DTYPE = torch.float32
VARIANTS = ["naive_fp32", "compiled_naive", "fused", "fused_nofilter", "fused_entropy", "cut_cross_entropy",
            "liger_grpo"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-d{}-V{}".format(*s))
def test_logprob_fwd_bwd(benchmark, shape, variant):
    n, d, v = shape
    h, w, t, adv = make_inputs(n, d, v, dtype=DTYPE, device=DEV)
    steps = variants(h, w, t, adv, with_compile=True)
    if variant not in steps:
        pytest.skip(f"{variant} is not available on {DEV.type}")
    step = steps[variant]
    check = {}
    if variant.startswith("fused") and DEV.type == "cuda":
        # a broken kernel must not post a time: gradients against the naive fp32 step first
        steps["naive_fp32"]()
        ref = (h.grad.float().clone(), w.grad.float().clone())
        step()
        for name, got, want in (("grad_h", h.grad, ref[0]), ("grad_w", w.grad, ref[1])):
            err = float((got.float() - want).norm() / want.norm())
            check[f"rel_err_{name}"] = err
            assert err < 2e-2, f"{variant}: {name} relative error {err:.3g} against naive fp32"
        del ref
    step()  # compile / autotune outside the timing

    def synced():
        step()
        if DEV.type == "cuda":
            torch.cuda.synchronize()

    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    h.grad = w.grad = None
    benchmark.extra_info.update({
        "n": n, "d": d, "v": v, "dtype": str(DTYPE).replace("torch.", ""), "device": device_name(DEV),
        "impl": "triton" if DEV.type == "cuda" else "torch",
        "peak_extra_mib": peak_extra_bytes(step, DEV, grad_bytes) / 2**20,
        **check,
    })
    slow = variant == "liger_grpo" or DEV.type == "cpu"
    benchmark.pedantic(synced, rounds=3 if slow else 10, warmup_rounds=1)
