import json

import numpy as np
import pytest

from relsum_core.plots import plot_metrics, read_events

pytest.importorskip("matplotlib")


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_summarizer_run_png(tmp_path):
    rows = [{"event": "config", "steps": 3}]
    for s in range(1, 4):
        rows.append({"event": "train", "step": s, "reward": 0.1 * s, "kl": 0.01 * s, "summary_tokens": 20})
    rows.append({"event": "eval", "step": 3, "reward": 0.5, "reward_relevance": 0.2, "summary_tokens": 18})
    m = tmp_path / "metrics.jsonl"
    _write(m, rows, tail='{"event": "train", "st')  # killed mid-line: the cut-off row is skipped
    assert len(read_events(m)["train"]) == 3
    out = plot_metrics(m, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ranker_run_png(tmp_path):
    rows = [{"event": "train", "step": 10, "loss": 2.0},
            {"event": "eval", "step": 10, "title/ndcg@10": 0.5, "title+64/ndcg@10": 0.6}]
    m = tmp_path / "metrics.jsonl"
    _write(m, rows)
    assert plot_metrics(m, tmp_path / "r.png").stat().st_size > 1000


def test_bad_metrics(tmp_path):
    m = tmp_path / "metrics.jsonl"
    _write(m, [{"event": "config"}])
    with pytest.raises(ValueError, match="no 'train' or 'eval' rows"):
        plot_metrics(m, tmp_path / "x.png")
    m.write_text('not json\n{"event": "train", "step": 1, "loss": 1}\n')
    with pytest.raises(ValueError, match="not a JSON line"):
        read_events(m)
    m.write_text('{"event": "train", "step": 1, "loss": 1}\n[1, 2]\n{"event": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=f"{m}:2: not a JSON object"):
        read_events(m)


def test_output_format_follows_the_suffix(tmp_path):
    """--out x.pdf used to get PNG bytes; now each supported suffix gets its own format."""
    m = tmp_path / "metrics.jsonl"
    _write(m, [{"event": "train", "step": 1, "loss": 2.0}, {"event": "eval", "step": 1, "t/ndcg@10": 0.5}])
    assert plot_metrics(m, tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in plot_metrics(m, tmp_path / "c.SVG").read_bytes()[:1000]
    assert plot_metrics(m, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("c.jpg", "c"):
        with pytest.raises(ValueError, match=r"suffix must be one of \.png, \.pdf, \.svg"):
            plot_metrics(m, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_a_short_runs_single_points_are_drawn(tmp_path, monkeypatch):
    # train-ranker logs its loss every 10 steps: a 3-step run has one point, which a bare line hides
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig) or close(fig))
    m = tmp_path / "metrics.jsonl"
    _write(m, [{"event": "train", "step": 3, "loss": 2.0}])
    plot_metrics(m, tmp_path / "r.png")
    (loss,) = figures[0].axes[0].get_lines()
    assert len(loss.get_xdata()) == 1 and loss.get_marker() not in (None, "None", "", " ")


# ---------------------------------------------------------------- from mutation testing
def _write_metrics(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture()
def figures(monkeypatch):
    """The figures plot_metrics drew (kept from plt.close)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: drawn.append(fig) or close(fig))
    return drawn


def test_null_metrics_and_rows_without_a_step_are_left_out(tmp_path, figures):
    # kills P03 (a null value reached _smooth: TypeError) and P04 (a row without "step": KeyError).
    # JsonlLog writes a NaN metric (a diverged KL, an undefined NDCG) as null.
    m = tmp_path / "metrics.jsonl"
    _write_metrics(m, [{"event": "train", "step": 1, "reward": 0.1, "kl": 0.5},
                       {"event": "train", "step": 2, "reward": 0.2, "kl": None},
                       {"event": "eval", "step": 2, "reward": None},
                       {"event": "eval", "reward": 0.3}])
    plot_metrics(m, tmp_path / "s.png")
    kl = figures[0].axes[2].get_lines()[0]
    assert list(kl.get_xdata()) == [1] and list(kl.get_ydata()) == [0.5]
    _write_metrics(m, [{"event": "train", "step": 1, "loss": None},
                       {"event": "train", "step": 2, "loss": 1.0},
                       {"event": "eval", "step": 2, "t/ndcg@10": None}, {"event": "eval", "t/ndcg@10": 0.4}])
    plot_metrics(m, tmp_path / "r.png")
    assert list(figures[1].axes[0].get_lines()[0].get_xdata()) == [2]


def test_the_smoothed_reward_is_the_mean_of_the_last_10_steps(tmp_path, figures):
    # kills P05 (a window of 9)
    m = tmp_path / "metrics.jsonl"
    rewards = [float(s * s % 7) for s in range(1, 16)]
    _write_metrics(m, [{"event": "train", "step": s, "reward": r, "kl": 0.0}
                       for s, r in enumerate(rewards, start=1)])
    plot_metrics(m, tmp_path / "s.png")
    raw, smooth = figures[0].axes[0].get_lines()[:2]
    assert list(raw.get_ydata()) == rewards
    want = [sum(rewards[max(0, i - 9): i + 1]) / len(rewards[max(0, i - 9): i + 1]) for i in range(15)]
    np.testing.assert_allclose(smooth.get_ydata(), want)


def test_a_summarizer_run_with_only_an_eval_yet_plots_its_reward(tmp_path, figures):
    # kills P08: the first eval (step 0) comes before any train row; it is still a summarizer run
    m = tmp_path / "metrics.jsonl"
    _write_metrics(m, [{"event": "config"}, {"event": "eval", "step": 0, "reward": 0.4, "summary_tokens": 9}])
    plot_metrics(m, tmp_path / "s.png")
    assert [ax.get_title() for ax in figures[0].axes][:2] == ["reward", "validation reward components"]


def test_the_ndcg_panel_shows_ndcg_at_10_only(tmp_path, figures):
    # kills P09: the ranker logs NDCG@1 and @5 as well; the panel is NDCG@10
    m = tmp_path / "metrics.jsonl"
    _write_metrics(m, [{"event": "train", "step": 10, "loss": 2.0},
                       {"event": "eval", "step": 10, "t/ndcg@1": 0.2, "t/ndcg@5": 0.3, "t/ndcg@10": 0.5,
                        "t+d/ndcg@10": 0.6}])
    plot_metrics(m, tmp_path / "r.png")
    assert [line.get_label() for line in figures[0].axes[1].get_lines()] == ["t/ndcg@10", "t+d/ndcg@10"]


def test_an_adaptive_kl_weight_gets_its_own_axis(tmp_path, figures):
    # kills P12: beta that changes over the run is drawn (dashed, on a twin axis); a fixed one is not
    m = tmp_path / "metrics.jsonl"
    rows = [{"event": "train", "step": s, "reward": 0.1, "kl": 0.1, "beta": 0.04 * s} for s in (1, 2, 3)]
    _write_metrics(m, rows)
    plot_metrics(m, tmp_path / "a.png")
    _write_metrics(m, [{**r, "beta": 0.04} for r in rows])
    plot_metrics(m, tmp_path / "b.png")
    assert len(figures[0].axes) == 5 and len(figures[1].axes) == 4
    assert list(figures[0].axes[-1].get_lines()[0].get_ydata()) == [0.04, 0.08, 0.12]


def test_a_cut_last_line_is_skipped_even_with_blank_lines_after_it(tmp_path):
    # kills P02: an editor (or `echo >>`) left a newline after the line a crash cut off
    m = tmp_path / "metrics.jsonl"
    _write_metrics(m, [{"event": "train", "step": 1, "loss": 1.0}], tail='{"event": "train", "st\n\n')
    assert len(read_events(m)["train"]) == 1


def test_a_plot_title_is_drawn(tmp_path, figures):
    # kills P13 (--title dropped)
    m = tmp_path / "metrics.jsonl"
    _write_metrics(m, [{"event": "train", "step": 1, "loss": 2.0}])
    plot_metrics(m, tmp_path / "r.png", title="lr 3e-5, seed 1")
    assert figures[0]._suptitle is not None and figures[0]._suptitle.get_text() == "lr 3e-5, seed 1"
