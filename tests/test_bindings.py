"""The C++ API (bindings/) against Python: `relsum export-ranker`, then the CMake build, then the same
tokens and scores as ``CrossEncoder`` on the bundled ESCI texts and on hostile strings.

Costs about a minute and a half: one C++ build, two AOTInductor compiles of a tiny model (fp32, bf16)
and three of a one-line stand-in model."""

import os
import platform
import random
import re
import shutil
import subprocess
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from relsum_core import cli  # noqa: E402
from relsum_core import export as export_module  # noqa: E402
from relsum_core.data import load_dataset  # noqa: E402
from relsum_core.export import (  # noqa: E402
    FORMAT_VERSION,
    MAX_PACKED_TOKENS,
    X86_64_V3_FLAGS,
    ExportEncoder,
    _check_tokenizer,
    _settings,
    _vocab_lines,
    _wordpiece_vocab_size,
    check_export_dir,
    checksum_lines,
    cpu_isa_flags,
    export_inputs,
    export_ranker,
    fnv1a64,
    package_metadata,
    text_rules,
)
from relsum_core.io import _exchange  # noqa: E402
from relsum_core.ranker import CrossEncoder  # noqa: E402
from relsum_core.rerank_lines import escape  # noqa: E402
from relsum_core.text import attributes_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

HOSTILE = [
    "", " ", "\t\n", "café crème brûlée", "ÀÉÎÕÜ ÅÆØ ß ẞ", "Σίσυφος ΣΑΣ ςσ", "İstanbul ǅungla ﬁne ﬀ",
    "Москва ЁЖИК", "中文字符和日本語のテキスト 한국어", "emoji 😀👍🏽 ok", "zero\u200bwidth\u200dj",
    "control\x00\x01\x7f\x1b chars", "nbsp\u00a0and\u3000ideographic", "line\u2028sep\u2029para",
    "x[SEP]y [cls] [MASK]z [PAD][UNK]", "[CLS]", "a" * 101, "b" * 100, "supercalifragilisticexpialidocious",
    "$19.99 & 50% off!!! (2-pack) #1 @home <b>bold</b>", "e\u0301 o\u0308 a\u0327\u0301", "\ufffd\ufeffbom",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "Ⅻ ① ½ ㎏ ™", "tab\there", "back\\slash", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "ﷺ ﷽",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over the parts of Unicode a tokenizer gets wrong first."""
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
             (0x900, 0x97F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x4E80),
             (0xAC00, 0xAC40), (0xFB00, 0xFB4F), (0xFE00, 0xFE6F), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F),
             (0x1D400, 0x1D4FF), (0x0, 0x1F)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.7 else rng.choice(" abcde"))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ bindings cannot be built")
    build = tmp_path_factory.mktemp("bindings_build")
    prefix = torch.utils.cmake_prefix_path
    for step in (["cmake", "-S", str(REPO / "bindings"), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
                 ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return build


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory) -> Path:
    """A tiny random ranker with MiniLM's real tokenizer; weights large enough that scores spread."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from conftest import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1, initializer_range=0.2)
    path = tmp_path_factory.mktemp("spread_ranker")
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(ranker_dir, tmp_path_factory) -> Path:
    """`relsum export-ranker` on the tiny checkpoint (MiniLM's real tokenizer), as a user runs it."""
    out = tmp_path_factory.mktemp("export") / "ranker"
    assert cli.main(["export-ranker", "--model", str(ranker_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ranker(ranker_dir) -> CrossEncoder:
    return CrossEncoder.from_pretrained(ranker_dir, device="cpu")


@pytest.fixture(scope="module")
def native_exported(ranker, tmp_path_factory) -> Path:
    """A second export of the same checkpoint (--target native): another export_id, the same vocab.txt."""
    return export_ranker(ranker, tmp_path_factory.mktemp("native") / "ranker", target="native")


def _run(binaries: Path, args: list[str], lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(binaries / "relsum_rerank"), *args], input="".join(f"{x}\n" for x in lines),
                          capture_output=True, text=True, encoding="utf-8", errors="surrogateescape")


@pytest.fixture(scope="module")
def esci_texts() -> tuple[list[str], list[str]]:
    products, judgments = load_dataset()
    queries = sorted({j.query for j in judgments})
    docs = [f"{p.title} {attributes_text(p)}" for p in sorted(products.values(), key=lambda p: p.product_id)]
    return queries, docs


def test_tokenizer_matches_hf_on_esci_and_hostile_text(binaries, exported, ranker, esci_texts):
    queries, docs = esci_texts
    texts = queries + docs + HOSTILE + _random_texts(400)
    done = _run(binaries, [str(exported), "--tokenize"], [escape(t) for t in texts])
    assert done.returncode == 0, done.stderr
    got = [[int(x) for x in line.split()] for line in done.stdout.splitlines()]
    assert len(got) == len(texts)
    want = ranker.tokenizer(texts, add_special_tokens=False)["input_ids"]
    wrong = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts tokenised differently, first: {wrong[0]}"


def test_tokenizer_builds_and_runs_without_libtorch(exported, ranker, esci_texts, tmp_path):
    """-DRELSUM_TOKENIZER_ONLY=ON with no libtorch to find: relsum_tokenizer alone builds, and a
    program linking only it tokenises like Hugging Face."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ bindings cannot be built")
    build = tmp_path / "build"
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_PREFIX_PATH", "Torch_DIR")}
    for step in (["cmake", "-S", str(REPO / "bindings"), "-B", str(build), "-DRELSUM_TOKENIZER_ONLY=ON"],
                 ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(step, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not (build / "relsum_rerank").exists()  # the libtorch targets were left out
    queries, docs = esci_texts
    texts = [t for t in queries + docs[:300] + HOSTILE if "\n" not in t and "\r" not in t]
    done = subprocess.run([str(build / "relsum_tokenizer_test"), str(exported)], input="".join(
        f"{t}\n" for t in texts), capture_output=True, text=True, encoding="utf-8", errors="surrogateescape")
    assert done.returncode == 0, done.stderr
    got = [[int(x) for x in line.split()] for line in done.stdout.splitlines()]
    assert got == ranker.tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_scores_match_python_predict(binaries, exported, ranker, esci_texts):
    queries, docs = esci_texts
    rng = random.Random(0)
    # mixed lengths: short titles to docs far past max_length (128), plus empty strings
    pairs = [(rng.choice(queries), rng.choice(docs)[: rng.choice([20, 80, 400, 4000])]) for _ in range(150)]
    pairs += [("", ""), ("", "a doc"), ("a query", ""), ("x " * 300, "y " * 300)]
    lines = [f"{escape(q)}\t{escape(d)}" for q, d in pairs]
    done = _run(binaries, [str(exported), "--batch-size", "32"], lines)
    assert done.returncode == 0, done.stderr
    got = np.array([float(x) for x in done.stdout.split()], dtype=np.float32)
    want = ranker.predict(pairs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert np.std(want) > 0.05  # the scores differ between pairs: the comparison can fail

    ids = _run(binaries, [str(exported), "--encode-pair"], lines)
    assert ids.returncode == 0, ids.stderr
    got_ids = [[int(x) for x in line.split()] for line in ids.stdout.splitlines()]
    assert got_ids == [e[0] for e in ranker.encode_pairs(pairs)]
    assert max(map(len, got_ids)) == ranker.max_length  # the truncation rule was exercised


def test_rank_matches_python_rank(binaries, exported, ranker, esci_texts):
    queries, docs = esci_texts
    query, cands = queries[3], docs[:60]
    done = _run(binaries, [str(exported), "--rank", "--top-k", "10"], [escape(t) for t in (query, *cands)])
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    want = ranker.rank(query, cands, top_k=10)
    assert [int(r[0]) for r in rows] == [w["corpus_id"] for w in want]
    np.testing.assert_allclose([float(r[1]) for r in rows], [w["score"] for w in want], atol=1e-4)


def test_identical_docs_tie_in_corpus_order(binaries, exported, esci_texts):
    """A shop's duplicate listings: scored once, so they tie exactly and keep corpus order (in a batch
    of mixed lengths a score can depend on its row)."""
    queries, docs = esci_texts
    a, d, b = docs[10][:400], docs[11][:120], docs[12][:300]
    cands = [a, d, d, d, b, d]
    done = _run(binaries, [str(exported), "--rank"], [escape(t) for t in (queries[0], *cands)])
    assert done.returncode == 0, done.stderr
    rows = [(int(i), float(s)) for i, s in (line.split("\t") for line in done.stdout.splitlines())]
    dups = [(i, s) for i, s in rows if i in (1, 2, 3, 5)]
    assert [i for i, _ in dups] == [1, 2, 3, 5] and len({s for _, s in dups}) == 1
    # Same ids, other token types: a literal [SEP] moves where the query ends.  Not duplicates.
    pairs = ["red [SEP] shoe\tgarden hose", "red\tshoe [SEP] garden hose"]
    together = _run(binaries, [str(exported)], pairs)
    alone = [_run(binaries, [str(exported)], [p]) for p in pairs]
    assert together.returncode == 0 and all(a.returncode == 0 for a in alone)
    got, want = [float(x) for x in together.stdout.split()], [float(a.stdout) for a in alone]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert abs(want[0] - want[1]) > 1e-3


def test_python_rerank_cli_writes_what_relsum_rerank_does(binaries, exported, ranker_dir, esci_texts,
                                                          monkeypatch, capsys):
    """`relsum rerank --model CKPT` and `relsum_rerank EXPORT` on the same lines: the same output, so a
    service can diff its export against the checkpoint it came from."""
    import io
    import sys

    queries, docs = esci_texts
    texts = [queries[3], *(d[:250] for d in docs[40:70]), "tab\there, break\nthere, back\\slash"]
    for args, lines in (([], [f"{escape(queries[3])}\t{escape(d)}" for d in texts[1:]]),
                        (["--rank", "--top-k", "7"], [escape(t) for t in texts])):
        cpp = _run(binaries, [str(exported), *args], lines)
        assert cpp.returncode == 0, cpp.stderr
        stdin = "".join(f"{x}\n" for x in lines).encode()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        assert cli.main(["rerank", "--model", str(ranker_dir), "--device", "cpu", *args]) == 0
        py = capsys.readouterr().out
        assert len(py.splitlines()) == len(cpp.stdout.splitlines()) == (7 if args else len(lines))
        for p_line, c_line in zip(py.splitlines(), cpp.stdout.splitlines()):
            p_fields, c_fields = p_line.split("\t"), c_line.split("\t")
            assert p_fields[:-1] == c_fields[:-1]  # the same corpus ids in the same order
            assert abs(float(p_fields[-1]) - float(c_fields[-1])) < 1e-4


def test_cpp_api_checks(binaries, exported):
    """bindings/tests/test_api.cpp: ordering, top_k, batching, threads, truncation, bad input."""
    done = subprocess.run([str(binaries / "relsum_api_test"), str(exported)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "all checks passed" in done.stdout


def test_cli_bad_input_is_a_clear_error(binaries, exported, tmp_path):
    bad_utf8 = subprocess.run([str(binaries / "relsum_rerank"), str(exported)], input=b"caf\xc3\tdoc\n",
                              capture_output=True)
    assert bad_utf8.returncode == 1 and b"not valid UTF-8" in bad_utf8.stderr
    no_tab = _run(binaries, [str(exported)], ["query without a doc"])
    assert no_tab.returncode == 1 and "line 1: expected QUERY<TAB>DOC" in no_tab.stderr
    empty_rank = _run(binaries, [str(exported), "--rank"], ["just a query"])
    assert empty_rank.returncode == 1 and "docs is empty" in empty_rank.stderr
    missing = _run(binaries, [str(tmp_path / "nope")], ["q\td"])
    assert missing.returncode == 1 and "cannot read" in missing.stderr and "settings.txt" in missing.stderr
    assert _run(binaries, [str(exported), "--frobnicate"], []).returncode == 2
    negative = _run(binaries, [str(exported), "--rank", "--top-k", "-1"], ["q", "d"])
    assert negative.returncode == 1 and "--top-k needs a count (digits only), got -1" in negative.stderr
    not_ranking = _run(binaries, [str(exported), "--top-k", "2"], ["q\td"])
    assert not_ranking.returncode == 1 and "--top-k needs --rank" in not_ranking.stderr

    newer = tmp_path / "newer"
    shutil.copytree(exported, newer)
    settings = newer / "settings.txt"
    good = settings.read_text()
    current = f"format {FORMAT_VERSION}\n"
    settings.write_text(good.replace(current, f"format {FORMAT_VERSION + 1}\n"))
    future = _run(binaries, [str(newer)], ["q\td"])
    assert future.returncode == 1 and f"export format {FORMAT_VERSION + 1}" in future.stderr
    settings.write_text(good.replace(current, f"format {FORMAT_VERSION - 1}\n"))
    older = _run(binaries, [str(newer)], ["q\td"])
    assert older.returncode == 1 and f"export format {FORMAT_VERSION - 1}" in older.stderr
    assert "re-export" in older.stderr

    settings.write_text(good.replace("added_token 101 [CLS]", "added_token 7 [CLS]"))
    wrong_id = _run(binaries, [str(newer), "--tokenize"], ["abc"])
    assert wrong_id.returncode == 1 and "added_token `7 [CLS]` does not match vocab.txt" in wrong_id.stderr

    (newer / "text_rules.tsv").write_text("norm\t41\tZZ\tmap\t61\n")
    settings.write_text(good)
    _rehash(newer)  # an edit the checksums agree with: the parser's own error
    broken = _run(binaries, [str(newer), "--tokenize"], ["abc"])
    assert broken.returncode == 1 and "text_rules.tsv:1: bad code point `ZZ`" in broken.stderr

    shutil.copy(exported / "text_rules.tsv", newer / "text_rules.tsv")
    settings.write_text(good)
    (newer / "model.pt2").unlink()
    no_model = _run(binaries, [str(newer)], ["q\td"])
    assert no_model.returncode == 1 and f"cannot read {newer / 'model.pt2'}" in no_model.stderr


def _rehash(export: Path) -> None:
    """settings.txt's checksums made to match the files as they are (an edit made on purpose)."""
    settings = export / "settings.txt"
    kept = [line for line in settings.read_text().splitlines() if not line.startswith("fnv1a64 ")]
    files = {name: (export / name).read_bytes() for name in ("vocab.txt", "text_rules.tsv")}
    settings.write_text("\n".join(kept + checksum_lines(files)) + "\n")


def _export_id(export: Path) -> str:
    lines = (export / "settings.txt").read_text().splitlines()
    return next(line.split()[1] for line in lines if line.startswith("export_id "))


def _with_setting(settings: str, key: str, value: str) -> str:
    lines = settings.splitlines()
    assert sum(line.startswith(f"{key} ") for line in lines) == 1, key
    return "".join(f"{key} {value}\n" if line.startswith(f"{key} ") else f"{line}\n" for line in lines)


def test_settings_out_of_range_are_clear_errors(binaries, exported, tmp_path):
    """Hand-edited settings.txt: ids past the vocabulary, a max_length past the exported shapes, negative
    sizes: each a clear error before the model loads, not a wrapped-around size or an out-of-bounds read."""
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    good = (exported / "settings.txt").read_text()
    assert "max_seqlen 128\n" in good and "wordpiece_vocab_size 30522\n" in good
    cases = [  # key, value, relsum_rerank mode, expected message
        ("max_length", "1000", "--encode-pair", "`max_length` is 1000, outside 3..128 (the package"),
        ("max_length", "-5", "--encode-pair", "`max_length` is -5, outside 3..128"),
        ("max_length", "", "--encode-pair", "`max_length` is not an integer"),
        ("max_seqlen", str(MAX_PACKED_TOKENS + 1), "--encode-pair", "`max_seqlen` is 1048577, outside"),
        ("query_max_tokens", "-1", "--encode-pair", "`query_max_tokens` is -1, outside 0.."),
        ("cls_id", "30522", "--encode-pair", "`cls_id` is 30522, outside 0..30521"),
        ("sep_id", "-1", "--encode-pair", "`sep_id` is -1, outside 0..30521"),
        ("two_token_types", "2", "--encode-pair", "`two_token_types` is 2, outside 0..1"),
        ("max_batch", "0", "", "`max_batch` is 0, outside 1.."),
        ("max_packed_tokens", "-1", "", "`max_packed_tokens` is -1, outside 3.."),
        ("unk_id", "30522", "--tokenize", "`unk_id` is 30522, outside 0..30521"),
        ("max_input_chars_per_word", "-1", "--tokenize", "`max_input_chars_per_word` is -1, outside 0.."),
        ("wordpiece_vocab_size", "30523", "--tokenize", "`wordpiece_vocab_size` is 30523, outside 1..30522"),
    ]
    for key, value, mode, message in cases:
        (edited / "settings.txt").write_text(_with_setting(good, key, value))
        done = _run(binaries, [str(edited), *([mode] if mode else [])], ["q\td"])
        assert done.returncode == 1 and message in done.stderr, (key, value, done.stderr)
        assert str(edited / "settings.txt") in done.stderr


def test_broken_model_is_a_clear_error(binaries, exported, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported, corrupt)
    (corrupt / "model.pt2").write_bytes(b"not a zip archive")
    done = _run(binaries, [str(corrupt)], ["q\td"])
    assert done.returncode == 1 and f"relsum: {corrupt / 'model.pt2'}: cannot load" in done.stderr
    assert "Exception raised from" not in done.stderr  # libtorch's backtrace left out

    # A vocab.txt grown by hand past the model's embeddings, or a max_seqlen past its positions: with
    # a real-size model the bounds check inside the package aborts the process (it throws inside an
    # OpenMP region), so the load refuses them against the package's own record of its embeddings.
    grown = tmp_path / "grown"
    shutil.copytree(exported, grown)
    with open(grown / "vocab.txt", "a") as f:
        f.write("zzqxw\n")
    (grown / "settings.txt").write_text(_with_setting((grown / "settings.txt").read_text(),
                                                      "wordpiece_vocab_size", "30523"))
    _rehash(grown)
    done = _run(binaries, [str(grown)], ["zzqxw\tdoc"])
    assert done.returncode == 1
    assert (f"relsum: {grown / 'model.pt2'}: the export's vocab.txt has 30523 tokens, more than this model's "
            "30522 embedding rows") in done.stderr
    longer = tmp_path / "longer"
    shutil.copytree(exported, longer)
    settings = (exported / "settings.txt").read_text()
    for key in ("max_seqlen", "max_length"):
        settings = _with_setting(settings, key, "200")
    (longer / "settings.txt").write_text(settings)
    done = _run(binaries, [str(longer)], ["q\td"])
    assert done.returncode == 1
    assert "`max_seqlen` is 200, more than the model's 128 position embeddings" in done.stderr


def _stand_in_export(exported: Path, dest: Path, metadata: dict | None) -> Path:
    """A copy of ``exported`` whose model.pt2 is a stand-in that takes the six inputs and returns one
    score for any batch, compiled with ``metadata`` (None: the package's own metadata left out).
    The metadata is compiled into the package, so a stand-in is the only way to change it."""

    class OneScore(torch.nn.Module):
        def forward(self, ids, types, pos, pad_index, slot, cls):
            return (ids[:1].float(),)

    T = torch.export.Dim("tokens", min=3, max=4096)
    B = torch.export.Dim("pairs", min=1, max=256)
    L = torch.export.Dim("max_seqlen", min=3, max=128)
    example = (*(torch.zeros(8, dtype=torch.long) for _ in range(3)), torch.zeros(2, 4, dtype=torch.long),
               torch.zeros(8, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    program = torch.export.export(OneScore(), example,
                                  dynamic_shapes=({0: T}, {0: T}, {0: T}, {0: B, 1: L}, {0: T}, {0: B}))
    shutil.copytree(exported, dest)
    (dest / "model.pt2").unlink()
    configs = {"aot_inductor.metadata": metadata} if metadata is not None else None
    torch._inductor.aoti_compile_and_package(program, package_path=str(dest / "model.pt2"),
                                             inductor_configs=configs)
    return dest


def test_package_metadata_guards_the_cpu_and_the_embeddings(binaries, ranker, exported, tmp_path):
    from relsum_core.export import cpu_isa_flags, package_metadata

    meta = package_metadata(ranker.model)
    assert meta["relsum_word_rows"] == "30522" and meta["relsum_position_rows"] == "128"
    assert meta["relsum_type_rows"] == "2" and meta["relsum_cpu_flags"].split() == cpu_isa_flags()
    meta["relsum_export_id"] = _export_id(exported)  # export_ranker adds its run's id
    # Compiled (-march=native) for a CPU with an extension this one lacks: refused, not a SIGILL.
    other = _stand_in_export(exported, tmp_path / "other_cpu", meta | {"relsum_cpu_flags": "avx2 amx_fp99"})
    done = _run(binaries, [str(other)], ["q\td"])
    assert done.returncode == 1
    assert "was compiled for a CPU with amx_fp99, which this CPU lacks" in done.stderr
    # A package without the records (not from this relsum's export): refused by name.
    unrecorded = _stand_in_export(exported, tmp_path / "unrecorded", None)
    done = _run(binaries, [str(unrecorded)], ["q\td"])
    assert done.returncode == 1 and "its metadata lacks `relsum_export_id`" in done.stderr
    # With the records, the stand-in loads; its one score for two pairs is a clear error, not a
    # read past its output.
    swapped = _stand_in_export(exported, tmp_path / "swapped", meta)
    assert _run(binaries, [str(swapped)], ["q\tone doc"]).returncode == 0  # one pair, one score: fine
    done = _run(binaries, [str(swapped)], ["q\tone doc", "q\tanother doc"])
    assert done.returncode == 1
    assert f"relsum: {swapped / 'model.pt2'}: the model returned 1 scores for 2 pairs" in done.stderr


def test_files_of_two_exports_are_refused(binaries, exported, native_exported, tmp_path):
    """What a load sees when `relsum export-ranker` replaces the directory midway (read by path, or
    off Linux), or files copied between exports: settings.txt of one export with model.pt2 of
    another, or a vocab.txt / text_rules.tsv that is not the one settings.txt records."""
    first, second = _export_id(exported), _export_id(native_exported)
    assert first != second and re.fullmatch(r"[0-9a-f]{32}", first)
    assert f'"relsum_export_id": "{first}"'.encode() in _package_code(exported, ".json")
    mixed = tmp_path / "mixed"
    shutil.copytree(exported, mixed)
    shutil.copy(native_exported / "model.pt2", mixed / "model.pt2")
    done = _run(binaries, [str(mixed)], ["q\td"])
    assert done.returncode == 1
    assert (f"relsum: {mixed / 'model.pt2'}: the export changed while loading: settings.txt is export "
            f"{first}, model.pt2 is export {second}; load it again") in done.stderr

    for name in ("vocab.txt", "text_rules.tsv"):
        edited = tmp_path / name
        shutil.copytree(exported, edited)
        data = bytearray((edited / name).read_bytes())
        data[-2] ^= 1  # one byte of the last line
        (edited / name).write_bytes(bytes(data))
        for mode in ([], ["--tokenize"]):  # the Ranker and the Tokenizer alone
            done = _run(binaries, [str(edited), *mode], ["q\td"])
            assert done.returncode == 1
            assert f"relsum: {edited / name} changed while loading, or comes from another export" \
                in done.stderr, done.stderr
            assert f"(export {first}) records" in done.stderr


def test_export_replaced_while_loading_never_mixes(binaries, exported, native_exported, tmp_path):
    """`relsum export-ranker` over a served folder swaps the directories in one step: loads meanwhile
    read every file through one directory handle, so each sees one export whole (read by path, about
    half would combine the two exports' settings.txt and model.pt2)."""
    import threading

    live, other = tmp_path / "ranker", tmp_path / "other"
    shutil.copytree(exported, live)
    shutil.copytree(native_exported, other)
    if not _exchange(other, live):
        pytest.skip("this file system cannot swap two directories in one step (renameat2)")
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            assert _exchange(other, live)

    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        loads = [_run(binaries, [str(live)], ["q\td"]) for _ in range(6)]
    finally:
        stop.set()
        swapper.join()
    assert [d.stderr for d in loads if d.returncode != 0] == []


def _tokenizer_export(ce: CrossEncoder, exported: Path, out: Path) -> Path:
    """What `relsum_rerank --tokenize` reads for ``ce``'s tokenizer, without compiling a model: vocab.txt and
    settings.txt as ``export_ranker`` writes them, the text rules of ``exported`` (same normalizer)."""
    spec = _check_tokenizer(ce.tokenizer)
    out.mkdir()
    shutil.copy(exported / "text_rules.tsv", out)
    (out / "vocab.txt").write_text("\n".join(_vocab_lines(ce.tokenizer)) + "\n", encoding="utf-8")
    files = {name: (out / name).read_bytes() for name in ("vocab.txt", "text_rules.tsv")}
    settings = _settings(ce, spec, torch.float32) + checksum_lines(files)
    (out / "settings.txt").write_text("\n".join(settings) + "\n", encoding="utf-8")
    return out


def _tokenize(binaries: Path, export: Path, texts: list[str]) -> list[list[int]]:
    done = _run(binaries, [str(export), "--tokenize"], [escape(t) for t in texts])
    assert done.returncode == 0, done.stderr
    return [[int(x) for x in line.split()] for line in done.stdout.splitlines()]


def test_added_token_outside_the_vocabulary_matches_only_verbatim(binaries, exported, ranker_dir, tmp_path):
    """HF matches an added token that is not in the WordPiece vocabulary on the raw text only, never as
    a piece of a (normalised) word: "ZZQX" is lower-cased to "zzqx" but still cut into WordPiece pieces."""
    from transformers import AddedToken

    ce = CrossEncoder.from_pretrained(ranker_dir, device="cpu")
    ce.tokenizer.add_tokens([AddedToken("zzqx", normalized=False)])
    out = _tokenizer_export(ce, exported, tmp_path / "added")
    assert "wordpiece_vocab_size 30522\n" in (out / "settings.txt").read_text()
    texts = ["zzqx", "ZZQX", "a ZZQX b", "Zzqx", "xzzqxy", "zzqxzzqx", "zzq", "[CLS]zzqx[SEP]ZZQX"]
    want = ce.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert want[0] == [30522] and 30522 not in want[1]  # the case the C++ got wrong
    assert _tokenize(binaries, out, texts) == want


def test_empty_continuing_subword_prefix(binaries, exported, ranker, ranker_dir, esci_texts, tmp_path):
    ce = CrossEncoder.from_pretrained(ranker_dir, device="cpu")
    ce.tokenizer.backend_tokenizer.model.continuing_subword_prefix = ""
    out = _tokenizer_export(ce, exported, tmp_path / "no_prefix")
    assert "continuing_subword_prefix \n" in (out / "settings.txt").read_text()
    queries, docs = esci_texts
    texts = queries[:100] + docs[:20] + HOSTILE
    want = ce.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert want != ranker.tokenizer(texts, add_special_tokens=False)["input_ids"]  # the prefix matters
    assert _tokenize(binaries, out, texts) == want


def test_export_rejects_split_special_tokens(ranker_dir, tmp_path):
    """With split_special_tokens HF tokenises "[SEP]" in a text as plain text; the C++ cannot follow."""
    from transformers import AutoTokenizer

    ce = CrossEncoder.from_pretrained(ranker_dir, device="cpu")
    ce.tokenizer = AutoTokenizer.from_pretrained(ranker_dir, split_special_tokens=True)
    assert ce.tokenizer.sep_token_id not in ce.tokenizer("x[SEP]y", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="split_special_tokens"):
        export_ranker(ce, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_rejects_a_tokenizer_larger_than_the_embeddings(ranker_dir, tmp_path):
    from tokenizers import AddedToken

    ce = CrossEncoder.from_pretrained(ranker_dir, device="cpu")
    # no resize_token_embeddings: the new id is past the embeddings
    ce.tokenizer.add_tokens([AddedToken("zzqxwnew", normalized=False)])
    with pytest.raises(ValueError, match="30523 tokens but the model only 30522 embedding rows"):
        export_ranker(ce, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_rejects_non_wordpiece_tokenizer(ranker_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ce = CrossEncoder.from_pretrained(ranker_dir, device="cpu")
    bpe = Tokenizer(models.BPE(vocab={"[CLS]": 0, "[SEP]": 1, "a": 2}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    ce.tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, cls_token="[CLS]", sep_token="[SEP]")
    with pytest.raises(ValueError, match="BERT WordPiece"):
        export_ranker(ce, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_export_keeps_the_previous_one(exported, ranker, tmp_path, monkeypatch):
    target = tmp_path / "ranker"
    shutil.copytree(exported, target)
    before = sorted(p.name for p in target.iterdir())

    def boom(*a, **k):
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", boom)
    with pytest.raises(RuntimeError, match="compiler crashed"):
        export_ranker(ranker, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert (target / "model.pt2").stat().st_size == (exported / "model.pt2").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["ranker"]  # no temp dir left behind


@pytest.fixture
def no_compile(monkeypatch):
    """The --out checks must come before tracing and compiling: fail loudly if those are reached."""

    def reached(*a, **k):
        raise AssertionError("export went on to trace / compile before checking --out")

    monkeypatch.setattr("relsum_core.export.ExportEncoder", reached)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", reached)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_export_refuses_to_replace_a_non_export(ranker_dir, ranker, tmp_path, monkeypatch, no_compile):
    """--out used to be replaced whatever it was: a run folder, ".", a regular file (left as .NAME.tmp-*)."""
    run = tmp_path / "run"
    shutil.copytree(ranker_dir, run / "best")
    (run / "metrics.jsonl").write_text("{}\n")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    before = _listing(tmp_path)
    for out in (run, afile, run / "metrics.jsonl"):
        with pytest.raises(FileExistsError, match=re.escape(str(out))):
            export_ranker(ranker, out)
    monkeypatch.chdir(run)
    with pytest.raises(FileExistsError, match="not a previous export"):
        export_ranker(ranker, ".")
    # the model directory itself (found from the CrossEncoder or the path), and a folder containing it
    for model in (ranker, ranker_dir):
        with pytest.raises(FileExistsError, match="model directory"):
            export_ranker(model, ranker_dir)
        with pytest.raises(FileExistsError, match="model directory"):
            export_ranker(model, ranker_dir.parent)
    with pytest.raises(FileExistsError, match="model directory"):
        export_ranker(run / "best", run)
    assert _listing(tmp_path) == before and afile.read_text() == "keep me"


def test_export_dir_check_allows_missing_empty_and_previous_exports(exported, tmp_path):
    assert check_export_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_export_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_export_dir(exported) == exported
    partial = tmp_path / "partial"  # an export's files, but not all of them: still only export files
    partial.mkdir()
    shutil.copy(exported / "vocab.txt", partial)
    assert check_export_dir(partial) == partial
    (partial / "model.pt2").mkdir()  # an export file's name on a directory is not an export file
    with pytest.raises(FileExistsError, match=r"not a previous export \(model.pt2\)"):
        check_export_dir(partial)
    link = tmp_path / "link"
    link.symlink_to(exported)
    with pytest.raises(FileExistsError, match="symbolic link"):
        check_export_dir(link)


def test_cli_export_over_the_model_exits_2(ranker_dir, capsys, no_compile):
    with pytest.raises(SystemExit) as e:
        cli.main(["export-ranker", "--model", str(ranker_dir), "--out", str(ranker_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "FileExistsError" in err and "model directory" in err and "Traceback" not in err


def test_export_encoder_matches_the_packed_encoder(ranker, esci_texts):
    """The traced formulation (padded attention through pad_index) before any compiling."""
    queries, docs = esci_texts
    enc = ranker.encode_pairs([(queries[i], docs[i][: 40 * i]) for i in range(12)] + [("", "")])
    with torch.inference_mode():
        got = ExportEncoder(ranker.model).eval()(*export_inputs(enc))
    np.testing.assert_allclose(got.numpy(), ranker.score_encoded(enc), atol=1e-5, rtol=0)
    # the C++ packer's layout: the stream padded to a multiple of 64 with rows nothing attends to
    for pairs in (enc, enc[-1:]):
        padded = export_inputs(pairs, token_multiple=64)
        assert padded[0].numel() % 64 == 0 and padded[0].numel() > sum(len(ids) for ids, _ in pairs)
        with torch.inference_mode():
            np.testing.assert_allclose(ExportEncoder(ranker.model).eval()(*padded).numpy(),
                                       ExportEncoder(ranker.model).eval()(*export_inputs(pairs)).numpy(),
                                       atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least one sequence"):
        export_inputs([])


def test_text_rules_cover_what_the_tokenizer_changes(ranker):
    rules = [line.split("\t") for line in text_rules(ranker.tokenizer) if not line.startswith("#")]
    norm = {r[3] for r in rules if r[0] == "norm"}
    assert norm == {"drop", "isolate", "map"}
    spans = [(int(r[1], 16), int(r[2], 16)) for r in rules if r[0] == "split"]
    assert spans == sorted(spans) and all(a <= b for a, b in spans)
    assert any(a <= ord(",") <= b for a, b in spans) and any(a <= ord(" ") <= b for a, b in spans)


def _package_code(export: Path, suffixes=(".cpp", ".so")) -> bytes:
    import zipfile

    with zipfile.ZipFile(export / "model.pt2") as z:
        return b"".join(z.read(n) for n in z.namelist() if n.endswith(suffixes))


def test_export_targets(binaries, exported, native_exported, ranker, esci_texts, tmp_path):
    """The default (auto) on x86 is x86-64-v3: AVX2 code only, no -march=native and no AVX-512, so the
    package serves on any AVX2 CPU; --target native compiles for this CPU.  Same scores either way."""
    import platform

    queries, docs = esci_texts
    with pytest.raises(ValueError, match="target must be one of auto, native, x86-64-v3"):
        export_ranker(ranker, tmp_path / "bad", target="avx512")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "target x86-64-v3\n" in (exported / "settings.txt").read_text()
        code = _package_code(exported)
        assert b"-march=x86-64-v3" in code and b"march=native" not in code and b"-mavx512" not in code
    native = native_exported
    assert "target native\n" in (native / "settings.txt").read_text()
    assert b"march=native" in _package_code(native)
    pairs = [(queries[7], d[:300]) for d in docs[:40]]
    done = _run(binaries, [str(native)], [f"{escape(q)}\t{escape(d)}" for q, d in pairs])
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose([float(x) for x in done.stdout.split()], ranker.predict(pairs), atol=1e-4)


def test_bf16_export_scores_and_ranks_like_fp32(binaries, ranker, esci_texts, tmp_path):
    queries, docs = esci_texts
    out = export_ranker(ranker, tmp_path / "bf16", dtype=torch.bfloat16)
    assert "dtype bfloat16" in (out / "settings.txt").read_text()
    pairs = [(queries[5], d[:300]) for d in docs[:80]]
    done = _run(binaries, [str(out)], [f"{escape(q)}\t{escape(d)}" for q, d in pairs])
    assert done.returncode == 0, done.stderr
    got = np.array([float(x) for x in done.stdout.split()])
    want = ranker.predict(pairs)  # fp32
    assert np.abs(got - want).max() < 0.05 * max(1.0, np.abs(want).max())
    assert np.corrcoef(np.argsort(np.argsort(got)), np.argsort(np.argsort(want)))[0, 1] > 0.97
    api = subprocess.run([str(binaries / "relsum_api_test"), str(out)], capture_output=True, text=True)
    assert api.returncode == 0 and "all checks passed" in api.stdout, api.stderr + api.stdout
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_ranker(ranker, tmp_path / "fp16", dtype=torch.float16)


def test_fnv1a64_known_answers():
    """The checksum settings.txt records must be FNV-1a 64 exactly: the C++ recomputes it."""
    from relsum_core.export import checksum_lines, fnv1a64

    assert fnv1a64(b"") == "cbf29ce484222325"
    assert fnv1a64(b"a") == "af63dc4c8601ec8c"
    assert fnv1a64(b"foobar") == "85944171f73967e8"
    assert checksum_lines({"vocab.txt": b"a"}) == ["fnv1a64 vocab.txt af63dc4c8601ec8c"]


# ---------------------------------------------------------------- export's helpers (from mutation testing)
# kills E53 (hex not zero-padded), E54 (checksum lines dropped / reordered)
def test_fnv1a64_keeps_leading_zeros_and_checksums_every_file():
    assert fnv1a64(b"aa") == "089c4307b54596b7"  # a leading 0: the C++ compares all 16 digits
    assert checksum_lines({"vocab.txt": b"aa", "text_rules.tsv": b"a"}) == [
        "fnv1a64 vocab.txt 089c4307b54596b7", "fnv1a64 text_rules.tsv af63dc4c8601ec8c"]


def _fake_tokenizer(vocab: dict[str, int]):
    backend = types.SimpleNamespace(get_vocab=lambda with_added_tokens: dict(vocab))
    return types.SimpleNamespace(backend_tokenizer=backend)


# kills E37 (duplicate ids), E38 (negative ids), E39 (a CR inside a token)
def test_vocab_lines_refuses_what_vocab_txt_cannot_hold():
    assert _vocab_lines(_fake_tokenizer({"b": 1, "a": 0})) == ["a", "b"]
    for vocab in ({"a": 0, "b": 0}, {"a": 0, "b": -1}, {"a": 0, "b": 2}):
        with pytest.raises(ValueError, match="ids are not 0..1"):
            _vocab_lines(_fake_tokenizer(vocab))
    for bad in ("x\ny", "x\ry"):
        with pytest.raises(ValueError, match="contains a line break"):
            _vocab_lines(_fake_tokenizer({"a": 0, bad: 1}))


# kills E41 (gapped WordPiece ids accepted), E42 (the largest id for the count)
def test_wordpiece_vocab_size_needs_ids_0_to_n():
    assert _wordpiece_vocab_size({"model": {"vocab": {"c": 2, "a": 0, "b": 1}}}) == 3
    with pytest.raises(ValueError, match="not 0..N-1"):
        _wordpiece_vocab_size({"model": {"vocab": {"a": 0, "b": 2}}})


# kills E49 (a line break in a settings value written as two lines)
def test_settings_refuse_a_value_with_a_line_break(ranker):
    spec = _check_tokenizer(ranker.tokenizer)
    assert f"query_max_tokens {ranker.query_max_tokens}" in _settings(ranker, spec, torch.float32)
    for bad in ("#\n#", "#\r"):
        spec["model"]["continuing_subword_prefix"] = bad
        with pytest.raises(ValueError, match="continuing_subword_prefix .* contains a line break"):
            _settings(ranker, spec, torch.float32)


# kills E43 (max_seqlen, the package's bound, taken from the position table instead of max_length)
def test_settings_bound_the_sequences_by_the_rankers_max_length(ranker_dir):
    ce = CrossEncoder.from_pretrained(ranker_dir, device="cpu", max_length=40)
    ce.query_max_tokens = 9
    settings = _settings(ce, _check_tokenizer(ce.tokenizer), torch.bfloat16)
    for line in ("max_length 40", "max_seqlen 40", "query_max_tokens 9", "dtype bfloat16"):
        assert line in settings


# kills E47 (two_token_types written as 1 for a model with one token type)
def test_settings_record_a_single_token_type(ranker_dir):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(ranker_dir)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32, type_vocab_size=1, num_labels=1)
    ce = CrossEncoder(BertForSequenceClassification(cfg), tok)
    assert "two_token_types 0" in _settings(ce, _check_tokenizer(tok), torch.float32)


# kills E20 (a slow tokenizer fails with AttributeError), E21 (a non-BERT normalizer / pre-tokenizer
# accepted), E22 / E23 (either split_special_tokens flag missed), E24 / E25 (normalized or lstrip
# added tokens accepted)
def test_check_tokenizer_refuses_what_the_cpp_tokenizer_cannot_follow(ranker_dir):
    from tokenizers import AddedToken, normalizers, pre_tokenizers
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="needs a fast \\(Rust\\) tokenizer, got SimpleNamespace"):
        _check_tokenizer(types.SimpleNamespace())
    for part, value in (("normalizer", normalizers.Lowercase()),
                        ("pre_tokenizer", pre_tokenizers.Whitespace())):
        tok = AutoTokenizer.from_pretrained(ranker_dir)
        setattr(tok.backend_tokenizer, part, value)
        with pytest.raises(ValueError, match=f"BERT WordPiece.*'{part}'"):
            _check_tokenizer(tok)
    tok = AutoTokenizer.from_pretrained(ranker_dir)
    tok.split_special_tokens = True  # the Python-side flag alone
    with pytest.raises(ValueError, match="split_special_tokens"):
        _check_tokenizer(tok)
    tok = AutoTokenizer.from_pretrained(ranker_dir)
    tok.backend_tokenizer.encode_special_tokens = True  # the Rust-side flag alone
    with pytest.raises(ValueError, match="split_special_tokens"):
        _check_tokenizer(tok)
    for option in ("normalized", "lstrip", "rstrip", "single_word"):
        tok = AutoTokenizer.from_pretrained(ranker_dir)
        tok.add_tokens([AddedToken("zzqx", **{"normalized": False, option: True})])
        with pytest.raises(ValueError, match="added token 'zzqx' needs matching rules"):
            _check_tokenizer(tok)


# kills E26 (code points past the BMP left out), E28/E29/E30/E32/E33/E35 (rules that disagree with
# the tokenizer they were read off: merged across gaps or replacements, kinds swapped, empty fields)
def test_text_rules_agree_with_the_tokenizer_code_point_by_code_point(ranker):
    import bisect

    backend = ranker.tokenizer.backend_tokenizer
    normalize, pre_tokenize = backend.normalizer.normalize_str, backend.pre_tokenizer.pre_tokenize_str
    rows = [line.split("\t") for line in text_rules(ranker.tokenizer) if not line.startswith("#")]
    tables = {"norm": [], "split": []}
    for table, first, last, kind, *rep in rows:
        assert (len(rep) == 1) == (table == "norm" and kind == "map") and all(rep), (table, first, kind, rep)
        tables[table].append((int(first, 16), int(last, 16), kind, rep[0] if rep else ""))

    def rule(table, cp):
        spans = tables[table]
        i = bisect.bisect_right(spans, (cp, 0x110000)) - 1
        return spans[i][2:] if i >= 0 and spans[i][0] <= cp <= spans[i][1] else None

    def want_norm(c):
        r = normalize(c)
        if r == c:
            return None
        return ("drop", "") if r == "" else ("isolate", "") if r == f" {c} " else \
            ("map", " ".join(f"{ord(x):X}" for x in r))

    def want_split(c):
        return {1: None, 2: ("space", ""), 3: ("punct", "")}[len(pre_tokenize(f"a{c}a"))]

    for spans in tables.values():  # sorted, disjoint
        assert all(a[1] < b[0] and a[0] <= a[1] for a, b in zip(spans, spans[1:]))
    # every code point of the first blocks (Latin, Greek, Cyrillic, ..., CJK punctuation), both ends of
    # every run and its middle, and some past the BMP
    probe = set(range(0x3100)) | {0x1D400, 0x1D56C, 0x1F600, 0x20000, 0x2A6DF, 0xE0001, 0xE0020}
    for a, b, *_ in tables["norm"] + tables["split"]:
        probe |= {a, b, (a + b) // 2}
    for cp in sorted(probe - set(range(0xD800, 0xE000))):
        c = chr(cp)
        assert rule("norm", cp) == want_norm(c), hex(cp)
        assert rule("split", cp) == want_split(c), hex(cp)
    assert rule("norm", 0x20000) == ("isolate", "")  # CJK extension B, isolated like the BMP ideographs


# kills E55 (no /proc/cpuinfo -> every flag), E57 (the first line read), E58 (flags this CPU lacks)
def test_cpu_isa_flags_reads_the_flags_line(monkeypatch):
    import pathlib

    cpuinfo = ["processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse4_1 avx avx2 fma sse4_2 nosuch\n"
               "bugs\t\t: avx512f\n"]
    real = pathlib.Path.read_text

    def read_text(self, *a, **k):
        if str(self) != "/proc/cpuinfo":
            return real(self, *a, **k)
        if cpuinfo[0] is None:
            raise PermissionError("no access")
        return cpuinfo[0]

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    assert cpu_isa_flags() == ["sse4_1", "sse4_2", "fma", "avx", "avx2"]  # ISA_FLAGS' order
    cpuinfo[0] = None
    assert cpu_isa_flags() == []


# kills E59 (Windows' "AMD64" not x86), E62 (an x86 target compiled off x86)
def test_targets_follow_the_machine(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "AMD64")
    assert export_module._resolve_target("auto") == "x86-64-v3"
    assert export_module._target_configs("x86-64-v3") == {"cpp.march": "x86-64-v3", "cpp.simdlen": 256}
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert export_module._resolve_target("auto") == "native"
    assert export_module._target_configs("native") == {}
    with pytest.raises(ValueError, match="x86-64-v3 is an x86 target; this machine is aarch64"):
        export_module._target_configs("x86-64-v3")


# kills E64 (an x86-64-v3 package recording this CPU's AVX-512 / AMX flags)
def test_package_metadata_of_an_x86_64_v3_package(ranker):
    meta = package_metadata(ranker.model, "x86-64-v3")
    assert meta["relsum_cpu_flags"] == " ".join(X86_64_V3_FLAGS)
    assert package_metadata(ranker.model, "native")["relsum_cpu_flags"] == " ".join(cpu_isa_flags())


# kills E67 ("new/.." kept unresolved: atomic_write_dir would rename onto "..")
def test_export_dir_check_resolves_a_parent_reference(tmp_path):
    got = check_export_dir(tmp_path / "missing" / "..")
    assert got == tmp_path.resolve() and got.name == tmp_path.name


# kills E13 (token_multiple 0 a ZeroDivisionError), E15 (padding added to an already full stream),
# E10 (a one-pair batch scored as a 0-d tensor)
def test_export_inputs_layout(ranker):
    enc = ranker.encode_pairs([("red shoe", "a red running shoe"), ("q", "d")])
    n = sum(len(ids) for ids, _ in enc)
    ids, types_, pos, pad_index, slot, cls = export_inputs(enc)
    assert ids.numel() == types_.numel() == pos.numel() == slot.numel() == n  # no padding unasked
    assert export_inputs(enc, token_multiple=n)[0].numel() == n  # already a multiple
    assert export_inputs(enc, token_multiple=n + 1)[0].numel() == n + 1
    assert cls.tolist() == [0, len(enc[0][0])] and cls.dtype == torch.long
    for bad in (0, -1):
        with pytest.raises(ValueError, match="token_multiple must be >= 1"):
            export_inputs(enc, token_multiple=bad)
    with torch.inference_mode():
        assert ExportEncoder(ranker.model).eval()(*export_inputs(enc[:1])).shape == (1,)


@pytest.fixture
def stub_compile(monkeypatch):
    """export_ranker up to the AOTInductor compile, which is replaced by a recorder (seconds, not a
    minute): what it would compile and with which settings."""
    seen = {}

    def compile_(program, package_path, inductor_configs):
        seen.update(program=program, configs=inductor_configs)
        with open(package_path, "wb") as f:
            f.write(b"stub package")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_)
    return seen


# kills E77 (the CrossEncoder's own model cast to bf16), E78 (bf16 asked, fp32 compiled),
# E80 (vocab.txt without its last newline), E82 (an x86-64-v3 package recording this CPU's flags),
# E86 (settings.txt's dtype not the package's)
def test_bf16_export_compiles_a_bf16_copy_with_its_target(ranker, tmp_path, stub_compile):
    out = export_ranker(ranker, tmp_path / "bf16", dtype=torch.bfloat16, target="native")
    assert ranker.model.classifier.weight.dtype == torch.float32  # the ranker is left as it was
    assert {p.dtype for p in stub_compile["program"].state_dict.values() if p.is_floating_point()} \
        == {torch.bfloat16}
    settings = (out / "settings.txt").read_text().splitlines()
    assert "dtype bfloat16" in settings and "target native" in settings
    meta = stub_compile["configs"]["aot_inductor.metadata"]
    assert meta["relsum_cpu_flags"] == " ".join(cpu_isa_flags())
    assert (out / "vocab.txt").read_text(encoding="utf-8") == "\n".join(_vocab_lines(ranker.tokenizer)) + "\n"
    if platform.machine().lower() in ("x86_64", "amd64"):
        export_ranker(ranker, tmp_path / "v3", target="x86-64-v3")
        meta = stub_compile["configs"]["aot_inductor.metadata"]
        assert meta["relsum_cpu_flags"] == " ".join(X86_64_V3_FLAGS)
        assert stub_compile["configs"]["cpp.march"] == "x86-64-v3"
