"""Time and peak memory of one policy-update step's log-prob work: fused_logprob against its peers.

Every variant computes loss = -mean(adv * log p(target)) from hidden [N, d] and LM head [V, d]
and backpropagates into both (the ANCHORS table-1 protocol).  Peak memory is reported as the
peak above what existed before the step, less the gradients the step returns (they are its
outputs, the same size for every variant), so it is the extra working memory of the method.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from relsum_core.io import atomic_write_text
from relsum_core.precision import resolve_device
from relsum_kernels import fused_logprob

Step = Callable[[], None]


def make_inputs(n: int, d: int, v: int, *, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(n, d, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    adv = torch.randn(n, generator=g).to(device)
    return h, w, t, adv


def _naive_loss(h, w, t, adv):
    logits = h.float() @ w.float().t()
    logp = torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1)
    return -(adv * logp).mean()


def variants(h, w, t, adv, *, with_compile: bool = True) -> dict[str, Step]:
    """The steps to compare on this device; peers that are not installed are left out.
    "fused" runs fused_logprob's Triton kernels on CUDA and its chunked torch path on CPU;
    "fused_nofilter" (CUDA only) is "fused" with gradient filtering off (grad_filter_eps=0.0)."""
    impl = "triton" if h.is_cuda else "torch"

    def zero():
        h.grad = None
        w.grad = None

    def naive():
        zero()
        _naive_loss(h, w, t, adv).backward()

    def fused():
        zero()
        (-(adv * fused_logprob(h, w, t, impl=impl)).mean()).backward()

    def fused_entropy():
        zero()
        logp, ent = fused_logprob(h, w, t, impl=impl, with_entropy=True)
        (-(adv * logp).mean() - 0.01 * ent.mean()).backward()

    steps: dict[str, Step] = {"naive_fp32": naive, "fused": fused, "fused_entropy": fused_entropy}
    if h.is_cuda:  # gradient filtering exists only in the Triton backward: exact backward to compare

        def fused_nofilter():
            zero()
            (-(adv * fused_logprob(h, w, t, impl=impl, grad_filter_eps=0.0)).mean()).backward()

        steps["fused_nofilter"] = fused_nofilter
    if with_compile:
        compiled_loss = torch.compile(_naive_loss)

        def compiled():
            zero()
            compiled_loss(h, w, t, adv).backward()

        steps["compiled_naive"] = compiled
    if h.is_cuda:
        try:
            from cut_cross_entropy import linear_cross_entropy

            def cce():
                zero()
                logp = -linear_cross_entropy(h, w, t, reduction="none")
                (-(adv * logp.float()).mean()).backward()

            steps["cut_cross_entropy"] = cce
        except ImportError:
            pass
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)

            def liger_grpo():
                zero()
                out = liger(h[None], w, t[None], torch.ones_like(t)[None], adv[:1])
                (out[0] if isinstance(out, tuple) else out).backward()

            steps["liger_grpo"] = liger_grpo
        except ImportError:
            pass
    return steps


# ---------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, device: torch.device, *, warmup: int = 1,
              repeats: int = 5) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds of each repeat after warm-up, device-synchronised.
    CPU seconds are the steadier figure on a shared machine: other processes inflate wall time."""
    for _ in range(warmup):
        step()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


_libc = None


def _malloc_setup() -> None:
    """Make freed CPU memory go back to the OS so peak RSS measures live memory, not arena slack."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD fixed: big buffers are mmapped and returned
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(step: Step, device: torch.device, grad_bytes: int) -> int:
    """Peak memory of one run of ``step`` above the memory before it, less its output gradients."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        _malloc_setup()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the kernel's peak-RSS counter (VmHWM) to the current RSS
        base = _rss_bytes("VmRSS")
        step()
        peak = _rss_bytes("VmHWM")
    return max(0, peak - base - grad_bytes)


def run(n: int, d: int, v: int, *, dtype=torch.float32, device: str = "cpu", repeats: int = 5,
        with_compile: bool = True) -> list[dict]:
    dev = torch.device(device)
    h, w, t, adv = make_inputs(n, d, v, dtype=dtype, device=dev)
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    rows = []
    for name, step in variants(h, w, t, adv, with_compile=with_compile).items():
        times, cpu_times = time_step(step, dev, repeats=repeats)
        # Measure memory after the timed runs: allocator caches and compilation are warm by then.
        h.grad = w.grad = None
        extra = peak_extra_bytes(step, dev, grad_bytes)
        rows.append({
            "variant": name, "impl": "triton" if dev.type == "cuda" else "torch",
            "n": n, "d": d, "v": v, "dtype": str(dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "median_cpu_ms": 1e3 * statistics.median(cpu_times),
            "repeats": repeats, "peak_extra_mib": extra / 2**20,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    base = {(r["n"], r["d"], r["v"]): r for r in rows if r["variant"] == "naive_fp32"}
    lines = ["| variant | N, d, V | dtype | median ms | vs naive time | median CPU ms | vs naive CPU "
             "| peak extra MiB | vs naive memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get((r["n"], r["d"], r["v"]))
        tr = f"{r['median_ms'] / b['median_ms']:.2f}x" if b else "-"
        cr = f"{r['median_cpu_ms'] / b['median_cpu_ms']:.2f}x" if b else "-"
        mr = f"{r['peak_extra_mib'] / b['peak_extra_mib']:.3f}x" if b and b["peak_extra_mib"] > 0 else "-"
        lines.append(f"| {r['variant']} | {r['n']}, {r['d']}, {r['v']} | {r['dtype']} | {r['median_ms']:.1f} "
                     f"| {tr} | {r['median_cpu_ms']:.1f} | {cr} | {r['peak_extra_mib']:.1f} | {mr} |")
    return "\n".join(lines)


def check_args(*, n: int, d: int, v: int, repeats: int, out: str | None) -> None:
    """ValueError for arguments that would only fail after (or deep inside) the benchmark."""
    for name, value in (("n", n), ("d", d), ("v", v), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if out:
        path = Path(out)
        if path.is_dir():
            raise ValueError(f"--out {out} is a directory; give a file path for the JSON results")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is not a directory")


def main(n: int = 4096, d: int = 256, v: int = 32000, repeats: int = 5, out: str | None = None,
         device: str | None = None, dtype: str = "float32", with_compile: bool = True) -> int:
    check_args(n=n, d=d, v=v, repeats=repeats, out=out)
    device = resolve_device(device)  # ValueError for a bad name or an absent CUDA, before any work
    rows = run(n, d, v, dtype=getattr(torch, dtype), device=device, repeats=repeats,
               with_compile=with_compile)
    print(format_table(rows))
    if out:
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
