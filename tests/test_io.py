import json
import math
import os

import pytest

import relsum_core.io as rio
from relsum_core.io import (
    JsonlLog,
    _exchange,
    atomic_write_bytes,
    atomic_write_dir,
    atomic_write_text,
    json_report,
    read_json_object,
    trim_metrics,
)


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


def test_atomic_write_bytes_fsyncs_the_whole_data_in_a_temp_beside_the_target(tmp_path, monkeypatch):
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.fstat(fd).st_size)  # what is on the file (not in Python's buffer) when synced
        real_fsync(fd)

    def replace(src, dst):
        replaced.append((os.path.dirname(os.path.abspath(src)), os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "r.json", b"x" * 100)
    assert synced == [100]
    # a temp on another file system would make the rename a copy, not atomic
    assert replaced == [(str(tmp_path), str(tmp_path / "r.json"))]


def test_atomic_write_mode_follows_the_umask(tmp_path):
    for umask, mode in ((0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            atomic_write_text(tmp_path / f"r{umask}.md", "x")
        finally:
            os.umask(old)
        assert (tmp_path / f"r{umask}.md").stat().st_mode & 0o777 == mode


def test_atomic_write_bytes_interrupted_leaves_no_temp(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "r.json", "old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "r.json", "new")
    assert (tmp_path / "r.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_json_report_makes_tuples_strict_too():
    assert json.loads(json_report({"ci": (math.nan, 0.5)})) == {"ci": [None, 0.5]}


def test_read_json_object_names_the_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"a": 1}')
    assert read_json_object(path) == {"a": 1}
    for bad, why in ((b'{"a": ', "not valid JSON"), (b'{"a": "\xff"}', "not valid JSON"),
                     (b"[1, 2]", "not a JSON object"), (b'"x"', "not a JSON object")):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"settings.json: {why}"):
            read_json_object(path)


def test_atomic_write_dir_fsyncs_files_dirs_and_the_parent(tmp_path, monkeypatch):
    synced = set()
    real_fsync = os.fsync

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    def fill(d):
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"w")
        (d / "a.txt").write_text("a")

    dest = tmp_path / "ckpt"
    atomic_write_dir(dest, lambda d: (d / "a.txt").write_text("old"))
    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_dir(dest, fill)
    for p in (dest / "a.txt", dest / "sub" / "w.bin", dest / "sub", dest, tmp_path):
        assert p.stat().st_ino in synced, p


def test_atomic_write_dir_refuses_to_replace_the_working_directory(tmp_path, monkeypatch):
    dest = tmp_path / "ckpt"
    atomic_write_dir(dest, lambda d: (d / "sub").mkdir())
    for here in (dest, dest / "sub"):
        monkeypatch.chdir(here)
        with pytest.raises(ValueError, match="working directory"):
            atomic_write_dir(dest, lambda d: None)
    assert (dest / "sub").is_dir()


def test_atomic_write_dir_fills_a_temp_beside_dest_and_gives_it_a_plain_mode(tmp_path):
    dest = tmp_path / "ckpt"
    where = []
    atomic_write_dir(dest, lambda d: where.append(d.parent))
    assert where == [tmp_path]  # same file system: the rename is atomic
    assert dest.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_atomic_write_dir_swaps_in_one_step_where_it_can(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if not _exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    dest = tmp_path / "ckpt"
    atomic_write_dir(dest, lambda d: (d / "f").write_text("old"))

    def no_rename(*args):
        raise AssertionError("two renames: a crash between them leaves no dest")

    monkeypatch.setattr(os, "rename", no_rename)
    atomic_write_dir(dest, lambda d: (d / "f").write_text("new"))
    assert (dest / "f").read_text() == "new"


def test_atomic_write_dir_without_exchange_puts_the_old_back_when_the_second_rename_fails(tmp_path,
                                                                                         monkeypatch):
    dest = tmp_path / "ckpt"
    atomic_write_dir(dest, lambda d: (d / "f").write_text("old"))
    monkeypatch.setattr(rio, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new dir into place
            raise OSError("no space")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="no space"):
        atomic_write_dir(dest, lambda d: (d / "f").write_text("new"))
    assert (dest / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_jsonl_log_flushes_each_line_truncates_and_closes(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"event": "stale"}\n')
    with JsonlLog(path) as log:  # not append: a fresh log
        log.write("train", step=1)
        # flushed per line: a crash now still leaves the line on disk
        assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["train"]
    assert log.f.closed


def test_trim_metrics_rewrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    text = "".join(json.dumps({"event": "train", "step": s}) + "\n" for s in (1, 2, 3))
    path.write_text(text)

    def fsync_fails(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="disk full"):
        trim_metrics(path, 1)
    assert path.read_text() == text  # never half rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]
