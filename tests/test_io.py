import json
import math

import pytest

from relsum_core.io import JsonlLog, _exchange, atomic_write_dir, atomic_write_text, json_report, trim_metrics


def test_atomic_write_dir_replaces_and_keeps_old_on_failure(tmp_path):
    dest = tmp_path / "ckpt"
    atomic_write_dir(dest, lambda d: (d / "a.txt").write_text("one"))
    atomic_write_dir(dest, lambda d: (d / "a.txt").write_text("two"))
    assert (dest / "a.txt").read_text() == "two"

    def broken(d):
        (d / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(dest, broken)
    assert (dest / "a.txt").read_text() == "two"  # the previous checkpoint survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind


def test_atomic_write_text_and_jsonl(tmp_path):
    atomic_write_text(tmp_path / "sub" / "r.json", '{"x": 1}\n')
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": 1}
    with JsonlLog(tmp_path / "m.jsonl") as log:
        log.write("train", step=1, loss=0.5)
    with JsonlLog(tmp_path / "m.jsonl", append=True) as log:
        log.write("eval", step=1)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["train", "eval"] and rows[0]["loss"] == 0.5
    # strict JSON: a NaN metric is null (bare NaN breaks jq and JavaScript), and relsum plot skips it
    with JsonlLog(tmp_path / "m.jsonl", append=True) as log:
        log.write("eval", step=2, ndcg=float("nan"), per_query={"q1": float("inf"), "q2": 0.5})
    last = (tmp_path / "m.jsonl").read_text().splitlines()[-1]
    assert "NaN" not in last and "Infinity" not in last
    assert json.loads(last)["ndcg"] is None and json.loads(last)["per_query"] == {"q1": None, "q2": 0.5}


def test_atomic_write_gives_a_plain_open_file_mode(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.md", "x")
        assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(umask)


def test_directories_swap_in_one_step_where_the_platform_can(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("new")
    (b / "f").write_text("old")
    if not _exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: atomic_write_dir renames twice")
    assert (b / "f").read_text() == "new" and (a / "f").read_text() == "old"
    with pytest.raises(FileNotFoundError):
        _exchange(tmp_path / "missing", b)


def test_trim_metrics_drops_rows_after_the_checkpoint_and_a_cut_off_line(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"event": "config", "lr": 1}, {"event": "eval", "step": 0}, {"event": "train", "step": 1},
            {"event": "train", "step": 2}, {"event": "eval", "step": 2}, {"event": "train", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "tr')
    trim_metrics(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:5]
    trim_metrics(tmp_path / "none.jsonl", 1)  # nothing logged yet: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


def test_atomic_write_bytes_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    import os

    path = tmp_path / "report.json"
    atomic_write_text(path, "old")

    def fsync_fails(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new, half written")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_json_report_writes_strict_json():
    report = {"ndcg": math.nan, "se": [1.5, math.inf, -math.inf], "n": 3, "name": "x", "none": None,
              "nested": {"q1": math.nan, "q2": 0.25}}
    text = json_report(report)
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    back = json.loads(text, parse_constant=pytest.fail)  # bare NaN / Infinity would call parse_constant
    assert back == {"ndcg": None, "se": [1.5, None, None], "n": 3, "name": "x", "none": None,
                    "nested": {"q1": None, "q2": 0.25}}
