"""Small helpers shared by the kernel families: Triton availability and path selection."""

from __future__ import annotations

import os

import torch

try:  # Triton is optional on CPU-only installs; the torch paths never need it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """Pick "triton" or "torch"; "auto" means Triton on CUDA tensors, torch elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (tensor.is_cuda and HAS_TRITON) else "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' needs the triton package")
        if not (tensor.is_cuda or interpreting()):
            raise RuntimeError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU tests)"
            )
    return impl


def check_floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def dot_precision(fp32_operands: bool) -> str:
    """``tl.dot``'s input_precision: fp32 operands ask for fp32 answers (no tf32 rounding); 16-bit
    operands ignore it."""
    return "ieee" if fp32_operands else "tf32"
