"""Freeze a ``CrossEncoder`` into a directory that the C++ API (``bindings/``) serves without Python.

The directory holds:
- ``model.pt2``: an AOTInductor package of the packed encoder (CPU, fp32 or bf16).  Its inputs are what the
  C++ packer builds: ids / token types / positions over the packed tokens [T], ``pad_index`` [B, L]
  (the packed row of each padded slot, ``T`` for padding), ``token_slot`` [T] (each token's flat slot
  in [B, L]) and ``cls_index`` [B].  The dense layers run on the packed tokens only (for a bf16
  package the C++ pads them by a few rows that no slot points at, so oneDNN's per-shape kernels
  are reused); attention runs on the padded [B, L] view, the one formulation
  ``torch.export`` traces without data-dependent control flow.
- ``vocab.txt`` (one token a line, line number = id) and ``text_rules.tsv``: the tokenizer as tables.
  The rules are read off the Hugging Face fast tokenizer itself, one code point at a time (what its
  normalizer turns each character into, which characters its pre-tokenizer splits on), so the C++
  WordPiece gives the same ids without reimplementing Unicode case folding or NFD.
- ``settings.txt``: ``key value`` lines (the value may be empty): the truncation rule's budgets, the
  exported shapes' bounds, special token ids, the WordPiece parameters (``wordpiece_vocab_size``: the
  model's vocabulary is the first lines of ``vocab.txt``, the added tokens outside it follow), the
  tokens matched verbatim before normalisation ([CLS], [SEP], ...), a random ``export_id`` and the
  FNV-1a 64 of each other text file (``fnv1a64 vocab.txt HEX``, ``fnv1a64 text_rules.tsv HEX``).

The package itself carries, as AOTInductor metadata that no text edit reaches, the ``export_id``,
the model's embedding row counts (word, position, token type) and the vector extensions its compiled
code needs (the exporting CPU's for ``--target native``, AVX2's for ``x86-64-v3``): the C++ checks
vocab.txt and settings.txt against the row counts (an id past them would abort the process inside an
OpenMP region, not throw), and the serving CPU against the extensions (a CPU without them would die
on SIGILL).  The id and the checksums let the C++ refuse files of two exports (an export replaced
while it loads, or files copied between exports), which would otherwise load as silent garbage.

Plain text throughout so the C++ side needs nothing beyond libtorch.
"""

from __future__ import annotations

import json
import platform
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_write_bytes, atomic_write_dir, atomic_write_text
from .ranker import SPECIAL_TOKENS, CrossEncoder, PackedBatch

# 2: max_seqlen and wordpiece_vocab_size; 3: the package's metadata; 4: export_id (settings.txt and the
# package) and the text files' fnv1a64 lines (bindings/src/export_dir.h kFormatVersion)
FORMAT_VERSION = 4
PACKAGE_FILE = "model.pt2"
VOCAB_FILE = "vocab.txt"
RULES_FILE = "text_rules.tsv"
SETTINGS_FILE = "settings.txt"
EXPORT_FILES = frozenset({PACKAGE_FILE, VOCAB_FILE, RULES_FILE, SETTINGS_FILE})
MAX_PACKED_TOKENS = 1 << 20  # upper bound of the exported shapes; the C++ packer splits larger batches
MAX_BATCH = 1 << 16
EXPORT_DTYPES = (torch.float32, torch.bfloat16)


class ExportEncoder(nn.Module):
    """The packed BERT forward in a form ``torch.export`` traces (see the module docstring).

    Shares the HF model's parameters except the fused [3H, H] QKV weight, a frozen copy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        bert = model.bert
        self.embeddings = bert.embeddings
        self.layers = bert.encoder.layer
        self.pooler = bert.pooler
        self.classifier = model.classifier
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                a = layer.attention.self
                qkv = (a.query, a.key, a.value)
                self.register_buffer(f"qkv_weight_{i}", torch.cat([m.weight for m in qkv]))
                self.register_buffer(f"qkv_bias_{i}", torch.cat([m.bias for m in qkv]))

    def forward(self, input_ids, token_type_ids, position_ids, pad_index, token_slot, cls_index):
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids) \
            + emb.position_embeddings(position_ids)
        h = emb.LayerNorm(x)
        T, hidden = h.shape
        B, L = pad_index.shape
        key_mask = (pad_index < T)[:, None, None, :]  # every sequence has >= 3 real keys: no empty row

        def padded(t):  # [T, hidden] -> [B, heads, L, head_dim], zero rows in the padding
            t = torch.cat([t, t.new_zeros(1, hidden)])[pad_index]
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        for i, layer in enumerate(self.layers):
            qkv = F.linear(h, getattr(self, f"qkv_weight_{i}"), getattr(self, f"qkv_bias_{i}"))
            q, k, v = qkv.split(hidden, dim=1)
            ctx = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=key_mask)
            ctx = ctx.transpose(1, 2).reshape(B * L, hidden)[token_slot]
            out = layer.attention.output
            h = out.LayerNorm(out.dense(ctx) + h)
            h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
        pooled = torch.tanh(self.pooler.dense(h[cls_index]))
        return self.classifier(pooled).squeeze(-1)


def export_inputs(encoded: Sequence[tuple[Sequence[int], int]],
                  token_multiple: int = 1) -> tuple[torch.Tensor, ...]:
    """The six input tensors of ``ExportEncoder`` for encoded pairs (``CrossEncoder.encode_pairs``):
    the layout the C++ packer builds, here for the trace example and the tests.  ``token_multiple``:
    the token stream padded to a multiple of it with rows of zeros that no sequence attends to, as
    the C++ packer pads a bf16 package's (so the linears see few distinct row counts)."""
    if token_multiple < 1:
        raise ValueError(f"token_multiple must be >= 1, got {token_multiple}")
    batch = PackedBatch(encoded)  # ids / token types / positions, and the checks on the sequences
    n, B, L = batch.input_ids.numel(), len(batch.lens), batch.max_seqlen
    T = -(-n // token_multiple) * token_multiple
    slot = batch.position_ids + torch.repeat_interleave(torch.arange(B) * L, torch.tensor(batch.lens))
    pad_index = torch.full((B * L,), T, dtype=torch.long)
    pad_index[slot] = torch.arange(n)
    extra = torch.zeros(T - n, dtype=torch.long)
    return (torch.cat([batch.input_ids, extra]), torch.cat([batch.token_type_ids, extra]),
            torch.cat([batch.position_ids, extra]), pad_index.view(B, L), torch.cat([slot, extra]),
            batch.cu_seqlens[:-1].long())


# --------------------------------------------------------------------------------------------
# tokenizer tables
# --------------------------------------------------------------------------------------------
def _check_tokenizer(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"export needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    parts = {k: (spec.get(k) or {}).get("type") for k in ("normalizer", "pre_tokenizer", "model")}
    want = {"normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer", "model": "WordPiece"}
    wrong = {k: v for k, v in parts.items() if v != want[k]}
    if wrong:
        raise ValueError(f"export supports BERT WordPiece tokenizers ({want}); this one has {wrong}")
    # HF then tokenises "[SEP]" in user text as plain text; the C++ tokenizer always matches it verbatim.
    if getattr(tokenizer, "split_special_tokens", False) or getattr(backend, "encode_special_tokens", False):
        raise ValueError("export needs special tokens matched verbatim in text; this tokenizer has "
                         "split_special_tokens=True, which the C++ tokenizer does not support")
    for t in spec.get("added_tokens", []):
        if t["normalized"] or t["lstrip"] or t["rstrip"] or t["single_word"]:
            raise ValueError(f"added token {t['content']!r} needs matching rules the C++ tokenizer lacks "
                             "(only verbatim, un-normalised added tokens are supported)")
    return spec


def _code_points():
    for cp in range(0x110000):
        if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not characters
            yield cp


def text_rules(tokenizer) -> list[str]:
    """``text_rules.tsv`` lines (see the header it writes) read off the fast tokenizer."""
    import tokenizers

    backend = tokenizer.backend_tokenizer
    normalize, pre_tokenize = backend.normalizer.normalize_str, backend.pre_tokenizer.pre_tokenize_str
    norm: list[tuple[int, str, str]] = []  # (code point, kind, replacement hex)
    split: list[tuple[int, str, str]] = []
    for cp in _code_points():
        c = chr(cp)
        r = normalize(c)
        if r != c:
            if r == "":
                norm.append((cp, "drop", ""))
            elif r == f" {c} ":
                norm.append((cp, "isolate", ""))
            else:
                norm.append((cp, "map", " ".join(f"{ord(x):X}" for x in r)))
        parts = pre_tokenize(f"a{c}a")
        if len(parts) == 2:
            split.append((cp, "space", ""))
        elif len(parts) == 3:
            split.append((cp, "punct", ""))
        elif len(parts) != 1:
            raise ValueError(f"pre-tokenizer splits 'a{c}a' (U+{cp:04X}) into {len(parts)} pieces; "
                             "not a BERT pre-tokenizer")
    lines = [
        "# relsum text rules: TABLE<TAB>FIRST<TAB>LAST<TAB>KIND[<TAB>REPLACEMENT], code points in hex",
        "# norm: drop | isolate (surround with spaces) | map (to REPLACEMENT's code points)",
        "# split (on normalised text): space (word break) | punct (a word of its own)",
        f"# read off the tokenizer's own normalizer and pre-tokenizer (tokenizers {tokenizers.__version__})",
    ]
    for table, rows in (("norm", norm), ("split", split)):
        start = 0
        for i in range(1, len(rows) + 1):  # merge runs of consecutive code points with equal rules
            if i < len(rows) and rows[i][0] == rows[i - 1][0] + 1 and rows[i][1:] == rows[start][1:]:
                continue
            cp0, kind, rep = rows[start]
            lines.append("\t".join([table, f"{cp0:X}", f"{rows[i - 1][0]:X}", kind] + ([rep] if rep else [])))
            start = i
    return lines


def _vocab_lines(tokenizer) -> list[str]:
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        if not 0 <= i < len(tokens) or tokens[i] is not None:
            raise ValueError(f"the vocabulary's ids are not 0..{len(vocab) - 1} (token {tok!r} has id {i})")
        if any(ch in tok for ch in "\n\r"):
            raise ValueError(f"token {tok!r} contains a line break; it cannot go into {VOCAB_FILE}")
        tokens[i] = tok
    return tokens


def _wordpiece_vocab_size(spec: dict) -> int:
    """How many of ``vocab.txt``'s ids are the WordPiece model's own: HF matches the added tokens past
    them only verbatim, never as a piece of a word, and so must the C++ tokenizer."""
    ids = sorted(spec["model"]["vocab"].values())
    if ids != list(range(len(ids))):
        raise ValueError("the WordPiece vocabulary's ids are not 0..N-1; the C++ tokenizer needs them first")
    return len(ids)


def _settings(ce: CrossEncoder, spec: dict, dtype: torch.dtype) -> list[str]:
    model = spec["model"]
    tok = ce.tokenizer
    rows = [
        ("format", FORMAT_VERSION),
        ("max_length", ce.max_length),
        ("max_seqlen", ce.max_length),  # the package's bound: the C++ rejects a max_length edited above it
        ("query_max_tokens", ce.query_max_tokens),
        ("cls_id", tok.cls_token_id),
        ("sep_id", tok.sep_token_id),
        ("unk_id", tok.convert_tokens_to_ids(model["unk_token"])),
        ("two_token_types", int(ce._two_types)),
        ("wordpiece_vocab_size", _wordpiece_vocab_size(spec)),
        ("continuing_subword_prefix", model["continuing_subword_prefix"]),
        ("max_input_chars_per_word", model["max_input_chars_per_word"]),
        ("max_packed_tokens", MAX_PACKED_TOKENS),
        ("max_batch", MAX_BATCH),
        ("dtype", str(dtype).removeprefix("torch.")),
    ]
    rows += [("added_token", f"{t['id']} {t['content']}") for t in spec.get("added_tokens", [])]
    for k, v in rows:
        if any(ch in str(v) for ch in "\n\r"):
            raise ValueError(f"{k} {v!r} contains a line break; it cannot go into {SETTINGS_FILE}")
    return [f"{k} {v}" for k, v in rows]


def fnv1a64(data: bytes) -> str:
    """FNV-1a 64 of ``data`` as 16 hex digits (bindings/src/export_dir.cpp computes the same)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def checksum_lines(files: dict[str, bytes]) -> list[str]:
    """settings.txt's ``fnv1a64 NAME HEX`` lines for the export's other text files."""
    return [f"fnv1a64 {name} {fnv1a64(data)}" for name, data in files.items()]


# x86 vector extensions a -march=native build may use (names as /proc/cpuinfo spells them).
ISA_FLAGS = ("sse4_1", "sse4_2", "popcnt", "abm", "movbe", "bmi1", "bmi2", "fma", "f16c", "avx", "avx2",
             "avx_vnni", "avx_vnni_int8", "avx_ne_convert", "avx_ifma", "gfni", "vaes", "vpclmulqdq",
             "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi",
             "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_vp2intersect",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "amx_complex")


def cpu_isa_flags() -> list[str]:
    """The ``ISA_FLAGS`` this CPU has ([] where /proc/cpuinfo cannot tell, e.g. off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return [f for f in ISA_FLAGS if f in have]


# Compile targets: "native" (-march=native, the exporting CPU's vector extensions: serves only on
# CPUs that have them) or "x86-64-v3" (AVX2, FMA, F16C, BMI: any x86 server since about 2015);
# "auto" is x86-64-v3 on x86 and native elsewhere.  The GEMMs are ATen calls that pick their kernels
# at run time either way; the target decides the compiled pointwise and fused code.  On the 2-core
# AMX Xeon, MiniLM's C++ rank() of 100 candidates took 904 ms for x86-64-v3 against 1076 ms native
# in fp32, and 345-373 against 343-346 ms in bf16 (benchmarks/results/cpu-xeon-amx).
TARGETS = ("auto", "native", "x86-64-v3")
X86_64_V3_FLAGS = ("sse4_1", "sse4_2", "popcnt", "abm", "movbe", "bmi1", "bmi2", "fma", "f16c", "avx", "avx2")


def _on_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "auto":
        return "x86-64-v3" if _on_x86() else "native"
    return target


def _target_configs(target: str) -> dict:
    if target == "native":
        return {}
    if not _on_x86():
        raise ValueError(f"target {target} is an x86 target; this machine is {platform.machine()}")
    return {"cpp.march": target, "cpp.simdlen": 256}  # 256-bit vectors: AVX2 kernels, no AVX-512


def package_metadata(model: nn.Module, target: str = "native") -> dict[str, str]:
    """What model.pt2 records about itself for the C++ checks (module docstring)."""
    emb = model.bert.embeddings
    flags = cpu_isa_flags() if target == "native" else list(X86_64_V3_FLAGS)
    return {"relsum_word_rows": str(emb.word_embeddings.num_embeddings),
            "relsum_position_rows": str(emb.position_embeddings.num_embeddings),
            "relsum_type_rows": str(emb.token_type_embeddings.num_embeddings),
            "relsum_cpu_flags": " ".join(flags)}


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def check_export_dir(out: str | Path, model_dir: str | Path | None = None) -> Path:
    """``out`` as the path to export to, or FileExistsError: replacing it must not lose anything but a
    previous export.  Allowed: a missing path, an empty directory, or a directory holding only the
    export's own files.  Refused: anything else (a run folder, ``.``, a regular file, a symlink), and
    ``model_dir`` itself or a directory containing it (the checkpoint being exported)."""
    out = Path(out)
    if out.name in ("", ".."):  # "." or "a/..": atomic_write_dir needs a real name beside its parent
        out = out.resolve()
    if model_dir and Path(model_dir).is_dir():  # a hub id names no folder here
        model, target = Path(model_dir).resolve(), out.resolve()
        if target == model or target in model.parents:
            raise FileExistsError(f"export directory {out} is or contains the model directory {model_dir}; "
                                  "choose another --out")
    if out.is_symlink():
        raise FileExistsError(f"export directory {out} is a symbolic link; refusing to replace it")
    if not out.exists():
        return out
    if not out.is_dir():
        raise FileExistsError(f"export directory {out} exists and is not a directory; refusing to replace it")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES or not p.is_file())
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(f"export directory {out} holds files that are not a previous export ({shown}); "
                              "refusing to replace it: choose a new or empty --out")
    return out


def export_ranker(ranker: CrossEncoder | str | Path, out: str | Path, *,
                  dtype: torch.dtype = torch.float32, target: str = "auto") -> Path:
    """Write the directory described in the module docstring to ``out`` (atomically: a failure
    leaves any previous export intact).  ``ranker``: a ``CrossEncoder`` or a checkpoint path for
    ``CrossEncoder.from_pretrained``.  The package targets the CPU (the model is copied there; the
    ``CrossEncoder`` is left as it was) in ``dtype``: float32, or bfloat16 for CPUs with bf16 dot
    products (AVX512-BF16, AMX), where it runs about twice as fast (scores move by ~1e-2).
    Compiling takes ~15 s for a tiny model, ~25 s for MiniLM on two cores.  ``out`` must be missing,
    empty or a previous export (``check_export_dir``), else FileExistsError before any work.
    ``target``: one of ``TARGETS`` (``"native"`` serves only on CPUs with the exporting CPU's vector
    extensions; ``"x86-64-v3"`` on any AVX2 x86 CPU; ``"auto"``, the default, is x86-64-v3 on x86)."""
    import copy

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(map(str, EXPORT_DTYPES))}, got {dtype}")
    target = _resolve_target(target)
    compile_configs = _target_configs(target)
    # HF records the checkpoint folder a model was loaded from; "" for one built in memory.
    model_dir = getattr(ranker.model, "name_or_path", "") if isinstance(ranker, CrossEncoder) else ranker
    out = check_export_dir(out, model_dir)
    if not isinstance(ranker, CrossEncoder):
        ranker = CrossEncoder.from_pretrained(ranker, device="cpu")
    spec = _check_tokenizer(ranker.tokenizer)
    model = copy.deepcopy(ranker.model).to(device="cpu", dtype=dtype).eval()
    encoder = ExportEncoder(model).eval()
    example = export_inputs(ranker.encode_pairs([("a query", "a document"), ("q", "a longer document text")]))
    T = torch.export.Dim("tokens", min=SPECIAL_TOKENS, max=MAX_PACKED_TOKENS)
    B = torch.export.Dim("pairs", min=1, max=MAX_BATCH)
    L = torch.export.Dim("max_seqlen", min=SPECIAL_TOKENS, max=ranker.max_length)
    dynamic = ({0: T}, {0: T}, {0: T}, {0: B, 1: L}, {0: T}, {0: B})
    with torch.no_grad():
        program = torch.export.export(encoder, example, dynamic_shapes=dynamic)
    vocab = _vocab_lines(ranker.tokenizer)
    if len(vocab) > ranker.vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model only {ranker.vocab_size} "
                         "embedding rows (added tokens without resize_token_embeddings?)")
    texts = {VOCAB_FILE: "\n".join(vocab) + "\n", RULES_FILE: "\n".join(text_rules(ranker.tokenizer)) + "\n"}
    data = {name: text.encode("utf-8") for name, text in texts.items()}
    # A fresh id a run: the C++ refuses settings.txt and model.pt2 of two exports (one replaced mid-load).
    export_id = uuid.uuid4().hex
    settings = _settings(ranker, spec, dtype) + [f"target {target}", f"export_id {export_id}",
                                                 *checksum_lines(data)]
    metadata = {**package_metadata(model, target), "relsum_export_id": export_id}
    configs = {"aot_inductor.metadata": metadata, **compile_configs}

    def fill(tmp: Path) -> None:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / PACKAGE_FILE),
                                                 inductor_configs=configs)
        for name, payload in data.items():
            atomic_write_bytes(tmp / name, payload)
        atomic_write_text(tmp / SETTINGS_FILE, "\n".join(settings) + "\n")

    return atomic_write_dir(out, fill)
