"""Small helpers shared by the kernel families: Triton availability and path selection."""

from __future__ import annotations

import math
import os

import torch

try:  # Triton is optional on CPU-only installs; the torch paths never need it.
    import triton
    import triton.language as tl

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


def check_forward_only(fn: str, *tensors) -> None:
    """Refuse a Triton forward-only path where autograd would want a graph: its output has no
    grad_fn, so training through it would silently get no gradients (the torch paths have them)."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{fn}(impl='triton') is forward only: its output would carry no gradient. Use impl='torch' "
            "to train through it, or call it under torch.no_grad() / torch.inference_mode()"
        )


def check_floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_eps(eps) -> None:
    """A LayerNorm epsilon: a finite number > 0."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [rows, F] with unit column stride (a view when possible): the layout the kernels
    address, one row stride and contiguous columns."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def dot_precision(fp32_operands: bool) -> str:
    """``tl.dot``'s input_precision: fp32 operands ask for fp32 answers (no tf32 rounding); 16-bit
    operands ignore it."""
    return "ieee" if fp32_operands else "tf32"


def gemm_config(K: int, dtype: torch.dtype, tuned: dict) -> dict:
    """Launch tiles of a fused GEMM over K: tiny ones under the interpreter, small ones for fp32 (ieee
    dots run on FMA units with the operands in registers: no spills, ptxas -v), else ``tuned``; a
    short K shrinks BLOCK_K."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    else:
        cfg = dict(tuned)
    if K < cfg["BLOCK_K"]:
        cfg["BLOCK_K"] = max(16, triton.next_power_of_2(K))
    return cfg


if HAS_TRITON:

    @triton.jit
    def gemm_k_loop(acc, x_ptrs, w_ptrs, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PREC: tl.constexpr):
        """acc + x @ W^T over K, the main loop of the fused GEMMs: ``x_ptrs`` address a [rows, BLOCK_K]
        tile of x and ``w_ptrs`` a [BLOCK_K, cols] tile of W^T, both at k = 0 with unit stride in k
        (rows and columns past the matrix are clamped by the caller, so only k needs masks)."""
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                kmask = (k0 + ks) < K
                a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
            if UPCAST:  # interpreter: bf16 dots are wrong there
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        return acc
