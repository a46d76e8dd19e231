import json

import pytest

from relsum_core.cli import build_parser, main


def test_every_subcommand_has_help():
    parser = build_parser()
    for cmd in ("bench-logprob", "train-ranker", "train", "summarize", "evaluate", "plot", "export-ranker",
                "rerank"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_train_requires_a_ranker():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x"])


def test_precision_defaults():
    parser = build_parser()
    # the summarizer's RL trains in fp32 unless asked (bf16 changed what GRPO learned); others: auto
    train = ["train", "--ranker", "r", "--out", "x"]
    assert parser.parse_args(train).precision == "fp32"
    assert parser.parse_args(train + ["--precision", "bf16"]).precision == "bf16"
    assert parser.parse_args(["train-ranker", "--out", "x"]).precision == "auto"
    assert parser.parse_args(["summarize", "--out", "x"]).precision == "auto"


def test_summarize_takes_data_as_the_other_commands_do():
    parser = build_parser()
    assert parser.parse_args(["summarize", "--out", "x", "--data", "d"]).catalog == "d"
    assert parser.parse_args(["summarize", "--out", "x", "--catalog", "c"]).catalog == "c"


def test_summarize_cli_end_to_end(tmp_path, tiny_policy_dir, capsys):
    catalog = tmp_path / "products.jsonl"
    row = {"product_id": "p1", "title": "red shirt", "bullet_points": "cotton"}
    catalog.write_text(json.dumps(row) + "\n")
    out = tmp_path / "s.jsonl"
    assert main(["summarize", "--policy", str(tiny_policy_dir), "--catalog", str(catalog), "--out", str(out),
                 "--budget", "3", "--no-progress"]) == 0
    assert json.loads(out.read_text())["product_id"] == "p1"
    assert "summaries in" in capsys.readouterr().out


def test_train_cli_bad_budget_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--ranker", "r", "--out", str(tmp_path), "--budget", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("relsum train: error: ValueError: ") and "budget must be > 0" in err
    assert "Traceback" not in err


def test_cli_input_error_is_one_line_unless_traceback_asked(tmp_path, capsys, monkeypatch):
    args = ["evaluate", "--ranker", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "relsum evaluate: error: FileNotFoundError: " in err and "missing is not a directory" in err
    monkeypatch.setenv("RELSUM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        main(args)


def test_cli_interrupt_exits_130(monkeypatch, capsys):
    import relsum_core.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_plot", interrupted)  # the parser binds it when main() builds it
    assert cli.main(["plot", "m.jsonl"]) == 130
    assert "relsum plot: interrupted" in capsys.readouterr().err


def test_train_help_shows_the_summarizer_defaults(capsys):
    from relsum_core.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "summary tokens asked for and sampled at most (default 32)" in out
    assert "grpo: adapt beta so the per-token KL tracks this (default none)" in out


def test_train_summary_line_skips_an_undefined_validation_reward(tmp_path, monkeypatch, capsys):
    import relsum_core.trainers.summarizer as trainer

    out = tmp_path / "run"
    out.mkdir()  # an eval row whose reward was NaN is logged as null
    (out / "metrics.jsonl").write_text('{"event": "eval", "step": 0, "reward": 0.25}\n'
                                       '{"event": "eval", "step": 1, "reward": null}\n')
    monkeypatch.setattr(trainer, "train_summarizer", lambda cfg: {"step": 1, "reward": 0.5})
    assert main(["train", "--ranker", "unused", "--out", str(out), "--no-progress"]) == 0
    assert "validation reward 0.2500 (greedy, step 0)" in capsys.readouterr().out
