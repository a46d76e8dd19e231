"""Padding-free (packed) forward of a BERT-family cross-encoder.

All sequences of a batch are concatenated into one token stream described by ``cu_seqlens``; every
matrix product runs on real tokens only.  On CUDA the attention, bias+GELU, residual+LayerNorm and the
[CLS] scoring head are the Triton kernels of ``relsum_kernels``, the dense layers cuBLAS GEMMs whose
bias the next kernel fuses (or, with ``fused_ffn_up``, the FFN up-projection a Triton GEMM with the
bias+GELU in its epilogue, with ``fused_dense_ln`` the attention-output and FFN-down projections
Triton GEMMs with bias+residual+LayerNorm in theirs, and with ``fused_ffn`` the whole feed-forward
block one Triton kernel where the hidden size allows); on CPU attention and the head take the kernels'
torch paths (attention as a few padded SDPA calls over length buckets) and the dense biases go into the
GEMMs (addmm) instead, or, for bf16 inference, into oneDNN's fused linear with the GELU or the
residual add as well.

The module *shares* its parameters with the Hugging Face model it is built from, so fine-tuning either
one updates both and ``save`` of the HF model always writes what ``forward`` computes.  (Its one
derived copy, the joined QKV weight, follows the parameters' version counters; writes torch cannot
see, through ``.data``, need :meth:`PackedBertEncoder.clear_cache`.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import relsum_kernels as K
from relsum_kernels.fused_ffn import MAX_HIDDEN as FUSED_FFN_MAX_HIDDEN
from relsum_kernels.varlen_attention import resolve_config as resolve_attention_config

# oneDNN's linear with bias and a GELU or residual add in its epilogue (the op torch.compile's CPU
# backend emits).  Private to torch: used only once a probe shows it exists and computes what addmm
# does (None until then).
_ONEDNN_LINEAR: bool | None = None


class PackedBertEncoder(nn.Module):
    """BERT encoder + pooler + 1-label classifier over a packed token stream.

    Build with :meth:`from_hf` from a ``BertForSequenceClassification`` (num_labels=1); the HF modules
    are registered here, not copied.
    """

    def __init__(self, bert: nn.Module, classifier: nn.Linear, config) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"only absolute position embeddings are supported, got {config.position_embedding_type!r}"
            )
        if getattr(config, "is_decoder", False):
            raise ValueError("a decoder (causal) BERT is not a cross-encoder")
        if bert.pooler is None:
            raise ValueError("the BERT model has no pooler; cross-encoder scoring needs one")
        if classifier.out_features != 1:
            raise ValueError(f"the classifier must have one output, got {classifier.out_features}")
        self.embeddings = bert.embeddings
        self.layers = bert.encoder.layer
        self.pooler = bert.pooler
        self.classifier = classifier
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.act = config.hidden_act
        self._fused_cache: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        # Counts clear_cache calls: a captured CUDA graph holds the joined copies' addresses, not
        # the copies, so a Reranker recaptures when this moves.
        self.cache_generation = 0
        # "auto": kernels on CUDA, addmm-fused torch on CPU.  "triton" / "torch" force the kernel
        # formulation with that implementation (tests run the CUDA wiring on CPU this way).
        self.impl = "auto"
        # FFN up-projection as one Triton GEMM with bias+GELU in its epilogue (kernels/linear_gelu.py)
        # instead of cuBLAS + the bias_gelu pass.  Off until a GPU run shows it faster
        # (benchmarks: ``test_cuda_linear_gelu``, and the ``relsum_tuned`` end-to-end variants).
        self.fused_ffn_up = False
        # The two dense layers that end in add & norm as one Triton GEMM each with bias+residual+
        # LayerNorm in the epilogue (kernels/linear_residual_ln.py), for the same reason
        # (``test_cuda_linear_ln``).
        self.fused_dense_ln = False
        # The whole FFN block (up, GELU, down, bias, residual, LayerNorm) as one Triton kernel that
        # keeps the 4H activations on chip (kernels/fused_ffn.py), where H <= 512 and the act is
        # GELU; it takes precedence over the two flags above for the FFN (``test_cuda_fused_ffn``).
        self.fused_ffn = False
        # Triton attention tiles (see the property), for the same reason: the GPU sweep picks.
        self._attention_config: dict | None = None

    @property
    def attention_config(self) -> dict | None:
        """The attention kernel's tiles: None (its own choice), or a name or value of
        ``relsum_kernels.varlen_attention.CONFIG_CANDIDATES`` (import it from that module: the
        package's ``varlen_attention`` is the function).  Checked when set; read back as the dict."""
        return self._attention_config

    @attention_config.setter
    def attention_config(self, config) -> None:
        self._attention_config = resolve_attention_config(config)

    @classmethod
    def from_hf(cls, model: nn.Module) -> PackedBertEncoder:
        """From a ``BertForSequenceClassification`` with one label."""
        if not (hasattr(model, "bert") and hasattr(model, "classifier")):
            raise TypeError(f"expected a BertForSequenceClassification, got {type(model).__name__}")
        return cls(model.bert, model.classifier, model.config)

    def _qkv(self, i: int, attn) -> tuple[torch.Tensor, torch.Tensor]:
        # One [3H, H] GEMM beats three [H, H] ones; the fused copy is cached for inference and rebuilt
        # whenever a source parameter changes (its version counter moves), so training stays correct.
        params = (attn.query.weight, attn.key.weight, attn.value.weight, attn.query.bias, attn.key.bias,
                  attn.value.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return torch.cat(params[:3]), torch.cat(params[3:])
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        hit = self._fused_cache.get(i)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, torch.cat(params[:3]), torch.cat(params[3:]))
            self._fused_cache[i] = hit
        return hit[1], hit[2]

    def clear_cache(self) -> None:
        """Drop the joined QKV copies (rebuilt on the next forward)."""
        self._fused_cache.clear()
        self.cache_generation += 1

    def kernel_choices(self) -> tuple:
        """What a captured CUDA graph bakes in besides the weights (hashable)."""
        att = tuple(sorted(self.attention_config.items())) if self.attention_config else None
        return (self.fused_ffn_up, self.fused_dense_ln, self.fused_ffn, att)

    def _kernel_epilogues(self, x: torch.Tensor) -> bool:
        return self.impl != "auto" or x.is_cuda

    def _dense_act(self, x: torch.Tensor, dense: nn.Linear) -> torch.Tensor:
        if not self._kernel_epilogues(x):
            if self.act == "gelu" and _onednn_fits(x, dense):
                return torch.ops.mkldnn._linear_pointwise(x, dense.weight, dense.bias, "gelu", [], "none")
            # CPU: the bias rides in the GEMM (addmm); a separate bias pass costs ~5%.
            y = F.linear(x, dense.weight, dense.bias)
            if self.act != "gelu":
                return self._hf_act(y)
            if torch.is_grad_enabled() and y.requires_grad:
                return F.gelu(y)
            # In place: one [T, 4H] buffer less at the peak (18.6 MB in bf16 at 100 candidates), and
            # a second one would be fresh memory, page faults and all, on every call.
            return torch.ops.aten.gelu_(y)
        if self.act == "gelu" and self.fused_ffn_up:
            return K.linear_gelu(x, dense.weight, dense.bias, impl=self.impl)
        y = F.linear(x, dense.weight)
        if self.act != "gelu":
            return self._hf_act(y + dense.bias)
        return K.bias_gelu(y, dense.bias, impl=self.impl)

    def _ffn(self, h: torch.Tensor, up: nn.Linear, out) -> torch.Tensor:
        """BERT's intermediate + output blocks: LayerNorm(h + down(act(up(h))))."""
        ln = out.LayerNorm
        if (self.fused_ffn and self._kernel_epilogues(h) and self.act == "gelu"
                and h.shape[-1] <= FUSED_FFN_MAX_HIDDEN):
            return K.fused_ffn(h, up.weight, up.bias, out.dense.weight, out.dense.bias, ln.weight, ln.bias,
                               eps=ln.eps, impl=self.impl)
        return self._dense_residual_ln(self._dense_act(h, up), out.dense, h, ln)

    def _hf_act(self, y: torch.Tensor) -> torch.Tensor:
        from transformers.activations import ACT2FN

        return ACT2FN[self.act](y)

    def _dense_residual_ln(self, x: torch.Tensor, dense: nn.Linear, residual: torch.Tensor, ln: nn.LayerNorm):
        if not self._kernel_epilogues(x):
            if _onednn_fits(x, dense) and residual.dtype == x.dtype and residual.is_contiguous():
                y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, dense.weight, dense.bias, "add")
            else:
                y = F.linear(x, dense.weight, dense.bias).add_(residual)
            return F.layer_norm(y, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        if self.fused_dense_ln:
            return K.linear_residual_layernorm(x, dense.weight, dense.bias, residual, ln.weight, ln.bias,
                                               eps=ln.eps, impl=self.impl)
        y = F.linear(x, dense.weight)
        return K.residual_layernorm(y, residual, ln.weight, ln.bias, eps=ln.eps, x_bias=dense.bias,
                                    impl=self.impl)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """input_ids, token_type_ids, position_ids: [T]; cu_seqlens: int32 [B+1] -> fp32 scores [B].

        The token tensors' shapes and dtypes are checked here; their values are not (that would
        cost a device sync a call, and break graph capture): ids must lie inside the embedding
        tables, which `CrossEncoder` checks on the host before each batch.
        """
        _check_tokens(input_ids, token_type_ids, position_ids)
        emb = self.embeddings
        ln = emb.LayerNorm
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids)
        h = K.residual_layernorm(x, emb.position_embeddings(position_ids), ln.weight, ln.bias, eps=ln.eps,
                                 impl=self.impl)
        T = h.shape[0]
        hidden = h.shape[1]
        scale = 1.0 / math.sqrt(self.head_dim)
        for i, layer in enumerate(self.layers):
            attn = layer.attention.self
            w_qkv, b_qkv = self._qkv(i, attn)
            if not self._kernel_epilogues(h) and _onednn_fits(h, w_qkv, b_qkv):
                qkv = torch.ops.mkldnn._linear_pointwise(h, w_qkv, b_qkv, "none", [], "")
            else:
                qkv = F.linear(h, w_qkv, b_qkv)
            qkv = qkv.view(T, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.unbind(1)  # views of one buffer: the torch path gathers them in one go
            ctx = K.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale, impl=self.impl,
                                     config=self.attention_config)
            out = layer.attention.output
            h = self._dense_residual_ln(ctx.reshape(T, hidden), out.dense, h, out.LayerNorm)
            h = self._ffn(h, layer.intermediate.dense, layer.output)
        pd = self.pooler.dense
        return K.cls_score(h, cu_seqlens, pd.weight, pd.bias, self.classifier.weight, self.classifier.bias,
                           impl=self.impl)


def _check_tokens(input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
    """Shapes and dtypes only: a 2-D or mismatched id tensor would fail deep inside the layers."""
    for name, t in (("input_ids", input_ids), ("token_type_ids", token_type_ids),
                    ("position_ids", position_ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
            what = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__)
            raise ValueError(f"{name} must be a packed 1-D int64/int32 tensor [total tokens], got {what}")
    if not input_ids.shape == token_type_ids.shape == position_ids.shape:
        raise ValueError(f"input_ids, token_type_ids and position_ids must have one length, got "
                         f"{input_ids.numel()}, {token_type_ids.numel()} and {position_ids.numel()}")


def _onednn_fits(x: torch.Tensor, *weights) -> bool:
    """Whether a CPU linear on ``x`` goes to oneDNN's fused linear: bf16 inference only.

    A 100-candidate bf16 rerank on a 2-core AMX Xeon took 175-182 ms against 207-208 with addmm,
    whose bias is a separate broadcast copy there; fp32 measured no faster, so it keeps addmm.
    ``weights``: nn.Linear modules or tensors.
    """
    if not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous()):
        return False
    global _ONEDNN_LINEAR
    if _ONEDNN_LINEAR is None:
        _ONEDNN_LINEAR = _probe_onednn_linear()
    if not _ONEDNN_LINEAR:
        return False
    tensors = [t for w in weights for t in ((w.weight, w.bias) if isinstance(w, nn.Linear) else (w,))]
    if any(t is None or t.dtype != x.dtype for t in tensors):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)))


def _probe_onednn_linear() -> bool:
    """Whether this torch's ``mkldnn._linear_pointwise`` (both forms) takes our arguments and matches
    F.linear + GELU / + residual in bf16 on a small case."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    x, w, r = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((5, 16), (24, 16), (5, 24)))
    b = torch.randn(24, generator=g).to(torch.bfloat16)
    try:
        with torch.no_grad():
            act = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
            add = torch.ops.mkldnn._linear_pointwise.binary(x, r, w, b, "add")
            plain = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (RuntimeError, TypeError, ValueError):
        return False
    y = F.linear(x.float(), w.float(), b.float())
    want = (F.gelu(y), y + r.float(), y)
    return all(got.shape == ref.shape and torch.allclose(got.float(), ref, rtol=2e-2, atol=5e-2)
               for got, ref in zip((act, add, plain), want))
