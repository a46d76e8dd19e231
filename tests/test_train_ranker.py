import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from relsum_core.cli import main
from relsum_core.data import Judgment, group_by_query, load_dataset, split_queries
from relsum_core.precision import resolve_precision
from relsum_core.ranker import CrossEncoder
from relsum_core.text import PrefixSampler, words
from relsum_core.trainers.ranker import (
    _JOINERS,
    RankerTrainConfig,
    _train_scores,
    add_attribute_words,
    candidate_groups,
    cosine_distill_loss,
    distillation_loss,
    freeze_lower,
    graded_rates,
    listwise_loss,
    make_groups,
    make_pseudo_groups,
    pointwise_loss,
    pseudo_pairs,
    pseudo_query,
    query_split,
    save_checkpoint,
    train_ranker,
)


def test_listwise_loss_by_hand():
    # equal scores, grades (1, 0): loss = -(s(1) log 1/2 + s(0) log 1/2) = log 2
    scores = torch.zeros(2, requires_grad=True)
    loss = listwise_loss(scores, torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    assert scores.grad[0] < 0 < scores.grad[1]  # descent raises the better candidate
    # two groups average; a group is a softmax of its own
    s = torch.tensor([2.0, 0.0, 5.0, 5.0, 5.0])
    g = torch.tensor([3, 0, 2, 2, 0])
    ids = torch.tensor([0, 0, 1, 1, 1])
    t0 = torch.softmax(torch.tensor([3.0, 0.0]), 0)
    l0 = -(t0 * torch.log_softmax(torch.tensor([2.0, 0.0]), 0)).sum()
    l1 = math.log(3)  # equal scores: cross-entropy of any target with uniform is log n
    assert listwise_loss(s, g, ids).item() == pytest.approx((l0.item() + l1) / 2, rel=1e-6)


def test_groups_cover_each_candidate_once_with_mixed_grades():
    by_query = {
        "a": [Judgment("a", "q", f"a{i}", g) for i, g in enumerate([3] * 12 + [0] * 3 + [2] * 4)],
        "b": [Judgment("b", "q", f"b{i}", 3) for i in range(5)],  # one grade: no signal
    }
    groups = make_groups(by_query, ["a", "b"], 8, random.Random(0))
    seen = [j.product_id for g in groups for j in g]
    assert sorted(seen) == sorted(j.product_id for j in by_query["a"])
    assert len(groups) == 3 and all(len({j.grade for j in g}) > 1 for g in groups)
    assert max(len(g) for g in groups) - min(len(g) for g in groups) <= 1


def test_train_scores_keep_input_order_and_follow_the_serving_rule(tiny_base):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1).eval()
    ce = CrossEncoder.from_model(model, AutoTokenizer.from_pretrained(tiny_base), max_length=64)
    pairs = [("q", "a long product text " * k) for k in (5, 1, 9, 0, 3)] + [("other query", "short")]
    # Past the 64-token cap: a long query (the rule keeps its first 61 tokens and no doc, where HF's
    # longest_first would share the budget) and a long doc.
    pairs += [("red running shoe " * 30, "nike air " * 20), ("q", "a long product text " * 40)]
    chunked = _train_scores(ce, pairs, torch.float32, chunk=2)
    assert chunked.requires_grad
    whole = _train_scores(ce, pairs, torch.float32, chunk=len(pairs))
    np.testing.assert_allclose(chunked.detach().numpy(), whole.detach().numpy(), rtol=1e-5, atol=1e-5)
    # training's HF forward and evaluation's packed CrossEncoder must agree, or selection is off
    # (scores of this random model differ by ~1e-5 between pairs, so the tolerance is tight)
    reference = ce.predict(pairs)
    np.testing.assert_allclose(chunked.detach().numpy(), reference, rtol=0, atol=1e-6)
    assert len(set(np.round(reference, 7))) == len(pairs)  # distinct, so a permutation would show


def test_bf16_train_scores_follow_fp32_and_train_fp32_weights(tiny_base):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1).eval()
    ce = CrossEncoder.from_model(model, AutoTokenizer.from_pretrained(tiny_base), max_length=64)
    pairs = [("q", "a long product text " * k) for k in (5, 1, 9, 0, 3)] + [("other query", "short")]
    fp32 = _train_scores(ce, pairs, torch.float32)
    bf16 = _train_scores(ce, pairs, torch.bfloat16)
    assert bf16.dtype == torch.float32  # the loss is taken in fp32
    assert (bf16 - fp32).abs().max().item() < 0.02 * fp32.abs().max().item()  # a few bf16 ulps
    assert not torch.equal(bf16, fp32)  # autocast did run in bf16
    bf16.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_save_checkpoint_replaces_atomically(tmp_path, tiny_base):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    dest = tmp_path / "best"
    save_checkpoint(model, tok, dest, {"step": 1})
    with torch.no_grad():
        model.classifier.bias.fill_(7.0)
    save_checkpoint(model, tok, dest, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temp or old dirs left
    assert json.loads((dest / "relsum_ranker.json").read_text())["step"] == 2
    back = AutoModelForSequenceClassification.from_pretrained(dest)
    assert back.classifier.bias.item() == 7.0


def test_train_ranker_end_to_end(tmp_path, tiny_base, capsys):
    out = tmp_path / "run"
    rc = main([
        "train-ranker", "--base", str(tiny_base), "--out", str(out), "--max-queries", "8",
        "--val-fraction", "0.25", "--epochs", "2", "--batch-size", "2", "--group-size", "4",
        "--max-attr-tokens", "16", "--max-length", "64", "--lr", "1e-3", "--no-progress", "--seed", "3",
        "--pseudo-steps", "0",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| fine-tuned cross-encoder |" in printed and "checkpoint:" in printed
    # a second run into the same --out is refused before it touches anything, unless --overwrite
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["train-ranker", "--base", str(tiny_base), "--out", str(out), "--no-progress"])
    assert e.value.code == 2 and "holds an earlier run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == metrics

    report = json.loads((out / "report.json").read_text())
    assert report["split"]["train_queries"] == 6 and report["split"]["val_queries"] == 2
    first8 = list(group_by_query(load_dataset()[1]))[:8]
    assert report["split"]["val_query_ids"] == split_queries(first8, 0.25, seed=0)[1]  # --split-seed
    assert report["config"]["cosine_base"] == str(tiny_base)
    assert report["config"]["precision"] == "auto"
    assert report["config"]["train_dtype"] == str(resolve_precision("auto", "cpu")).removeprefix("torch.")
    assert report["steps"] == 2 * report["steps_per_epoch"] > 0
    assert set(report["table"]) == {"fine-tuned cross-encoder", "BM25 (bm25s)", "untuned encoder cosine"}
    for row in report["table"].values():
        for variant in ("title", "title+64"):
            for k in (5, 10):
                assert 0.0 <= row[f"{variant}/ndcg@{k}"] <= 1.0
            assert row[f"{variant}/n_queries"] == 2
            r = row[f"{variant}/recall@p90"]
            assert math.isnan(r) or 0.0 <= r <= 1.0
    assert "| BM25 (bm25s) |" in (out / "report.md").read_text()
    assert "R@P90" in (out / "report.md").read_text()
    # Paired per-query differences agree with the table's means (both cover the same 2 queries).
    ours = report["table"]["fine-tuned cross-encoder"]
    assert set(report["paired_ndcg@10"]) == {"BM25 (bm25s)", "untuned encoder cosine"}
    for name, by_variant in report["paired_ndcg@10"].items():
        for variant in ("title", "title+64"):
            d = by_variant[variant]
            assert d["n"] == 2 and d["wins"] + d["ties"] + d["losses"] == 2
            want = ours[f"{variant}/ndcg@10"] - report["table"][name][f"{variant}/ndcg@10"]
            assert d["mean"] == pytest.approx(want, abs=1e-12)
        assert f"fine-tuned minus {name}" in (out / "report.md").read_text()

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = [x["event"] for x in lines]
    assert events[0] == "split" and events.count("baseline") == 2 and events[-1] == "final"
    assert lines[-1]["paired_ndcg10"] == report["paired_ndcg@10"]
    train = [x for x in lines if x["event"] == "train"]
    assert train and all({"step", "loss", "lr", "epoch"} <= set(x) for x in train)
    assert all(math.isfinite(x["loss"]) and x["lr"] >= 0 for x in train)
    # weight 0 (the default): the pointwise loss is logged but not trained on
    assert all(x["loss"] == pytest.approx(x["listwise_loss"]) and x["pointwise_loss"] > 0 for x in train)
    assert [x["step"] for x in train] == sorted(x["step"] for x in train)
    evals = [x for x in lines if x["event"] == "eval"]
    assert len(evals) == 2 and all("title+64/ndcg@10" in x for x in evals)
    best = max(evals, key=lambda x: x["title+64/ndcg@10"])
    assert report["best"]["step"] == best["step"]
    final = lines[-1]
    # the reloaded best checkpoint reproduces the numbers it was selected on
    assert final["title+64/ndcg@10"] == pytest.approx(best["title+64/ndcg@10"], abs=1e-6)

    # a plain HF checkpoint: transformers alone loads and scores it
    model = AutoModelForSequenceClassification.from_pretrained(out / "best").eval()
    tok = AutoTokenizer.from_pretrained(out / "best")
    assert model.config.num_labels == 1
    catalog, _ = load_dataset()
    pairs = [("red shoes", "Red leather shoe | size 9"), ("towel", next(iter(catalog.values())).title)]
    with torch.no_grad():
        enc = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")
        scores = model(**enc).logits[:, 0].numpy()
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(CrossEncoder.from_pretrained(out / "best").predict(pairs), scores, atol=1e-4)


def test_train_ranker_bad_data_dir(tmp_path, tiny_base, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "products.jsonl").write_text('{"product_id": "a", "title": "t"}\n')
    (tmp_path / "data" / "judgments.csv").write_text("query_id,query,product_id,grade\n1,q,zzz,3\n")
    with pytest.raises(SystemExit) as e:
        main(["train-ranker", "--data", str(tmp_path / "data"), "--base", str(tiny_base),
              "--out", str(tmp_path / "o"), "--no-progress", "--max-length", "64"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: DataError: " in err and "judgments.csv:2: product 'zzz' is not in the catalog" in err
    assert not (tmp_path / "o").exists()  # a refused run leaves no folder behind


@pytest.mark.parametrize("flags,message", [
    (["--max-steps", "0"], "max_steps must be >= 1"),
    (["--max-queries", "-4"], "max_queries must be >= 1"),
    (["--eval-every", "0"], "eval_every must be >= 1"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--base", "/nonexistent/bert"], "base /nonexistent/bert: no such folder"),
    (["--pseudo-steps", "-3"], "pseudo_steps must be >= 0"),
])
def test_train_ranker_bad_option_values_stop_before_any_work(tmp_path, tiny_base, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        main(["train-ranker", "--base", str(tiny_base), "--out", str(tmp_path / "o"), "--no-progress",
              *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_listwise_loss_esci_targets_by_hand():
    # grades E, S, I -> targets 1/1.1, 0.1/1.1, 0 (proportional to the ESCI gains)
    s = torch.tensor([1.0, 0.0, -1.0])
    logq = torch.log_softmax(s, 0)
    expect = -(1 / 1.1 * logq[0] + 0.1 / 1.1 * logq[1])
    loss = listwise_loss(s, torch.tensor([3, 2, 0]), torch.tensor([0, 0, 0]), targets="esci")
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    # a group of only irrelevant candidates has no target and is skipped
    both = listwise_loss(torch.cat([s, torch.zeros(2)]), torch.tensor([3, 2, 0, 0, 0]),
                         torch.tensor([0, 0, 0, 1, 1]), targets="esci")
    assert both.item() == pytest.approx(expect.item(), rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        listwise_loss(s, torch.tensor([3, 2, 0]), torch.tensor([0, 0, 0]), targets="ndcg")


def test_pseudo_query_words_come_from_the_title_in_order():
    rng = random.Random(0)
    title = "Organic Chicken Bone Broth for Dogs, Grain-Free 12 oz"
    words = ["organic", "chicken", "bone", "broth", "dogs", "grain-free", "12", "oz"]
    for _ in range(50):
        q = pseudo_query(title, rng).split()
        assert 2 <= len(q) <= 5 and all(w in words for w in q)
        assert [words.index(w) for w in q] == sorted(words.index(w) for w in q)
    assert pseudo_query("The Set", rng) is None  # fewer than two content words
    # words of any script: accents kept whole, Japanese as the character bigrams of its runs
    assert set(pseudo_query("Crème brûlée", rng).split()) == {"crème", "brûlée"}
    jp = pseudo_query("高品質ステンレス包丁", rng)
    assert jp is not None and all(w in "高品質ステンレス包丁" and len(w) == 2 for w in jp.split())


def test_pseudo_groups_put_the_titles_product_first():
    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    qids = list(by_query)[:5]
    groups = make_pseudo_groups(by_query, qids, catalog, 4, random.Random(1))
    assert groups
    judged = {q: {j.product_id for j in by_query[q]} for q in qids}
    for query, pids in groups:
        assert len(pids) == 4 and len(set(pids)) == 4
        assert any(set(pids) <= s for s in judged.values())  # negatives judged for the same query
        title = catalog[pids[0]].title.lower()
        assert all(w in title for w in query.split())
        for negative in pids[1:]:  # a negative never holds every query word: it would be a positive
            assert not set(query.split()) <= set(words(catalog[negative].title, _JOINERS))


def test_add_attribute_words():
    rng = random.Random(0)
    title = "Organic Bone Broth"
    text = title + " | Grain-free, for dogs. Chicken broth; 12 oz."
    for _ in range(30):
        q = add_attribute_words("bone broth", text, title, rng).split()
        assert q[:2] == ["bone", "broth"] and 1 <= len(q) - 2 <= 2
        # content words of the shown attributes only: no stop words, no repeats, no trailing dots
        assert set(q[2:]) <= {"grain-free", "dogs", "chicken", "12", "oz"}
    assert add_attribute_words("bone broth", title, title, rng) == "bone broth"  # nothing shown
    assert add_attribute_words("bone broth", title + " | for the broth", title, rng) == "bone broth"


def test_pseudo_pairs_extend_queries_from_the_positive(tiny_base):
    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    groups = make_pseudo_groups(by_query, list(by_query)[:5], catalog, 4, random.Random(1))[:6]
    plain = pseudo_pairs(groups, catalog, PrefixSampler(tok, 16, seed=2), random.Random(3), 0.0)
    assert [q for q, _ in plain[::4]] == [q for q, _ in groups]
    extended = pseudo_pairs(groups, catalog, PrefixSampler(tok, 16, seed=2), random.Random(3), 1.0)
    assert [t for _, t in extended] == [t for _, t in plain]  # the same texts: the sampler's draws
    grew = 0
    for i, (query, _) in enumerate(groups):
        new_query, positive_text = extended[4 * i]
        assert all(q == new_query for q, _ in extended[4 * i : 4 * i + 4])  # one query per group
        assert new_query.startswith(query)
        added = new_query[len(query):].split()
        assert all(w in positive_text.lower() for w in added)
        grew += bool(added)
    assert grew >= 3


def test_pseudo_query_loss_targets_the_titles_product(tiny_base, monkeypatch):
    # Each pseudo-query group lists the product whose title made the query first: the loss is the
    # cross-entropy towards slot 0, checked on fixed per-slot scores.
    import relsum_core.trainers.ranker as trainer

    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    seen = []

    def slot_scores(ce, pairs, dtype):
        seen.append(pairs)
        return torch.arange(len(pairs), dtype=torch.float32)

    monkeypatch.setattr(trainer, "_train_scores", slot_scores)
    cfg = RankerTrainConfig(out="unused", batch_size=2, group_size=4)
    sampler = PrefixSampler(AutoTokenizer.from_pretrained(tiny_base), 16)
    loss = trainer.pseudo_query_loss(None, by_query, list(by_query)[:6], catalog, sampler, cfg, "cpu",
                                     torch.float32)()
    scores = torch.arange(len(seen[0]), dtype=torch.float32).view(2, -1)
    want = torch.nn.functional.cross_entropy(scores, torch.zeros(2, dtype=torch.long))
    assert len(seen[0]) == 8 and float(loss) == pytest.approx(float(want))


def test_candidate_groups_are_full_one_query_groups_whatever_the_grades():
    j = lambda q, p, g: Judgment(q, f"query {q}", p, g)
    by_query = {"a": [j("a", f"a{i}", 3) for i in range(9)],  # one grade: still grouped (label-free)
                "b": [j("b", f"b{i}", i % 4) for i in range(3)]}  # fewer than a group: none
    groups = candidate_groups(by_query, ["a", "b"], 4, random.Random(0))
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    ids = [x.product_id for g in groups for x in g]
    assert len(set(ids)) == 8 and all(i.startswith("a") for i in ids)
    regraded = {q: [Judgment(x.query_id, x.query, x.product_id, 0) for x in v] for q, v in by_query.items()}
    same = candidate_groups(regraded, ["a", "b"], 4, random.Random(0))
    assert [[x.product_id for x in g] for g in same] == [[x.product_id for x in g] for g in groups]


def test_distillation_loss_by_hand_over_unequal_groups():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 1.0])
    teacher = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.4])
    groups = torch.tensor([0, 0, 0, 1, 1])

    def ce(s, t):
        p = [math.exp(x / 0.1) for x in t]
        logz = math.log(sum(math.exp(x) for x in s))
        return -sum(pi / sum(p) * (x - logz) for pi, x in zip(p, s))

    expected = (ce([1, 2, 3], [0.1, 0.2, 0.3]) + ce([0, 1], [0.5, 0.4])) / 2
    assert distillation_loss(scores, teacher, groups, 0.1).item() == pytest.approx(expected, rel=1e-6)
    # scores ordered as the teacher orders them lose less than scores ordered against it
    assert distillation_loss(teacher * 30, teacher, groups, 0.1) < distillation_loss(-teacher * 30, teacher,
                                                                                      groups, 0.1)


def test_cosine_distill_loss_by_hand(tiny_base):
    """Cross-entropy of softmax(ranker scores) against softmax(teacher cosine / T), per group."""
    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    train_q = list(by_query)[:3]
    tok = AutoTokenizer.from_pretrained(tiny_base)
    ce = CrossEncoder.from_model(AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1),
                                 tok, max_length=48)
    ce.model.eval()  # no dropout: the same pairs score the same twice
    calls = []

    class Teacher:
        def scores(self, query, texts):
            calls.append((query, list(texts)))
            return np.linspace(0.3, 0.5, len(texts))[::-1]  # first candidate most similar

    cfg = RankerTrainConfig(out="x", batch_size=2, group_size=4, distill_temperature=0.05)
    batch_loss = cosine_distill_loss(ce, Teacher(), by_query, train_q, catalog, PrefixSampler(tok, 8, seed=0),
                                     cfg, torch.device("cpu"), torch.float32)
    loss = batch_loss()
    assert len(calls) == 2 and all(len(texts) == 4 for _, texts in calls)
    train_queries = {by_query[q][0].query for q in train_q}
    assert all(query in train_queries for query, _ in calls)
    pairs = [(query, t) for query, texts in calls for t in texts]
    with torch.no_grad():
        scores = _train_scores(ce, pairs, torch.float32).view(2, 4).double()
    target = torch.softmax(torch.tensor(np.linspace(0.5, 0.3, 4)) / 0.05, dim=0)
    expected = -(target * torch.log_softmax(scores, dim=-1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # differentiable through the ranker
    assert ce.model.classifier.weight.grad is not None


def test_graded_rates():
    # after the warm-up the head is trained: lower rates, so the graded phase builds on the warm-up
    assert graded_rates(RankerTrainConfig(out="x")) == (2e-5, 1e-4)
    # without one the head is new and random: the warm-up's rates
    assert graded_rates(RankerTrainConfig(out="x", pseudo_steps=0)) == (1e-4, 1e-3)
    assert graded_rates(RankerTrainConfig(out="x", lr=3e-5, head_lr=5e-4)) == (3e-5, 5e-4)
    assert graded_rates(RankerTrainConfig(out="x", pseudo_steps=0, lr=3e-5)) == (3e-5, 1e-3)


def test_freeze_lower_layers(tiny_base):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    freeze_lower(model, 1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("bert.embeddings.") for n in frozen)
    assert any(".layer.0." in n for n in frozen) and not any(".layer.1." in n for n in frozen)
    assert not any(n.startswith("classifier.") for n in frozen)
    with pytest.raises(ValueError, match="only 2 layers"):
        freeze_lower(model, 3)


def test_train_ranker_with_pseudo_warmup_and_frozen_layers(tmp_path, tiny_base):
    out = tmp_path / "run"
    main(["train-ranker", "--base", str(tiny_base), "--out", str(out), "--max-queries", "6",
          "--val-fraction", "0.34", "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
          "--group-size", "4", "--max-attr-tokens", "8", "--max-length", "48", "--no-progress",
          "--pseudo-steps", "3", "--freeze-layers", "1", "--precision", "fp32"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    pseudo = [x for x in lines if x["event"] == "pseudo"]
    assert [x["step"] for x in pseudo] == [3] and math.isfinite(pseudo[0]["loss"])
    # the warm-up's model is validated (step 0) before the graded phase, as a candidate checkpoint
    assert [x["step"] for x in lines if x["event"] == "eval"] == [0, 2]
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["lr"], config["head_lr"]) == (2e-5, 1e-4)  # graded rates after a warm-up
    base = BertModel.from_pretrained(tiny_base)
    tuned = AutoModelForSequenceClassification.from_pretrained(out / "best")
    assert json.loads((out / "report.json").read_text())["config"]["train_dtype"] == "float32"
    # frozen: embeddings and layer 0 keep the base weights; layer 1 moved
    assert torch.equal(tuned.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)
    layer, base_layer = tuned.bert.encoder.layer, base.encoder.layer
    assert torch.equal(layer[0].output.dense.weight, base_layer[0].output.dense.weight)
    assert not torch.equal(layer[1].output.dense.weight, base_layer[1].output.dense.weight)


def test_train_ranker_with_cosine_distillation_warmup(tmp_path, tiny_base, capsys):
    out = tmp_path / "run"
    args = ["train-ranker", "--base", str(tiny_base), "--out", str(out), "--max-queries", "6",
            "--val-fraction", "0.34", "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
            "--group-size", "4", "--max-attr-tokens", "8", "--max-length", "48", "--no-progress",
            "--pseudo-steps", "3", "--warmup", "cosine", "--precision", "fp32"]
    assert main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    distill = [x for x in lines if x["event"] == "distill"]
    assert [x["step"] for x in distill] == [3] and math.isfinite(distill[0]["loss"])
    assert not [x for x in lines if x["event"] == "pseudo"]
    assert [x["step"] for x in lines if x["event"] == "eval"] == [0, 2]
    config = json.loads((out / "report.json").read_text())["config"]
    assert (config["warmup"], config["distill_temperature"]) == ("cosine", 0.03)
    assert (config["lr"], config["head_lr"]) == (2e-5, 1e-4)  # graded rates after a warm-up
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--warmup", "teacher"])
    assert "invalid choice: 'teacher'" in capsys.readouterr().err
    for option, value, message in (("--distill-temperature", "0", "distill_temperature must be a finite "
                                    "number > 0, got 0.0"),
                                   ("--distill-weight", "-1", "distill_weight must be a finite number >= 0")):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, option, value])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_train_ranker_distill_weight_adds_the_cosine_loss_to_the_graded_phase(tmp_path, tiny_base):
    out = tmp_path / "run"
    assert main(["train-ranker", "--base", str(tiny_base), "--out", str(out), "--max-queries", "6",
                 "--val-fraction", "0.34", "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
                 "--group-size", "4", "--max-attr-tokens", "8", "--max-length", "48", "--no-progress",
                 "--pseudo-steps", "0", "--distill-weight", "0.5", "--precision", "fp32"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["event"] == "train"]
    assert train and all(math.isfinite(x["distill_loss"]) for x in train)
    for x in train:  # the logged total is the sum of its weighted parts
        assert x["loss"] == pytest.approx(x["listwise_loss"] + 0.5 * x["distill_loss"], rel=1e-5)


def test_pointwise_loss_by_hand():
    # grades E, S, I -> targets 1, 0, 0 (only an exact match is relevant)
    s = torch.tensor([0.0, 2.0, -1.0])
    want = (math.log(2.0) + math.log1p(math.exp(2.0)) + math.log1p(math.exp(-1.0))) / 3
    assert pointwise_loss(s, torch.tensor([3, 2, 0])).item() == pytest.approx(want, rel=1e-6)
    # it moves scores on their own, not relative to the group: a shift changes it, unlike ListNet
    g = torch.tensor([3, 0, 1])
    assert pointwise_loss(s + 1.0, g).item() != pytest.approx(pointwise_loss(s, g).item())
    assert listwise_loss(s + 1.0, g, torch.zeros(3, dtype=torch.long)).item() == pytest.approx(
        listwise_loss(s, g, torch.zeros(3, dtype=torch.long)).item(), abs=1e-6)


def test_train_ranker_pointwise_weight(tmp_path, tiny_base, capsys):
    out = tmp_path / "run"
    args = ["train-ranker", "--base", str(tiny_base), "--out", str(out), "--max-queries", "6",
            "--val-fraction", "0.34", "--epochs", "1", "--max-steps", "3", "--batch-size", "2",
            "--group-size", "4", "--max-attr-tokens", "8", "--max-length", "48", "--no-progress",
            "--pseudo-steps", "0"]
    main(args + ["--pointwise-weight", "2.5", "--keyword-prob", "0.5"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["event"] == "train"]
    assert train
    for x in train:
        assert x["loss"] == pytest.approx(x["listwise_loss"] + 2.5 * x["pointwise_loss"], rel=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["pointwise_weight"] == 2.5 and report["config"]["keyword_prob"] == 0.5
    for bad in ("-1", "nan"):
        for flag, message in (("--pointwise-weight", "pointwise_weight must be a finite number >= 0"),
                              ("--keyword-prob", "keyword_prob must be in [0, 1]"),
                              ("--lr", "lr must be a finite number > 0"),
                              ("--pseudo-head-lr", "pseudo_head_lr must be a finite number > 0"),
                              ("--pseudo-attr-prob", "pseudo_attr_prob must be in [0, 1]")):
            with pytest.raises(SystemExit) as e:
                main(args[:4] + [str(tmp_path / f"bad{flag}{bad}")] + args[5:] + [flag, bad])
            assert e.value.code == 2 and message in capsys.readouterr().err


def test_train_ranker_reads_a_wands_folder(tmp_path, tiny_base):
    # Eight bundled ESCI queries rewritten as WANDS's three tab-separated files (E/S/C/I as
    # Exact/Partial/Partial/Irrelevant): the trainer takes that folder as it takes an ESCI one.
    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    keep = [j for q in list(by_query)[:8] for j in by_query[q]]
    wands = tmp_path / "wands"
    wands.mkdir()

    def clean(text):  # no tabs, newlines or quotes inside a cell
        return " ".join(text.split()).replace('"', "'")

    products = ["product_id\tproduct_name\tproduct_description\tproduct_features"]
    for pid in dict.fromkeys(j.product_id for j in keep):
        p = catalog[pid]
        features = "|".join(f"feature{i}:{clean(b)}" for i, b in enumerate(p.bullets))
        products.append("\t".join([pid, clean(p.title), clean(p.description), features]))
    (wands / "product.csv").write_text("\n".join(products) + "\n")
    queries = dict((j.query_id, j.query) for j in keep)
    (wands / "query.csv").write_text("query_id\tquery\n" + "".join(f"{q}\t{t}\n" for q, t in queries.items()))
    word = {3: "Exact", 2: "Partial", 1: "Partial", 0: "Irrelevant"}
    (wands / "label.csv").write_text("id\tquery_id\tproduct_id\tlabel\n" + "".join(
        f"{i}\t{j.query_id}\t{j.product_id}\t{word[j.grade]}\n" for i, j in enumerate(keep)))

    out = tmp_path / "run"
    main(["train-ranker", "--data", str(wands), "--base", str(tiny_base), "--out", str(out),
          "--val-fraction", "0.25", "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
          "--group-size", "4", "--max-attr-tokens", "8", "--max-length", "48", "--no-progress",
          "--pseudo-steps", "2"])
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["train_queries"] == 6 and report["split"]["val_queries"] == 2
    assert report["split"]["train_pairs"] + report["split"]["val_pairs"] == len(keep)
    assert report["config"]["data"] == str(wands)
    assert set(report["table"]) == {"fine-tuned cross-encoder", "BM25 (bm25s)", "untuned encoder cosine"}


def test_cosine_base_scores_with_its_own_tokenizer(tmp_path, tiny_base):
    """--cosine-base with another vocabulary than --base: its ids are its own, never base's."""
    from transformers import BertConfig, BertTokenizerFast

    words = sorted({w for j in load_dataset()[1][:400] for w in j.query.lower().split()})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    small = tmp_path / "small_bert"
    tok = BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores vocab_file=
    assert len(tok) == 5 + len(words)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128)).save_pretrained(small)
    tok.save_pretrained(small)
    report = train_ranker(RankerTrainConfig(
        out=str(tmp_path / "run"), base=str(tiny_base), cosine_base=str(small), max_queries=6, max_steps=1,
        batch_size=2, group_size=4, max_attr_tokens=16, max_length=64, pseudo_steps=0, progress=False))
    cosine = report["table"]["untuned encoder cosine"]
    assert report["config"]["cosine_base"] == str(small)
    assert all(math.isfinite(cosine[f"{v}/ndcg@10"]) for v in ("title", "title+64"))


def test_query_split_keeps_one_query_text_on_one_side_in_runs_and_folds():
    """train-ranker and its CV folds split through query_split: ids of one query text (up to case and
    spacing) never straddle train and validation."""
    from dataclasses import replace

    by_query = {f"q{i:02d}": [Judgment(f"q{i:02d}", f"query {i}", "p", 1)] for i in range(12)}
    by_query["dup"] = [Judgment("dup", "QUERY  4", "p", 1)]
    cfg = RankerTrainConfig(out="x", val_fraction=0.25)
    straddled = 0
    for seed in range(8):
        folds = [replace(cfg, split_seed=seed, folds=3, fold=f) for f in range(3)]
        runs = [replace(cfg, split_seed=seed), *folds]
        for c in runs:
            train, val = query_split(by_query, c)
            assert ({"q04", "dup"} <= set(train)) or ({"q04", "dup"} <= set(val))
            assert sorted(train + val) == sorted(by_query)
        plain = split_queries(list(by_query), 0.25, seed)[1]  # ids alone
        straddled += ("q04" in plain) != ("dup" in plain)
    assert straddled  # the ids alone would have put them apart
    assert sorted(sum(query_split(by_query, replace(cfg, max_queries=5)), [])) == sorted(list(by_query)[:5])


def test_train_ranker_refuses_validation_queries_without_a_positive_grade(tmp_path, tiny_base, capsys):
    # Every validation query graded all irrelevant: NDCG would be NaN at every evaluation and the
    # "best" checkpoint the untrained step 0; the run must stop before any output instead.
    import shutil

    from relsum_core.data import bundled_data_dir

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(bundled_data_dir() / "products.jsonl.gz", data)
    _, judgments = load_dataset()
    by_query = group_by_query(judgments)
    _, val_q = query_split(by_query, RankerTrainConfig(out="unused", max_queries=8))
    keep = [j for q in list(by_query)[:8] for j in by_query[q]]
    rows = ["query_id,query,product_id,grade"] + [
        f"{j.query_id},{j.query},{j.product_id},{0 if j.query_id in val_q else j.grade}" for j in keep]
    (data / "judgments.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["train-ranker", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "o"),
              "--max-queries", "8", "--max-length", "64", "--no-progress"])
    assert e.value.code == 2
    assert f"none of the {len(val_q)} validation queries has a candidate graded above irrelevant" in (
        capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
    # every training query of one grade: nothing to learn from, refused as early, so the corrected
    # rerun is not blocked by a log of this one
    rows = ["query_id,query,product_id,grade"] + [
        f"{j.query_id},{j.query},{j.product_id},{j.grade if j.query_id in val_q else 3}" for j in keep]
    (data / "judgments.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit):
        main(["train-ranker", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "o"),
              "--max-queries", "8", "--max-length", "64", "--no-progress"])
    assert "no training query has candidates of two different grades" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # every query judged for fewer products than --group-size: the warm-up has no groups, refused
    # before the baselines and any output (it failed after them, and its log blocked the rerun)
    few = [j for q in list(by_query)[:8] for j in by_query[q][:3]]
    rows = ["query_id,query,product_id,grade"] + [
        f"{j.query_id},{j.query},{j.product_id},{j.grade}" for j in few]
    (data / "judgments.csv").write_text("\n".join(rows) + "\n")
    for warmup in ("pseudo", "cosine"):
        with pytest.raises(SystemExit):
            main(["train-ranker", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "o"),
                  "--max-queries", "8", "--max-length", "64", "--no-progress", "--group-size", "4",
                  "--warmup", warmup])
        assert (f"the {warmup} warm-up needs a training query with --group-size 4 judged candidates, and "
                "the most any has is 3; pass --group-size 3 or less") in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    assert main(["train-ranker", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "o"),
                 "--max-queries", "8", "--max-length", "64", "--no-progress", "--group-size", "3",
                 "--pseudo-steps", "1", "--max-steps", "1", "--batch-size", "2"]) == 0


def test_an_empty_deal_of_warmup_groups_is_dealt_again():
    """Pseudo-query deals are random: one that comes up empty is luck, not an impossible warm-up."""
    from relsum_core.trainers.ranker import _WARMUP_DEALS, _dealt_batches

    deals = iter([[], [], ["g1", "g2"], []])
    batches = _dealt_batches(lambda: next(deals), 2, "pseudo-query")
    assert next(batches) == ["g1", "g2"]
    with pytest.raises(ValueError, match=f"no pseudo-query groups in {_WARMUP_DEALS} deals"):
        next(_dealt_batches(lambda: [], 2, "pseudo-query"))


# ------------------------------------------------------------------ mutation-test additions
# (paired_ndcg10 and RANKER are imported inside their test)
def test_query_split_follows_split_seed_not_seed():
    by_query = {f"q{i:02d}": [Judgment(f"q{i:02d}", f"query {i}", "p", 1)] for i in range(20)}
    texts = {q: v[0].query for q, v in by_query.items()}
    splits = set()
    for s in range(4):
        cfg = RankerTrainConfig(out="x", val_fraction=0.25, split_seed=s)
        got = query_split(by_query, cfg)
        assert got == split_queries(list(by_query), 0.25, s, query_texts=texts)
        other_seed = RankerTrainConfig(out="x", val_fraction=0.25, split_seed=s, seed=7)
        assert query_split(by_query, other_seed) == got
        splits.add(tuple(got[1]))
    assert len(splits) > 1  # split_seed is used


def test_make_groups_drops_a_group_of_one_grade():
    # 1 E and 7 I in groups of 4: dealt by grade, one group is all I and carries no signal
    by_query = {"a": [Judgment("a", "q", f"a{i}", g) for i, g in enumerate([3] + [0] * 7)]}
    for seed in range(5):
        groups = make_groups(by_query, ["a"], 4, random.Random(seed))
        assert len(groups) == 1 and len(groups[0]) == 4 and {j.grade for j in groups[0]} == {0, 3}


def test_make_groups_shuffle_candidates_and_group_order():
    by_query = {q: [Judgment(q, "q", f"{q}{i}", i % 2) for i in range(16)] for q in "abcdef"}
    members, orders = set(), set()
    for seed in range(6):
        groups = make_groups(by_query, list(by_query), 4, random.Random(seed))
        members.add(frozenset(frozenset(j.product_id for j in g) for g in groups))
        orders.add(tuple(g[0].query_id for g in groups))
    assert len(members) > 1  # which candidates share a group changes with the draw
    assert len(orders) > 1 and any(list(o) != sorted(o) for o in orders)  # queries interleaved


def test_pseudo_query_lengths_cover_two_to_five_distinct_words():
    rng = random.Random(0)
    title = "Red Red Cotton Shirt Long Sleeve Slim Fit Red Shirt"
    seen = set()
    for _ in range(300):
        q = pseudo_query(title, rng).split()
        assert len(set(q)) == len(q)  # a word repeated in the title is one term
        seen.add(len(q))
    assert seen == {2, 3, 4, 5}


def test_add_attribute_words_adds_one_or_two():
    rng = random.Random(0)
    title = "Organic Bone Broth"
    text = title + " | Grain-free, for dogs. Chicken broth; 12 oz."
    counts = {len(add_attribute_words("bone broth", text, title, rng).split()) - 2 for _ in range(60)}
    assert counts == {1, 2}


def test_candidate_groups_use_every_full_group_and_shuffle_them():
    j = lambda q, p: Judgment(q, f"query {q}", p, 1)
    by_query = {"a": [j("a", f"a{i}") for i in range(8)]}  # exactly two groups of 4
    groups = candidate_groups(by_query, ["a"], 4, random.Random(0))
    assert sorted(x.product_id for g in groups for x in g) == [f"a{i}" for i in range(8)]
    many = {q: [j(q, f"{q}{i}") for i in range(4)] for q in "abcdef"}
    orders = {tuple(g[0].query_id for g in candidate_groups(many, list(many), 4, random.Random(s)))
              for s in range(6)}
    assert len(orders) > 1  # groups of several queries are dealt in a random order


def test_paired_ndcg10_by_hand():
    from relsum_core.trainers.ranker import RANKER, paired_ndcg10

    def scorer(at5, at10):
        return {f"{v}/ndcg@{k}": dict(zip("ab", vals)) for v in ("title", "title+64")
                for k, vals in ((5, at5), (10, at10))}

    per_query = {RANKER: scorer((0.0, 0.0), (0.9, 0.5)), "BM25": scorer((1.0, 1.0), (0.6, 0.7))}
    got = paired_ndcg10(per_query)
    assert set(got) == {"BM25"}  # never the ranker against itself
    d = got["BM25"]["title+64"]
    assert (d["n"], d["wins"], d["losses"]) == (2, 1, 1) and d["mean"] == pytest.approx(0.05)


def test_freeze_lower_zero_freezes_nothing(tiny_base):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    freeze_lower(model, 0)
    assert all(p.requires_grad for p in model.parameters())
    freeze_lower(model, 2)  # every layer of the 2-layer encoder: allowed
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("bert.encoder."))


def test_group_ids_with_a_gap_average_over_the_groups_present():
    """Groups 0 and 2 only: the mean is over those two, not over three with an empty group 1."""
    scores = torch.tensor([2.0, 0.0, 1.0, -1.0])
    grades = torch.tensor([3, 0, 2, 1])
    contiguous = listwise_loss(scores, grades, torch.tensor([0, 0, 1, 1]))
    gapped = listwise_loss(scores, grades, torch.tensor([0, 0, 2, 2]))
    assert gapped.item() == pytest.approx(contiguous.item())
