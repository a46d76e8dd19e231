"""relsum's Triton kernels, each beside its torch reference and autograd wrapper."""

from .encoder_epilogues import (
    bias_gelu,
    bias_gelu_reference,
    cls_score,
    cls_score_reference,
    residual_layernorm,
    residual_layernorm_reference,
)
from .linear_gelu import linear_gelu, linear_gelu_reference
from .logprob import fused_logprob, logprob_reference
from .varlen_attention import varlen_attention, varlen_attention_reference

__all__ = [
    "fused_logprob",
    "logprob_reference",
    "varlen_attention",
    "varlen_attention_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "residual_layernorm",
    "residual_layernorm_reference",
    "cls_score",
    "cls_score_reference",
    "linear_gelu",
    "linear_gelu_reference",
]
