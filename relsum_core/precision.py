"""Where and in what dtype a job computes: the device (checked up front, made current for Triton's
launches) and bf16 where the hardware multiplies it fast, fp32 elsewhere.

CPUs with bf16 dot products (AVX512-BF16, AMX) run the project's bf16 GEMMs far faster than fp32:
2.4x on a 2-core EPYC with AVX512-BF16 (391 against 161 GFLOP/s), about 30x on a 2-core AMX Xeon
(2.2-3.1 TFLOP/s against 83).  On other CPUs oneDNN emulates bf16 and fp32 is faster.
"""

from __future__ import annotations

import contextlib
import threading

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch.device (None: CUDA when available, else the CPU), checked up front: a bad
    name or an absent CUDA would otherwise fail minutes into a job, deep inside torch."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch build sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def device_scope(device: torch.device):
    """Make ``device`` this thread's current CUDA device for the block (a no-op on the CPU).

    Why: Triton launches on the current device's stream, whatever device its tensors are on, and a
    server's worker thread starts on device 0; a model on ``cuda:1`` would otherwise run its kernels
    on the wrong GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# One CUDA graph capture (with its warm-up) at a time in the process.  Captures run in CUDA's
# thread-local mode, so other threads' allocations and launches meanwhile do not fail them.
CAPTURE_LOCK = threading.Lock()
CAPTURE_MODE = "thread_local"

# One Hugging Face model load at a time in the process: transformers 5's from_pretrained keeps
# process-wide state while it loads, and two loads in threads at once left the next tied-embedding
# model's lm_head on the meta device (two CrossEncoder loads, then a Llama load; reproduced on CPU).
HF_LOAD_LOCK = threading.RLock()


def claim_device(device: torch.device) -> torch.device:
    """``device`` made this process's current device (CUDA; the CPU is returned as is), with its index
    filled in: a job that owns its process (a trainer, one torchrun rank) runs everything there."""
    if device.type != "cuda":
        return device
    if device.index is None:  # torch.cuda.set_device refuses a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device=None, *, auto_on_cuda: bool = True) -> torch.dtype:
    """``"bf16"`` or ``"fp32"`` as asked; ``"auto"`` is bf16 on CPUs with bf16 dot products and, with
    ``auto_on_cuda``, on CUDA devices, fp32 elsewhere.  ``device`` None means the CPU."""
    check_precision(precision)
    if precision == "auto":
        on_cuda = torch.device(device or "cpu").type == "cuda"
        fast = auto_on_cuda if on_cuda else cpu_has_bf16_dot()
        precision = "bf16" if fast else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32
