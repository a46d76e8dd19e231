"""`relsum rerank`: the C++ relsum_rerank's line format from Python (parity with the C++ tool itself is
checked in test_bindings.py)."""

import io
import random
import sys

import numpy as np
import pytest

from relsum_core.cli import main
from relsum_core.ranker import CrossEncoder
from relsum_core.rerank_lines import escape, parse, parse_pairs, parse_ranking, read_lines, unescape


def test_escape_round_trips_any_text():
    rng = random.Random(0)
    alphabet = ["\\", "\t", "\n", "\r", "t", "n", "a", " ", "é", "\u3000", "🙂"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        line = escape(text)
        assert "\t" not in line and "\n" not in line
        assert unescape(line) == text


def test_unescape_reads_other_backslashes_as_the_c_plus_plus_tool_does():
    assert unescape(r"a\tb\nc\\d") == "a\tb\nc\\d"
    assert unescape(r"\x\"") == 'x"'  # any other escaped character stands for itself
    assert unescape("end\\") == "end\\"  # a lone trailing backslash stays


def test_read_lines_keeps_carriage_returns_and_names_bad_utf8():
    assert read_lines(io.BytesIO(b"a\tb\r\nlast")) == ["a\tb\r", "last"]
    assert read_lines(io.BytesIO(b"")) == []
    with pytest.raises(ValueError, match=r"line 2: not valid UTF-8 at byte offset 3"):
        read_lines(io.BytesIO(b"ok\ncaf\xc3\tdoc\n"))


def test_malformed_requests_name_the_line():
    assert parse_pairs(["q\td", "\t"]) == [("q", "d"), ("", "")]
    with pytest.raises(ValueError, match="line 2: expected QUERY<TAB>DOC, found 0 tabs"):
        parse_pairs(["q\td", "no tab"])
    with pytest.raises(ValueError, match="line 1: expected QUERY<TAB>DOC, found 2 tabs"):
        parse_pairs(["a\tb\tc"])
    with pytest.raises(ValueError, match="the first line must be the query"):
        parse_ranking([])
    with pytest.raises(ValueError, match="no candidates"):
        parse_ranking(["just a query"])
    assert parse(["q", "d1", r"d\t2"], rank=True) == ("q", ["d1", "d\t2"])


def _cli(monkeypatch, capsys, args: list[str], stdin: bytes) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try:
        rc = main(["rerank", *args])
    except SystemExit as e:  # the error path exits as argparse does
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_rerank_cli_scores_and_ranks_like_the_cross_encoder(tiny_ranker_dir, monkeypatch, capsys):
    ce = CrossEncoder.from_pretrained(tiny_ranker_dir, device="cpu")
    pairs = [("red shoes", "Nike running shoe, red"), ("red shoes", "garden hose\twith\nbreaks \\ here"),
             ("", ""), ("red shoes", "Nike running shoe, red")]
    stdin = "".join(f"{escape(q)}\t{escape(d)}\n" for q, d in pairs).encode()
    rc, out, _ = _cli(monkeypatch, capsys, ["--model", str(tiny_ranker_dir), "--device", "cpu"], stdin)
    assert rc == 0
    np.testing.assert_allclose([float(x) for x in out.split()], ce.predict(pairs), rtol=1e-7, atol=0)

    docs = ["Nike running shoe, red", "garden hose", "red\tshoes", "socks"]
    stdin = "".join(escape(t) + "\n" for t in ("red shoes", *docs)).encode()
    rc, out, _ = _cli(monkeypatch, capsys, ["--model", str(tiny_ranker_dir), "--device", "cpu", "--rank",
                                            "--top-k", "3"], stdin)
    assert rc == 0
    got = [line.split("\t") for line in out.splitlines()]
    want = ce.rank("red shoes", docs, top_k=3)
    assert [int(i) for i, _ in got] == [h["corpus_id"] for h in want]
    np.testing.assert_allclose([float(s) for _, s in got], [h["score"] for h in want], rtol=1e-7)


def test_rerank_cli_refuses_bad_input_before_loading_a_model(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "no-such-model")  # never reached: every input error comes first
    rc, _, err = _cli(monkeypatch, capsys, ["--model", missing], b"q\td\nq without a doc\n")
    assert rc == 2 and "line 2: expected QUERY<TAB>DOC" in err
    rc, _, err = _cli(monkeypatch, capsys, ["--model", missing], b"caf\xc3\n")
    assert rc == 2 and "line 1: not valid UTF-8" in err
    rc, _, err = _cli(monkeypatch, capsys, ["--model", missing], b"")
    assert rc == 2 and "the input is empty: nothing to score" in err
    rc, _, err = _cli(monkeypatch, capsys, ["--model", missing, "--rank"], b"only the query\n")
    assert rc == 2 and "no candidates" in err
    rc, _, err = _cli(monkeypatch, capsys, ["--model", missing, "--top-k", "2"], b"q\td\n")
    assert rc == 2 and "--top-k needs --rank" in err
    rc, _, err = _cli(monkeypatch, capsys, ["--model", missing], b"q\td\n")
    assert rc == 2 and "no-such-model" in err  # well-formed input: now the model is the problem


def test_rerank_cli_refuses_bad_counts_and_a_closed_stdin_before_loading(tmp_path, monkeypatch, capsys):
    missing = ["--model", str(tmp_path / "no-such-model")]
    for flag in ("--top-k", "--batch-size", "--max-tokens", "--max-length"):
        rc, _, err = _cli(monkeypatch, capsys, [*missing, "--rank", flag, "0"], b"q\nd\n")
        assert rc == 2 and f"argument {flag}: must be >= 1, got 0" in err
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed (`<&-`)
    with pytest.raises(SystemExit) as e:
        main(["rerank", *missing])
    assert e.value.code == 2 and "stdin is closed" in capsys.readouterr().err


def test_rerank_cli_max_length_cuts_pairs_as_an_export_made_with_it(tiny_ranker_dir, monkeypatch, capsys):
    pairs = [("red running shoes", " ".join(["waterproof jacket kitchen towel"] * 20))]
    stdin = "".join(f"{q}\t{d}\n" for q, d in pairs).encode()
    model = ["--model", str(tiny_ranker_dir), "--device", "cpu"]
    rc, out, _ = _cli(monkeypatch, capsys, [*model, "--max-length", "16"], stdin)
    assert rc == 0
    cut = CrossEncoder.from_pretrained(tiny_ranker_dir, device="cpu", max_length=16).predict(pairs)
    whole = CrossEncoder.from_pretrained(tiny_ranker_dir, device="cpu").predict(pairs)
    assert float(out) == pytest.approx(float(cut[0]), rel=1e-7) and abs(cut[0] - whole[0]) > 1e-4


def test_rerank_cli_stops_quietly_when_the_reader_goes_away(tiny_ranker_dir, monkeypatch, capsys):
    import relsum_core.rerank_lines as rerank_lines

    def closed_pipe(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(rerank_lines, "run", closed_pipe)
    rc, _, err = _cli(monkeypatch, capsys, ["--model", str(tiny_ranker_dir), "--device", "cpu"], b"q\td\n")
    assert rc == 141 and "error" not in err  # as a shell tool SIGPIPE ended (`relsum rerank ... | head`)
