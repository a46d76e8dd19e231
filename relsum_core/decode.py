"""The static sampling engine: a preallocated KV cache, in-place step buffers, and on CUDA one decode
step captured in a ``torch.cuda.CUDAGraph`` and replayed.

Launch overhead dominates small-batch decoding, so everything a decode step touches lives in
buffers allocated once per (model, batch, lengths, sampling settings): the HF ``StaticCache`` of
``[B, P + T]`` positions, a boolean ``[B, P + T]`` "key is visible" row per sequence (left padding
is simply ``False`` there), the next token, its position, the write column, the step counter and the
``done`` flags.  :func:`StaticEngine.step` does one model forward for one token, samples, and does
the stop bookkeeping, all in place and with no host sync, so the same function runs eagerly (CPU,
or when capture fails) and inside the graph.  The host checks "all rows done" every ``check_every``
steps only.  Prefill stays eager.

Sampling draws one uniform per row and step from a counter-based hash of (row key, step) computed on
the device, and inverts the (nucleus-truncated) CDF: no RNG state, nothing to register with the
graph, and a row's draw depends only on its own seed, never on its batch.  The draws differ from
the ``dynamic`` engine's ``torch.multinomial`` draws, so the two engines agree token for token only
when greedy (``temperature=0``).
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch

from relsum_core.precision import CAPTURE_LOCK, CAPTURE_MODE, device_scope

_M32 = 0xFFFFFFFF
# One resident engine per model (its buffers, cache and graph); a new shape replaces it.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------- seeds and noise
def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (host side, a few values per call)."""
    x &= (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x ^ (x >> 31)


def row_keys(seed, batch: int) -> torch.Tensor:
    """[B, 2] 32-bit keys (int64): a list gives row i the key of ``seed[i]`` alone, so a row's draws
    do not depend on its batch; an int gives row i the key of (seed, i); None draws a base seed from
    the global torch RNG (so ``torch.manual_seed`` still makes a run reproducible)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, (list, tuple)):
        mixed = [_mix64(_mix64(int(s)) ^ 0x5EED) for s in seed]
    else:
        base = _mix64(int(seed))
        mixed = [_mix64(base + 0x9E3779B97F4A7C15 * (i + 1)) for i in range(batch)]
    return torch.tensor([[m & _M32, m >> 32] for m in mixed], dtype=torch.int64)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for 0 <= x < 2**32 in int64 without signed overflow: split c in 16-bit halves.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def row_uniforms(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B, 1] float32 uniforms in [0, 1) from [B, 2] row keys and a [1] int64 step counter."""
    x = _fmix32(keys[:, 0] ^ _mul32((step + 1) & _M32, 0x9E3779B9))
    x = _fmix32(x ^ keys[:, 1])
    return ((x >> 8).to(torch.float32) * (1.0 / (1 << 24)))[:, None]


def sample_from_logits(logits: torch.Tensor, temperature: float, top_p: float, keys: torch.Tensor,
                       step: torch.Tensor) -> torch.Tensor:
    """One token per row by CDF inversion of one hashed uniform; the same nucleus rule as the dynamic
    engine (keep the smallest prefix of the sorted distribution reaching ``top_p``)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # the tokens before reach top_p
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, row_uniforms(keys, step) * total, right=True)
    # u * total can round up to total: never step past the last token with mass.
    idx = torch.minimum(idx, (cdf < total).sum(-1, keepdim=True))
    if order is not None:
        idx = order.gather(-1, idx)
    return idx.squeeze(-1)


# ---------------------------------------------------------------------------------- capability
def static_unsupported_reason(model) -> str | None:
    """None when the static engine can run ``model``; else why not (auto then uses dynamic)."""
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError:
        return "this transformers has no StaticCache"
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} does not take a 4-D mask (need sdpa or eager)"
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(cfg, "sliding_window", None) and getattr(
            cfg, "use_sliding_window", True):
        return f"layer types {sorted(types)} / sliding window: only full attention is supported"
    if cfg.model_type == "bloom" or (cfg.model_type == "falcon" and getattr(cfg, "alibi", False)):
        # their ALiBi slopes are built from a 2-D padding mask, and the 4-D one fails inside them
        return f"{cfg.model_type} with ALiBi needs a 2-D attention mask"
    return None


def _make_static_cache(model, batch: int, max_len: int, device, dtype):
    """``StaticCache`` across transformers versions: 5.17 and 5.24 take (config, max_cache_len);
    older ones wanted max_batch_size/device/dtype too."""
    import inspect

    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": model.config, "max_cache_len": max_len}
    extra = (("max_batch_size", batch), ("batch_size", batch), ("device", device), ("dtype", dtype))
    for name, value in extra:
        if name in params:
            kw[name] = value
    return StaticCache(**kw)


# ---------------------------------------------------------------------------------- the engine
class StaticEngine:
    """Buffers, cache and (on CUDA) the captured decode step for one shape and sampling setting."""

    def __init__(self, model, *, batch: int, prompt_len: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop_ids, pad_id: int, use_graph: bool | None = None,
                 compile_step: bool = False):
        from relsum_core.policy import _cache_kwarg

        p = next(model.parameters())
        self._model = weakref.ref(model)  # the engine lives in a WeakKeyDictionary keyed by the model
        self.device, self.dtype = p.device, p.dtype
        self.B, self.P, self.T = batch, prompt_len, max_new_tokens
        self.L = prompt_len + max_new_tokens
        self.temperature, self.top_p, self.pad_id = float(temperature), float(top_p), int(pad_id)
        self.key = self._key(model, batch, prompt_len, max_new_tokens, temperature, top_p, stop_ids, pad_id)
        self.cache_kw = _cache_kwarg(model)
        self.sdpa = getattr(model.config, "_attn_implementation", "eager") == "sdpa"
        dev = self.device
        self.cache = _make_static_cache(model, batch, self.L, dev, self.dtype)
        self.stops = torch.tensor(sorted(set(int(s) for s in stop_ids)) or [-1], dtype=torch.long, device=dev)
        self.visible = torch.zeros(batch, self.L, dtype=torch.bool, device=dev)  # key j visible to row b
        self.cur_tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.write_col = torch.zeros(1, dtype=torch.long, device=dev)  # cache column the fed token fills
        self.step_no = torch.zeros(1, dtype=torch.long, device=dev)  # index of the token being sampled
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.keys = torch.zeros(batch, 2, dtype=torch.long, device=dev)
        self.tokens = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        self.live = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=dev)
        self._neg = torch.finfo(self.dtype).min
        if use_graph is None:
            use_graph = dev.type == "cuda"
        self.use_graph = use_graph
        self.graph = None
        self.graph_failed = False
        # Optional (experimental): the decode forward through torch.compile (no cudagraphs of its own),
        # then captured in our graph with the sampling: fewer, fused kernels per step.
        self._decode_call = None
        if compile_step:
            # Compile a call through the weak reference: compiling the model itself would make this
            # engine (a value of _ENGINES) hold its own key alive, and the model would never be freed.
            model_ref = self._model

            def decode_forward(**kwargs):
                return model_ref()(**kwargs)

            self._decode_call = torch.compile(decode_forward, dynamic=False)

    @staticmethod
    def _key(model, batch, prompt_len, max_new_tokens, temperature, top_p, stop_ids, pad_id):
        p = next(model.parameters())
        return (batch, prompt_len, max_new_tokens, float(temperature), float(top_p),
                tuple(sorted(set(int(s) for s in stop_ids))), int(pad_id), p.device, p.dtype, p.data_ptr(),
                model.training, getattr(model.config, "_attn_implementation", None))

    # -- the pieces -------------------------------------------------------------------------------
    def _mask4d(self, query_visible: torch.Tensor) -> torch.Tensor:
        """[B, 1, q, L] mask for the attention implementation: boolean for sdpa, additive for eager."""
        if self.sdpa:
            return query_visible
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(query_visible, zero, torch.full_like(zero, self._neg))

    def _forward(self, input_ids, mask4d, position_ids, decode: bool = False):
        call = self._decode_call if decode and self._decode_call is not None else self._model()
        out = call(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1]

    def _record(self, logits: torch.Tensor) -> None:
        """Sample the token of step ``step_no`` from ``logits`` and do the stop bookkeeping, in place."""
        tok = sample_from_logits(logits, self.temperature, self.top_p, self.keys, self.step_no)
        tok = torch.where(self.done, torch.full_like(tok, self.pad_id), tok)
        self.tokens.index_copy_(1, self.step_no, tok[:, None])
        self.live.index_copy_(1, self.step_no, (~self.done)[:, None])
        self.done.logical_or_(torch.isin(tok, self.stops))
        self.cur_tok.copy_(tok)

    def step(self) -> None:
        """One decode step, all in place and sync-free: feed ``cur_tok`` at ``pos`` into cache column
        ``write_col``, sample the next token.  This is what the CUDA graph captures."""
        self.visible.index_fill_(1, self.write_col, True)
        logits = self._forward(self.cur_tok[:, None], self._mask4d(self.visible[:, None, None, :]), self.pos,
                               decode=True)
        self.step_no.add_(1)
        self._record(logits)
        self.pos.add_(1)
        self.write_col.add_(1)

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, keys: torch.Tensor) -> None:
        """Reset the buffers, run the prompt through the cache (eager) and sample token 0."""
        B, P, L = self.B, self.P, self.L
        self.cache.reset()
        real = prompt_mask.to(device=self.device, dtype=torch.bool)
        self.visible.zero_()
        self.visible[:, :P] = real
        self.tokens.fill_(self.pad_id)
        self.live.zero_()
        self.done.zero_()
        self.step_no.zero_()
        self.write_col.fill_(P)
        self.keys.copy_(keys)
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        # Causal over real keys; a pad query sees itself only, so no softmax row is empty.
        i = torch.arange(P, device=self.device)
        causal = i[None, :] <= i[:, None]
        q_vis = (causal[None] & real[:, None, :]) | torch.eye(P, dtype=torch.bool, device=self.device)[None]
        q_vis = torch.cat([q_vis, q_vis.new_zeros(B, P, L - P)], dim=-1)
        logits = self._forward(prompt_ids.to(self.device), self._mask4d(q_vis[:, None]), positions)
        self.pos.copy_(positions[:, -1:] + 1)
        self._record(logits)

    # -- the graph ----------------------------------------------------------------------------------
    def _capture(self) -> None:
        """Warm the step up on a side stream, put the state back, capture it; on failure warn once and
        stay eager."""
        state = [self.visible, self.cur_tok, self.pos, self.write_col, self.step_no, self.done, self.tokens,
                 self.live] + [layer.cumulative_length for layer in self.cache.layers
                               if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
        saved = [t.clone() for t in state]
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step()
                    for t, s in zip(state, saved):
                        t.copy_(s)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # side is on self.device; torch's default capture stream may not be
            with torch.cuda.graph(graph, stream=side, capture_error_mode=CAPTURE_MODE):
                self.step()
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - any capture failure means: run the same step eagerly
            self.graph, self.graph_failed, self._decode_call = None, True, None
            if torch.cuda.is_available() and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            warnings.warn(f"relsum static sampling: CUDA graph capture failed ({type(e).__name__}: {e}); "
                          "decoding eagerly with the static cache", RuntimeWarning, stacklevel=3)
        finally:
            for t, s in zip(state, saved):
                t.copy_(s)

    @torch.no_grad()
    def run(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, keys: torch.Tensor,
            check_every: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        with device_scope(self.device):  # a compiled step's Triton kernels launch on the current device
            self.prefill(prompt_ids, prompt_mask, keys)
            remaining = self.T - 1
            if remaining > 0 and self.use_graph and self.graph is None and not self.graph_failed:
                with CAPTURE_LOCK:
                    self._capture()
            while remaining > 0 and not bool(self.done.all()):
                for _ in range(min(check_every, remaining)):
                    if self.graph is not None:
                        self.graph.replay()
                    else:
                        self.step()
                remaining -= min(check_every, remaining)
        # Width as the dynamic engine: up to the last step where any row was still live.
        any_live = self.live.any(0).nonzero()
        width = int(any_live[-1]) + 1 if any_live.numel() else 1
        return self.tokens[:, :width].clone(), self.live[:, :width].long()


def bucket(n: int, multiple: int = 16) -> int:
    return int(math.ceil(n / multiple) * multiple)


@torch.no_grad()
def static_sample_ids(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, stop_ids, pad_id: int,
                      max_new_tokens: int, temperature: float, top_p: float, seed,
                      use_graph: bool | None = None, check_every: int = 8,
                      reuse: bool = True, compile_step: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_ids, completion_mask) with the static engine; prompts are left-padded to a multiple
    of 16 columns so a resident engine (and its graph) serves prompts of nearby lengths."""
    B, P = prompt_ids.shape
    Pb = bucket(P)
    if Pb > P:
        prompt_ids = torch.cat([prompt_ids.new_full((B, Pb - P), pad_id), prompt_ids], dim=1)
        prompt_mask = torch.cat([prompt_mask.new_zeros(B, Pb - P), prompt_mask], dim=1)
    key = StaticEngine._key(model, B, Pb, max_new_tokens, temperature, top_p, stop_ids, pad_id)
    key += (compile_step,)
    engine = _ENGINES.get(model) if reuse else None
    if engine is None or engine.key != key or (use_graph is not None and engine.use_graph != use_graph):
        _ENGINES.pop(model, None)  # free the old buffers and graph before allocating new ones
        engine = StaticEngine(model, batch=B, prompt_len=Pb, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id,
                              use_graph=use_graph, compile_step=compile_step)
        engine.key = key
        if reuse:
            _ENGINES[model] = engine
    return engine.run(prompt_ids, prompt_mask, row_keys(seed, B).to(engine.device), check_every=check_every)


def release(model) -> None:
    """Drop ``model``'s resident static engine (KV cache, buffers, graph)."""
    _ENGINES.pop(model, None)
