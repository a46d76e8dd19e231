from dataclasses import asdict, dataclass, field, replace

from relsum_core import records
from relsum_core.records import changed_settings, dataclass_defaults, describe, weight_files, weights_differ
from relsum_core.trainers.summarizer import SummarizerConfig, _changed_settings


@dataclass
class Config:
    out: str = "run"
    budget: int = 32
    tags: list = field(default_factory=lambda: ["a"])
    new_setting: float = 0.5  # added after some runs were written


def test_a_setting_the_saved_run_lacks_compares_against_its_default():
    defaults = dataclass_defaults(Config)
    assert defaults == {"out": "run", "budget": 32, "tags": ["a"], "new_setting": 0.5}
    old_run = {"out": "run", "budget": 32, "tags": ["a"]}  # written before new_setting existed
    assert changed_settings(old_run, asdict(Config()), defaults=defaults) == {}
    assert changed_settings(old_run, asdict(Config(new_setting=0.9)), defaults=defaults) == {
        "new_setting": (0.5, 0.9)}
    # without a default the missing setting counts as None
    assert changed_settings({}, {"seed": None, "task": "summary"}) == {"task": (None, "summary")}


def test_ignored_settings_and_the_description():
    now = asdict(Config(out="elsewhere", budget=16))
    assert changed_settings(asdict(Config()), now, ignore={"out"}) == {"budget": (32, 16)}
    changed = changed_settings({"task": "summary", "budget": 32}, {"task": "doc2query", "budget": 16})
    assert describe(changed) == "budget 32 -> 16, task 'summary' -> 'doc2query'"


def test_summarizer_resume_compares_a_setting_added_later_against_its_default():
    cfg = SummarizerConfig(out="run", ranker="r")
    saved = asdict(cfg)
    del saved["top_p"]  # a checkpoint written before top_p existed sampled with its default
    assert _changed_settings(saved, cfg) == {}
    assert _changed_settings(saved, replace(cfg, top_p=0.5)) == {"top_p": (1.0, 0.5)}
    assert _changed_settings(saved, replace(cfg, steps=cfg.steps + 5)) == {}  # resumable


def test_resume_of_a_run_from_before_a_setting_existed_compares_what_it_did():
    cfg = SummarizerConfig(out="run", ranker="r", seed=3, split_seed=3)
    old = {k: v for k, v in asdict(cfg).items() if k not in ("advantage", "split_seed")}
    # such a run used total advantages and split by --seed
    assert _changed_settings(old, replace(cfg, advantage="total")) == {}
    assert _changed_settings(old, cfg) == {"advantage": ("total", "decoupled")}
    assert _changed_settings(old, replace(cfg, advantage="total", split_seed=0)) == {"split_seed": (3, 0)}


def test_weight_files_compare_by_content_and_older_records_by_time(tmp_path):
    import os

    (tmp_path / "model.safetensors").write_bytes(b"weights one")
    (tmp_path / "config.json").write_text("{}")  # not a weight file
    now = weight_files(tmp_path)
    assert [e[:2] for e in now] == [["model.safetensors", 11]] and len(now[0][3]) == 64
    assert weight_files(None) is None and not weights_differ(None, None) and weights_differ(None, now)
    legacy = [e[:3] for e in now]  # [name, bytes, mtime_ns], what records held before the content
    w = tmp_path / "model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))  # a copy: new time, same bytes
    later = weight_files(tmp_path)
    assert not weights_differ(now, later) and weights_differ(legacy, later)
    assert not weights_differ(legacy, now)
    w.write_bytes(b"weights two")  # same size, other bytes
    os.utime(w, ns=(w.stat().st_atime_ns, now[0][2]))  # even at the old time
    assert weights_differ(now, weight_files(tmp_path))
    (tmp_path / "extra.bin").write_bytes(b"")  # a file more
    assert weights_differ(later, weight_files(tmp_path)) and weights_differ("garbage", now)


def test_bin_weights_are_weight_files(tmp_path):
    # a folder with only pytorch_model.bin is not weightless
    w = tmp_path / "pytorch_model.bin"
    w.write_bytes(b"weights one")
    before = weight_files(tmp_path)
    assert [e[:2] for e in before] == [["pytorch_model.bin", 11]]
    w.write_bytes(b"weights two")
    assert weights_differ(before, weight_files(tmp_path))


def test_weight_files_are_listed_by_name(tmp_path):
    # not in the order of the glob patterns or of the directory on disk
    for name in ("b.safetensors", "a.bin", "c.safetensors"):
        (tmp_path / name).write_bytes(b"w")
    assert [e[0] for e in weight_files(tmp_path)] == ["a.bin", "b.safetensors", "c.safetensors"]


def test_weight_hashes_are_computed_once_per_file_version(tmp_path, monkeypatch):
    # each CV fold re-checks the same weights: their hashes are cached until the file changes
    calls = []
    real = records.file_sha256
    monkeypatch.setattr(records, "file_sha256", lambda p: calls.append(p) or real(p))
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"weights one")
    first = records.weight_files(tmp_path)
    assert records.weight_files(tmp_path) == first and len(calls) == 1
    w.write_bytes(b"weights two")
    assert records.weight_files(tmp_path) != first and len(calls) == 2


def test_a_renamed_weight_file_differs():
    # names are compared with sizes and hashes; the time alone is not
    h = "0" * 64
    assert weights_differ([["model.safetensors", 3, 1, h]], [["other.safetensors", 3, 1, h]])
    assert not weights_differ([["model.safetensors", 3, 1, h]], [["model.safetensors", 3, 2, h]])
