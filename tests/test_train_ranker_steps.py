"""What a train-ranker step does, checked where a wrong one would still train and still report:
the learning-rate schedules, the parameter groups, which text meets which grade, gradients per step,
which checkpoint is kept, and the validation scores per query.  Each test guards a mutation the rest
of the suite let through (a session-16 mutation run)."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

import relsum_core.trainers.ranker as trainer
from relsum_core.data import Judgment, fold_queries, group_by_query, load_dataset
from relsum_core.text import product_text
from relsum_core.trainers.ranker import RankerTrainConfig, ValSet, _param_groups, default_base, make_groups

SMALL = dict(max_queries=6, val_fraction=0.34, batch_size=2, group_size=4, max_attr_tokens=8, max_length=48,
             epochs=1, pseudo_steps=0, progress=False, precision="fp32")


def _train(out, base, **settings) -> dict:
    return trainer.train_ranker(RankerTrainConfig(out=str(out), base=str(base), **{**SMALL, **settings}))


def _rows(out, event):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def test_graded_learning_rate_warms_up_then_decays_over_all_epochs(tmp_path, tiny_base):
    report = _train(tmp_path, tiny_base, epochs=2, log_every=1, lr=1e-3)
    total = report["steps"]
    warm = round(0.1 * total)
    # a row's lr is the rate its step used: HF's linear warm-up makes the first one 0
    want = [1e-3 * (s / warm if s < warm else (total - s) / (total - warm)) for s in range(total)]
    assert [r["lr"] for r in _rows(tmp_path, "train")] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_pseudo_query_learning_rate_decays_to_zero(tmp_path, tiny_base):
    _train(tmp_path, tiny_base, max_steps=1, pseudo_steps=4, log_every=1)
    want = [1e-4 * (4 - s) / 4 for s in range(4)]  # the rates steps 1..4 used
    assert [r["lr"] for r in _rows(tmp_path, "pseudo")] == pytest.approx(want, abs=1e-12)


def test_head_and_encoder_get_their_own_rates_and_decay():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=1))
    group_of = {id(p): g for g in _param_groups(model, 1e-5, 1e-3, 0.01) for p in g["params"]}
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        assert g["lr"] == (1e-3 if name.startswith(("classifier.", "bert.pooler.")) else 1e-5), name
        assert g["weight_decay"] == (0.01 if p.ndim >= 2 and "LayerNorm" not in name else 0.0), name


def test_each_training_text_meets_its_own_grade(tmp_path, tiny_base, monkeypatch):
    catalog, judgments = load_dataset()
    grade = {(j.query, j.product_id): j.grade for j in judgments}
    seen = []

    def recording_scores(ce, pairs, dtype):
        seen.append(pairs)
        return torch.zeros(len(pairs), requires_grad=True) * 1

    listwise = trainer.listwise_loss

    def recording_loss(scores, grades, group_ids, targets="grade"):
        seen[-1] = list(zip(seen[-1], grades.tolist()))
        return listwise(scores, grades, group_ids, targets)

    monkeypatch.setattr(trainer, "_train_scores", recording_scores)
    monkeypatch.setattr(trainer, "listwise_loss", recording_loss)
    _train(tmp_path, tiny_base, max_steps=3, max_attr_tokens=0)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    title_of = {p: product_text(catalog[p], tok, 0) for _, p in grade}
    checked = 0
    for batch in seen:
        for (query, text), g in batch:  # max_attr_tokens 0: the text is the title, which names the product
            grades = [gr for (q, p), gr in grade.items() if q == query and title_of[p] == text]
            assert g in grades, (query, text, g, grades)
            checked += 1
    assert checked > 0


def test_gradients_start_empty_at_every_step(tmp_path, tiny_base, monkeypatch):
    params, empty = [], []
    groups = trainer._param_groups

    def recording_groups(model, *args):
        params[:] = [p for p in model.parameters() if p.requires_grad]
        return groups(model, *args)

    backward = torch.Tensor.backward

    def recording_backward(self, *args, **kwargs):
        empty.append(all(p.grad is None for p in params))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(trainer, "_param_groups", recording_groups)
    monkeypatch.setattr(torch.Tensor, "backward", recording_backward)
    _train(tmp_path, tiny_base, max_steps=3)
    assert empty == [True, True, True]


def test_the_checkpoint_kept_is_the_best_on_title_plus_attributes(tmp_path, tiny_base, monkeypatch):
    script = iter([{"title/ndcg@10": 0.9, "title+64/ndcg@10": 0.1},
                   {"title/ndcg@10": 0.1, "title+64/ndcg@10": 0.9}])
    monkeypatch.setattr(ValSet, "evaluate_pairs", lambda self, predict: next(script))
    assert _train(tmp_path, tiny_base, epochs=2, max_steps=2, batch_size=64)["best"]["step"] == 2


def test_folds_follow_split_seed_not_seed(tmp_path, tiny_base):
    report = _train(tmp_path, tiny_base, max_steps=1, folds=3, fold=1, seed=5)
    first6 = list(group_by_query(load_dataset()[1]))[:6]
    assert report["split"]["val_query_ids"] == fold_queries(first6, 3, 1, 0)[1]


def test_validation_scores_are_sliced_per_query_and_texts_carry_attributes():
    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    val = ValSet(by_query, list(by_query)[:3], catalog, AutoTokenizer.from_pretrained(default_base()))
    rng = random.Random(0)
    fixed = {}

    def score(query, text):  # one value per (query, text), whichever path asks
        return fixed.setdefault((query, text), rng.random())

    batched = val.score_pairs(lambda pairs: np.array([score(q, t) for q, t in pairs]))
    per_query = val.score_per_query(lambda q, texts: np.array([score(q, t) for t in texts]))
    for name in batched:
        for q in val.query_ids:
            np.testing.assert_array_equal(batched[name][q], per_query[name][q])
    titles, with_attrs = val.texts["title"], val.texts["title+64"]
    assert any(a != b for q in val.query_ids for a, b in zip(titles[q], with_attrs[q]))
    assert all(b.startswith(a) for q in val.query_ids for a, b in zip(titles[q], with_attrs[q]))
    # recall at P 0.9 counts exact matches only: an S pair above the E one means no cut reaches it
    val.grades, val.query_ids = {"q": [2, 3, 0]}, ["q"]
    assert val._metrics("x", {"q": np.array([3.0, 2.0, 1.0])})["x/recall@p90"] == 0.0


def test_groups_are_dealt_by_grade_so_no_candidate_is_lost():
    by_query = {"a": [Judgment("a", "q", f"a{i}", g) for i, g in enumerate([3, 3, 0, 0, 0, 0, 0, 0])]}
    for seed in range(20):
        groups = make_groups(by_query, ["a"], 4, random.Random(seed))
        assert sorted(j.product_id for g in groups for j in g) == [f"a{i}" for i in range(8)]


def test_a_base_of_the_wrong_kind_is_refused_before_any_output(tmp_path, tiny_base):
    """Checked before the log opens: a crash after it would make the corrected rerun refuse the
    folder as an earlier run's."""
    import shutil

    three = tmp_path / "three_labels"
    shutil.copytree(tiny_base, three)
    cfg = json.loads((three / "config.json").read_text())
    (three / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForSequenceClassification"],
                                                   "id2label": {"0": "a", "1": "b", "2": "c"}}))
    distil = tmp_path / "distil"
    shutil.copytree(tiny_base, distil)
    (distil / "config.json").write_text(json.dumps({**cfg, "model_type": "distilbert"}))
    for base, settings, message in ((three, {}, "a sequence classifier with 3 labels"),
                                    (distil, {}, "model_type 'distilbert' is not BERT-family"),
                                    (tiny_base, {"freeze_layers": 3}, "freeze_layers=3 but .* only 2 layers"),
                                    (tiny_base, {"max_length": 129}, r"max_length must be in \[3, 128\]")):
        out = tmp_path / f"run-{base.name}-{len(settings)}"
        with pytest.raises(ValueError, match=message):
            _train(out, base, **settings)
        assert not out.exists() or not any(out.iterdir()), message


def test_overwrite_removes_the_earlier_report_before_it_trains(tmp_path, tiny_base, monkeypatch):
    _train(tmp_path, tiny_base, max_steps=1)
    assert (tmp_path / "report.json").is_file()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, tiny_base, max_steps=1, seed=7, overwrite=True)
    # no report of the earlier run beside this run's log: cross-validation takes a report as a finished fold
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "report.md").exists()
    assert not (tmp_path / "best").exists()


def test_overwrite_can_continue_from_its_own_best_and_keeps_it_when_the_base_fails(tmp_path, tiny_base):
    out = tmp_path / "run"
    _train(out, tiny_base, max_steps=1)
    # the earlier best/ is loaded before --overwrite deletes it
    report = _train(out, out / "best", max_steps=1, overwrite=True)
    assert (out / "best").is_dir() and report["steps"] == 1
    # a base that cannot load leaves the earlier run as it was
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_base / "config.json").read_text())
    for f in tiny_base.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="broken: cannot load the encoder"):
        _train(out, broken, max_steps=1, overwrite=True)
    assert (out / "best").is_dir() and (out / "report.json").is_file()


def test_a_diverging_run_stops_with_a_clear_error_before_nan_weights(tmp_path, tiny_base, monkeypatch):
    real = trainer.listwise_loss
    calls = []

    def nan_at_second_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(trainer, "listwise_loss", nan_at_second_step)
    with pytest.raises(trainer.TrainingDiverged, match=r"diverged at step 2 \(loss nan\): lower --lr"):
        _train(tmp_path, tiny_base, max_steps=3, eval_every=1)
    assert _rows(tmp_path, "diverged")[0]["at"] == "step 2"
    assert (tmp_path / "best").is_dir()  # step 1's checkpoint stays


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_divergence_is_caught_in_the_warm_up_and_names_the_checkpoint_kept(tmp_path, tiny_base, monkeypatch,
                                                                             bad):
    real = trainer.pseudo_query_loss

    def diverging(*args, **kwargs):
        loss = real(*args, **kwargs)
        return lambda: loss() * bad
    monkeypatch.setattr(trainer, "pseudo_query_loss", diverging)
    with pytest.raises(trainer.TrainingDiverged, match=r"diverged at warm-up step 1 \(loss (inf|nan)\)"):
        _train(tmp_path / "warm", tiny_base, max_steps=2, pseudo_steps=2)
    monkeypatch.setattr(trainer, "pseudo_query_loss", real)
    real_listwise, calls = trainer.listwise_loss, []

    def late(*args, **kwargs):
        calls.append(1)
        return real_listwise(*args, **kwargs) * (bad if len(calls) == 2 else 1.0)
    monkeypatch.setattr(trainer, "listwise_loss", late)
    with pytest.raises(trainer.TrainingDiverged, match=r"best checkpoint so far stays in .*best"):
        _train(tmp_path / "late", tiny_base, max_steps=3, eval_every=1)


def test_freezing_every_layer_is_allowed_and_max_length_below_3_is_not(tmp_path, tiny_base):
    _train(tmp_path / "frozen", tiny_base, max_steps=1, freeze_layers=2)
    with pytest.raises(ValueError, match=r"max_length must be in \[3, 128\]"):
        _train(tmp_path / "short", tiny_base, max_length=2)
    assert not (tmp_path / "short" / "metrics.jsonl").exists()
