"""relsum's Triton kernels, each beside its torch reference and autograd wrapper."""

import sys as _sys


def _hand_over_to_hf_kernels() -> bool:
    """Load Hugging Face's ``kernels`` package in this module's place, if it is installed.

    This folder installs as ``relsum_kernels``.  It is imported as ``kernels`` only when a checkout's
    root is on sys.path (``python -m ...`` run there), and then it shadows the Hugging Face package of
    that name, which transformers >= 5.25 imports.
    """
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    path = [p for p in _sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    this = _sys.modules[__name__]
    _sys.modules["kernels"] = module  # the import statement hands out what sys.modules holds
    try:
        spec.loader.exec_module(module)
    except BaseException:
        _sys.modules["kernels"] = this
        raise
    return True


if __name__ != "kernels" or not _hand_over_to_hf_kernels():
    from .encoder_epilogues import (
        bias_gelu,
        bias_gelu_reference,
        cls_score,
        cls_score_reference,
        residual_layernorm,
        residual_layernorm_reference,
    )
    from .fused_ffn import fused_ffn, fused_ffn_reference
    from .linear_gelu import linear_gelu, linear_gelu_reference
    from .linear_residual_ln import linear_residual_layernorm, linear_residual_layernorm_reference
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
    "linear_residual_layernorm",
    "linear_residual_layernorm_reference",
    "fused_ffn",
    "fused_ffn_reference",
]
