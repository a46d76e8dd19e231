from dataclasses import asdict, dataclass, field, replace

from relsum_core.records import changed_settings, dataclass_defaults, describe
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
