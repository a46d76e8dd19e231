"""relsum's Triton kernels, each beside its torch reference and autograd wrapper."""

from .logprob import fused_logprob, logprob_reference

__all__ = ["fused_logprob", "logprob_reference"]
