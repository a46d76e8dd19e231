import json

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
