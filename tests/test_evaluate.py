import json
import math
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from relsum_core.data import Judgment, split_queries
from relsum_core.evaluate import (
    N_BOOTSTRAP,
    Evaluation,
    _markdown,
    evaluate_summaries,
    parse_named,
    read_summaries,
)
from relsum_core.metrics import ndcg_at_k, recall_at_precision
from relsum_core.policy import load_policy
from relsum_core.precision import resolve_precision
from relsum_core.summarize import summarize_catalog

PRODUCTS = [  # id, title, bullets
    ("p1", "red cotton shirt", "size large"),
    ("p2", "blue cotton shirt", "size small"),
    ("p3", "steel water bottle", "kids"),
    ("p4", "organic dog food", "chicken"),
    ("p5", "kids water bottle", "blue steel"),
    ("p6", "dog food", "organic chicken"),
]
JUDGMENTS = [("q1", "red shirt", "p1", 3), ("q1", "red shirt", "p2", 1),
             ("q2", "water bottle", "p3", 3), ("q2", "water bottle", "p5", 2),
             ("q3", "chicken dog food", "p4", 3), ("q3", "chicken dog food", "p6", 0)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "products.jsonl", "w") as f:
        for pid, title, bullets in PRODUCTS:
            f.write(json.dumps({"product_id": pid, "title": title, "bullet_points": bullets}) + "\n")
    with open(d / "judgments.csv", "w") as f:
        f.write("query_id,query,product_id,grade\n")
        f.writelines(f"{q},{text},{p},{g}\n" for q, text, p, g in JUDGMENTS)
    return d


def test_recall_at_precision_hand_cases():
    # thresholds: top-1 P 1 R 1/3, top-2 P 1 R 2/3, top-3 P 2/3, top-4 P 3/4
    assert recall_at_precision([0.9, 0.8, 0.7, 0.6], [True, True, False, True]) == pytest.approx(2 / 3)
    assert recall_at_precision([0.9, 0.8, 0.7, 0.6], [True, True, False, True], 0.7) == pytest.approx(1.0)
    # a tie cannot be split: the first cut-off holds both tied pairs (P 1/2)
    assert recall_at_precision([0.9, 0.9, 0.5], [True, False, True]) == 0.0
    assert recall_at_precision([0.9, 0.9, 0.5], [True, True, False]) == pytest.approx(1.0)
    assert math.isnan(recall_at_precision([0.3, 0.2], [False, False]))
    # exactly at the target: 9 positives then 1 negative is precision 0.9, so every positive counts
    assert recall_at_precision([1.0 - i / 10 for i in range(10)], [True] * 9 + [False], 0.9) == 1.0
    # NaN would sort last, as the lowest score; 90 meant as 0.9 would give 0
    with pytest.raises(ValueError, match="scores contain NaN"):
        recall_at_precision([1.0, math.nan, 0.5], [True, True, False])
    for precision in (90, 0, -0.5, math.nan):
        with pytest.raises(ValueError, match="precision must be in"):
            recall_at_precision([1.0, 0.5], [True, False], precision)
    assert recall_at_precision([1.0, 0.5], [True, False], 1.0) == 1.0  # exactly 1 is a precision


def _overlap_scorer(pairs):
    """Counts query words in the text: a ranker that rewards attributes the query names."""
    return np.array([sum(w in t.split() for w in q.split()) for q, t in pairs], dtype=np.float64)


def test_evaluation_metrics_and_paired_delta():
    js = [Judgment(q, text, p, g) for q, text, p, g in JUDGMENTS]
    ev = Evaluation(_overlap_scorer, js, queries=["q1", "q2", "q3"])
    assert ev.product_ids == ["p1", "p2", "p3", "p4", "p5", "p6"]
    titles = {pid: title for pid, title, _ in PRODUCTS}
    base = ev.score(titles)
    # q3: both titles hold "dog food"; only p4's summary adds "chicken", which breaks the tie right
    better = ev.score({**titles, "p4": "organic dog food | chicken"})
    m0, m1 = ev.metrics(base), ev.metrics(better, base)
    assert m1["ndcg@10"] > m0["ndcg@10"] and m1["ndcg@10_delta"] > 0
    assert m1["ndcg@10_delta"] == pytest.approx(m1["ndcg@10"] - m0["ndcg@10"])
    for m in (m0, m1):
        for key in ("ndcg@5", "ndcg@10", "recall@p90"):
            assert m[f"{key}_lo"] - 1e-12 <= m[key] <= m[f"{key}_hi"] + 1e-12
    assert "ndcg@10_delta" not in m0
    # only p4 (3 words) stands above the tie at 2 that mixes E pairs with S and I ones: recall 1/3
    assert m1["recall@p90"] == pytest.approx(1 / 3)
    # the resamples are seeded: the same evaluation gives the same intervals
    again = Evaluation(_overlap_scorer, js, queries=["q1", "q2", "q3"]).metrics(better, base)
    assert again == m1


def test_evaluation_rejects_unknown_or_no_queries():
    js = [Judgment(q, text, p, g) for q, text, p, g in JUDGMENTS]
    with pytest.raises(ValueError, match="no judgments for 1 queries"):
        Evaluation(_overlap_scorer, js, queries=["q1", "q9"])
    with pytest.raises(ValueError, match="no queries"):
        Evaluation(_overlap_scorer, js, queries=[])
    with pytest.raises(ValueError, match="NDCG is undefined"):
        Evaluation(_overlap_scorer, [Judgment("q", "x", "p1", 0), Judgment("q", "x", "p2", 0)], queries=["q"])


def test_read_summaries_and_named_arguments(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"product_id": "p1", "summary": "large"}\n\n'
                    '{"product_id": "p2", "skipped": "no text"}\n')
    assert read_summaries(path) == {"p1": "large", "p2": ""}
    path.write_text('{"product_id": "p1", "summary": "large"}\n{"product_id": "p2"\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: not JSON"):
        read_summaries(path)
    path.write_text('{"product_id": "p1", "summary": 3}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: a row needs a string 'summary'"):
        read_summaries(path)
    with pytest.raises(FileNotFoundError):
        read_summaries(tmp_path / "none.jsonl")
    # another catalog's file: its rows name other titles under the same ids
    from relsum_core.data import Product

    path.write_text('{"product_id": "p1", "title": "red shirt", "summary": "cotton"}\n'
                    '{"product_id": "p2", "summary": "no title: not checked"}\n')
    catalog = {"p1": Product("p1", "red shirt"), "p2": Product("p2", "blue towel")}
    assert read_summaries(path, catalog) == {"p1": "cotton", "p2": "no title: not checked"}
    catalog["p1"] = Product("p1", "garden hose")
    with pytest.raises(ValueError, match="s.jsonl:1: product p1 is titled 'red shirt' here but 'garden"):
        read_summaries(path, catalog)
    assert parse_named(["a=x.jsonl", "b=y"], "--summaries") == {"a": "x.jsonl", "b": "y"}
    for bad in (["x.jsonl"], ["=x"], ["a="], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="--summaries"):
            parse_named(bad, "--summaries")


def test_read_summaries_refuses_two_summaries_of_one_product(tmp_path):
    from relsum_core.summarize import shard_path

    path = tmp_path / "s.jsonl"
    path.write_text('{"product_id": "p1", "summary": "large"}\n{"product_id": "p2", "summary": "red"}\n'
                    '{"product_id": "p1", "summary": "large"}\n')
    assert read_summaries(path) == {"p1": "large", "p2": "red"}  # the same row twice: nothing to choose
    path.write_text('{"product_id": "p1", "summary": "large"}\n{"product_id": "p1", "summary": "small"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: product p1 has another summary at .*s.jsonl:1"):
        read_summaries(path)
    path.unlink()
    # across the shards of one run: the message names the other shard's line
    shard_path(path, 0, 2).write_text('{"product_id": "p1", "summary": "large"}\n')
    shard_path(path, 1, 2).write_text('{"product_id": "p2", "summary": "red"}\n'
                                      '{"product_id": "p1", "skipped": "no text"}\n')
    with pytest.raises(ValueError, match=r"shard001-of-002.jsonl:2: product p1 .*shard000-of-002.jsonl:1"):
        read_summaries(path)


def test_evaluate_summaries_end_to_end(tmp_path, data_dir, tiny_ranker_dir, tiny_policy_dir, monkeypatch):
    scored = []  # the product texts each variant's scoring saw
    score = Evaluation.score
    monkeypatch.setattr(Evaluation, "score",
                        lambda self, texts: scored.append(dict(texts)) or score(self, texts))
    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"product_id": pid, "summary": bullets}) + "\n"
                            for pid, _, bullets in PRODUCTS))
    out = tmp_path / "eval"
    report = evaluate_summaries(out, ranker=str(tiny_ranker_dir), data=str(data_dir),
                                summaries={"hand": str(hand)}, policies={"tiny": str(tiny_policy_dir)},
                                doc2query={"d2q": str(tiny_policy_dir)},
                                split="all", desc_tokens=(2, 8), budget=4, max_product_tokens=16,
                                batch_size=4, device="cpu", progress=False)
    assert list(report["variants"]) == ["title", "title+desc2", "title+desc8", "title+hand", "title+tiny",
                                        "title+d2q"]
    d2q = [json.loads(x) for x in (out / "summaries-d2q.jsonl").read_text().splitlines()]
    assert sorted(r["product_id"] for r in d2q) == [p for p, _, _ in PRODUCTS]
    assert all(r["task"] == "doc2query" for r in d2q)
    assert report["n_queries"] == 3 and report["n_pairs"] == 6 and report["n_products"] == 6
    assert "ndcg@10_delta" not in report["variants"]["title"]
    assert all("ndcg@10_delta" in v for k, v in report["variants"].items() if k != "title")
    assert json.loads((out / "report.json").read_text()) == report
    assert "title+hand" in (out / "report.md").read_text() and (out / "ndcg.png").stat().st_size > 0
    rows = [json.loads(x) for x in (out / "summaries-tiny.jsonl").read_text().splitlines()]
    assert sorted(r["product_id"] for r in rows) == [p for p, _, _ in PRODUCTS]
    assert all(0 < r["tokens"] <= 4 for r in rows)
    want = str(resolve_precision("auto", "cpu", auto_on_cuda=False)).removeprefix("torch.")
    assert report["sampling_dtype"] == {"tiny": want, "d2q": want}
    # what was scored: the title, then title | the summary (and | a description prefix)
    titles = {pid: title for pid, title, _ in PRODUCTS}
    assert titles in scored
    assert {pid: f"{title} | {bullets}" for pid, title, bullets in PRODUCTS} in scored
    assert any(all(t[p].startswith(titles[p] + " | ") and t[p] != titles[p] + " | " + b
                   for p, _, b in PRODUCTS) for t in scored)  # the tiny policy's own summaries


def test_evaluate_without_matplotlib_still_writes_the_reports(tmp_path, data_dir, tiny_ranker_dir,
                                                              monkeypatch):
    import sys

    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"product_id": pid, "summary": b}) + "\n" for pid, _, b in PRODUCTS))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "eval"
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        evaluate_summaries(out, ranker=str(tiny_ranker_dir), data=str(data_dir),
                           summaries={"hand": str(hand)}, split="all", device="cpu", progress=False)
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    assert not (out / "ndcg.png").exists()


def test_evaluate_summaries_bad_input(tmp_path, data_dir, tiny_ranker_dir):
    part = tmp_path / "part.jsonl"
    part.write_text(json.dumps({"product_id": "p1", "summary": "x"}) + "\n")
    with pytest.raises(ValueError, match="lack 5 of the 6 evaluated products"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(data_dir),
                           summaries={"part": str(part)}, split="all", device="cpu", plot=False)
    # a bad file fails before any policy runs (this policy path does not even exist)
    with pytest.raises(ValueError, match="lack 5 of the 6"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(data_dir),
                           summaries={"part": str(part)}, policies={"p": str(tmp_path / "no_policy")},
                           split="all", device="cpu", plot=False)
    assert not (tmp_path / "e" / "summaries-p.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="summaries 'gone'"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(data_dir),
                           summaries={"gone": str(tmp_path / "gone.jsonl")}, split="all", device="cpu")
    with pytest.raises(ValueError, match=r"names \['desc32'\] would replace the description-prefix"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), summaries={"desc32": str(part)})
    with pytest.raises(FileNotFoundError, match="is a directory, not a JSONL file"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), summaries={"d": str(tmp_path)})
    with pytest.raises(ValueError, match="split must be one of validation, heldout, all"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), split="test")
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), policies={"a": "default"},
                           precision="half")
    with pytest.raises(ValueError, match="more than one of summaries files / policies / doc2query"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), policies={"a": "default"},
                           doc2query={"a": "default"})
    with pytest.raises(ValueError, match="more than one of summaries files / policies / doc2query"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), summaries={"a": str(part)},
                           policies={"a": "default"})


def test_summarize_only_the_given_products(tmp_path, data_dir, tiny_policy_dir):
    out = tmp_path / "s.jsonl"
    summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(data_dir), budget=3,
                      product_ids=["p4", "p2"], progress=False)
    assert sorted(r["product_id"] for r in map(json.loads, out.read_text().splitlines())) == ["p2", "p4"]
    with pytest.raises(ValueError, match="not in the catalog"):
        summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(data_dir), product_ids=["p1", "zz"])
    with pytest.raises(ValueError, match="unknown task 'queries'"):
        summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(data_dir), task="queries")


def test_summarize_samples_in_the_asked_precision(tmp_path, data_dir, tiny_policy_dir, monkeypatch):
    import relsum_core.summarize as summarize

    loaded = []

    def recording_load_policy(*args, **kwargs):
        model, tok = load_policy(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model, tok

    monkeypatch.setattr(summarize, "load_policy", recording_load_policy)
    for precision in ("fp32", "bf16", "auto"):
        out = tmp_path / f"{precision}.jsonl"
        summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(data_dir), budget=3,
                          progress=False, precision=precision)
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == len(PRODUCTS) and all(0 < r["tokens"] <= 3 for r in rows)
    assert loaded == [torch.float32, torch.bfloat16, resolve_precision("auto", "cpu", auto_on_cuda=False)]
    with pytest.raises(ValueError, match="precision must be one of"):
        summarize_catalog(tmp_path / "x.jsonl", policy=str(tiny_policy_dir), catalog=str(data_dir),
                          precision="fp16")
    assert len(loaded) == 3 and not (tmp_path / "x.jsonl").exists()  # refused before loading anything


def test_doc2query_prompt_asks_for_queries(tiny_policy_dir):
    from relsum_core.data import Product
    from relsum_core.policy import build_prompt, load_policy

    _, tok = load_policy(tiny_policy_dir)
    prod = Product("p1", "red cotton shirt", description="size large")
    summary = build_prompt(prod, tok, budget=8)
    queries = build_prompt(prod, tok, budget=8, task="doc2query")
    assert "red cotton shirt" in summary and "red cotton shirt" in queries
    assert "search queries" in queries and "search queries" not in summary
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt(prod, tok, task="title")


def test_evaluate_cli(tmp_path, data_dir, tiny_ranker_dir, capsys):
    from relsum_core.cli import main

    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"product_id": pid, "summary": b}) + "\n" for pid, _, b in PRODUCTS))
    out = tmp_path / "eval"
    assert main(["evaluate", "--ranker", str(tiny_ranker_dir), "--data", str(data_dir), "--out", str(out),
                 "--summaries", f"hand={hand}", "--split", "all", "--desc-tokens", "4", "--device", "cpu",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| title+desc4 |" in printed and "| title+hand |" in printed
    with pytest.raises(SystemExit):
        main(["evaluate", "--ranker", str(tiny_ranker_dir), "--out", str(out), "--summaries", str(hand)])
    assert "NAME=PATH" in capsys.readouterr().err


def test_metrics_use_their_k_and_bootstrap_the_resampled_queries():
    # q1 has its E at rank 7 (NDCG@5 and @10 differ); intervals come from the seeded query resamples
    js = [Judgment("q1", "x", f"p{i}", 0) for i in range(6)] + [Judgment("q1", "x", "p6", 3)]
    js += [Judgment("q2", "y", "r0", 3), Judgment("q2", "y", "r1", 0),
           Judgment("q3", "z", "s0", 3), Judgment("q3", "z", "s1", 2)]
    ev = Evaluation(lambda pairs: np.zeros(len(pairs)), js, queries=["q1", "q2", "q3"])
    s = np.array([7, 6, 5, 4, 3, 2, 1.0, 0.5, 1.0, 1.0, 0.0])
    b = np.array([0, 0, 0, 0, 0, 0, 1.0, 1.0, 0.5, 1.0, 0.0])
    m = ev.metrics(s, b)
    for k in (5, 10):
        v = np.array([ndcg_at_k(s[sl], ev.grades[sl], k) for sl in ev.slices])
        d = v - np.array([ndcg_at_k(b[sl], ev.grades[sl], k) for sl in ev.slices])
        assert m[f"ndcg@{k}"] == pytest.approx(v.mean())
        lo, hi = np.percentile([v[r].mean() for r in ev.resamples], [2.5, 97.5])
        assert (m[f"ndcg@{k}_lo"], m[f"ndcg@{k}_hi"]) == pytest.approx((lo, hi))
        lo, hi = np.percentile([d[r].mean() for r in ev.resamples], [2.5, 97.5])
        assert (m[f"ndcg@{k}_delta_lo"], m[f"ndcg@{k}_delta_hi"]) == pytest.approx((lo, hi))
    assert m["ndcg@5"] != m["ndcg@10"] and m["recall@p90_lo"] < m["recall@p90_hi"]


def test_validation_split_and_the_texts_each_variant_scores(tmp_path, tiny_ranker_dir, monkeypatch):
    products = [("p1", "red cotton shirt", "size large cotton fabric machine washable"),
                ("p2", "blue cotton shirt", "size small slim fit long sleeves"),
                ("p3", "steel water bottle", "kids leak proof lid one litre"),
                ("p4", "organic dog food", "chicken grain free adult dogs"),
                ("p5", "kids water bottle", "blue steel insulated straw lid"),
                ("p6", "dog food", "organic chicken small breed kibble")]
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"product_id": p, "title": t, "bullet_points": b} for p, t, b in products]
    (d / "products.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "judgments.csv").write_text("query_id,query,product_id,grade\n"
                                     + "".join(f"{q},{t},{p},{g}\n" for q, t, p, g in JUDGMENTS))
    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"product_id": p, "summary": f"hand note {p}"}) + "\n"
                            for p, _, _ in products))
    scored = []
    score = Evaluation.score

    def recording_score(self, texts):
        scored.append((list(self.queries), dict(texts)))
        return score(self, texts)

    monkeypatch.setattr(Evaluation, "score", recording_score)
    report = evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(d),
                                summaries={"hand": str(hand)}, split="validation", val_fraction=0.34,
                                desc_tokens=(2,), device="cpu", plot=False, progress=False)
    val = split_queries(["q1", "q2", "q3"], 0.34, 0)[1]  # the ranker's held-out queries, not its training set
    assert all(queries == val for queries, _ in scored) and report["n_queries"] == len(val)
    assert report["query_ids"] == val  # which queries the numbers are over
    titles = {p: t for p, t, _ in products}
    assert any(t == {p: f"{titles[p]} | hand note {p}" for p in t} for _, t in scored)
    tok = AutoTokenizer.from_pretrained(tiny_ranker_dir)
    for p, text in scored[1][1].items():  # title+desc2: two attribute tokens after the title
        assert text.startswith(titles[p] + " | ")
        assert len(tok(text.split(" | ", 1)[1], add_special_tokens=False)["input_ids"]) <= 2
    # each variant's cost to the ranker: the mean length of the doc side it scored, in ranker tokens
    for name, texts in zip(report["variants"], (t for _, t in scored)):
        want = np.mean([len(tok(x, add_special_tokens=False)["input_ids"]) for x in texts.values()])
        assert report["variants"][name]["mean_doc_tokens"] == pytest.approx(want)
    assert report["variants"]["title+hand"]["mean_words"] == 3  # "hand note p1"
    md = (tmp_path / "e" / "report.md").read_text().splitlines()
    row = next(x for x in md if x.startswith("| title+hand |"))
    assert row.endswith(f"| 3.0 | {report['variants']['title+hand']['mean_doc_tokens']:.1f} |")


def test_refuses_to_validate_on_queries_the_ranker_trained_on(tmp_path, data_dir, tiny_ranker_dir):
    import shutil

    from relsum_core.ranker import CrossEncoder

    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"product_id": p, "summary": b}) + "\n" for p, _, b in PRODUCTS))
    val = split_queries(["q1", "q2", "q3"], 0.34, 0)[1]
    text = {q: t for q, t, _, _ in JUDGMENTS}
    ranker = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker)

    def run(train_queries, split="validation"):
        record = {q: text.get(q, "?") for q in train_queries} if train_queries is not None else None
        (ranker / "relsum_ranker.json").write_text(json.dumps({"train_queries": record}))
        return evaluate_summaries(tmp_path / "e", ranker=str(ranker), data=str(data_dir),
                                  summaries={"hand": str(hand)}, split=split, val_fraction=0.34,
                                  device="cpu", plot=False, progress=False)

    # trained with --folds or --max-queries: its training set holds evaluate's validation queries
    with pytest.raises(ValueError, match=rf"trained on 1 of the 1 validation queries \(e.g. \['{val[0]}'"):
        run(["q1", "q2", "q3"])
    assert not (tmp_path / "e" / "report.json").exists()
    # the split it trained with passes
    report = run(sorted({"q1", "q2", "q3"} - set(val)))
    assert report["n_queries"] == len(val) and report["ranker_trained_queries"] == 0
    # another dataset whose ids happen to match: the texts differ, so these are other queries
    other = {"train_queries": {q: "garden hose" for q in text}}
    (ranker / "relsum_ranker.json").write_text(json.dumps(other))
    report = evaluate_summaries(tmp_path / "e", ranker=str(ranker), data=str(data_dir),
                                summaries={"hand": str(hand)}, val_fraction=0.34, device="cpu", plot=False)
    assert report["ranker_trained_queries"] == 0
    # a fold ranker: every query it did not train on
    report = run(["q2"], split="heldout")
    assert report["split"] == "heldout" and report["n_queries"] == 2 and report["ranker_trained_queries"] == 0
    with pytest.raises(ValueError, match="trained on every query of this data .*none is held out"):
        run(["q1", "q2", "q3"], split="heldout")
    with pytest.raises(ValueError, match="--split heldout needs the ranker's record"):
        run(None, split="heldout")
    # every query, knowingly: the report says how many the ranker trained on (None: no record)
    report = run(["q1", "q2"], split="all")
    assert report["n_queries"] == 3 and report["ranker_trained_queries"] == 2
    assert "The ranker trained on 2 of these queries." in (tmp_path / "e" / "report.md").read_text()
    assert run(None, split="all")["ranker_trained_queries"] is None
    # a re-saved ranker keeps the record
    run(["q1", "q2", "q3"], split="all")
    CrossEncoder.from_pretrained(ranker, device="cpu").save(tmp_path / "resaved")
    with pytest.raises(ValueError, match="trained on 1 of the 1 validation queries"):
        evaluate_summaries(tmp_path / "e", ranker=str(tmp_path / "resaved"), data=str(data_dir),
                           summaries={"hand": str(hand)}, val_fraction=0.34, device="cpu", plot=False)
    (ranker / "relsum_ranker.json").write_text(json.dumps({"train_queries": ["q1"]}))
    with pytest.raises(ValueError, match="train_queries is not an object of query id: text"):
        evaluate_summaries(tmp_path / "e", ranker=str(ranker), data=str(data_dir),
                           summaries={"hand": str(hand)}, device="cpu", plot=False)
    (ranker / "relsum_ranker.json").write_text("{not json")
    with pytest.raises(ValueError, match="relsum_ranker.json: not valid JSON"):
        evaluate_summaries(tmp_path / "e", ranker=str(ranker), data=str(data_dir),
                           summaries={"hand": str(hand)}, device="cpu", plot=False)


def test_titles_are_cut_to_the_title_budget_the_ranker_trained_with(tmp_path, tiny_ranker_dir, monkeypatch):
    from relsum_core.text import TITLE_TOKENS

    long_title = " ".join(f"word{i}" for i in range(100))
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"product_id": p, "title": long_title if p == "p1" else t, "bullet_points": b}
            for p, t, b in PRODUCTS]
    (d / "products.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "judgments.csv").write_text("query_id,query,product_id,grade\n"
                                     + "".join(f"{q},{t},{p},{g}\n" for q, t, p, g in JUDGMENTS))
    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"product_id": p, "summary": "note"}) + "\n" for p, _, _ in PRODUCTS))
    scored = []
    score = Evaluation.score
    monkeypatch.setattr(Evaluation, "score",
                        lambda self, texts: scored.append(dict(texts)) or score(self, texts))
    evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(d),
                       summaries={"hand": str(hand)}, split="all", device="cpu", plot=False, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_ranker_dir)
    title, with_summary = scored[0]["p1"], scored[-1]["p1"]
    assert long_title.startswith(title)
    assert len(tok(title, add_special_tokens=False)["input_ids"]) == TITLE_TOKENS
    assert with_summary == f"{title} | note"


def test_refuses_to_validate_on_products_the_policy_trained_on(tmp_path, data_dir, tiny_ranker_dir):
    """A summarizer rewarded on a product must not be scored on it: evaluate reads the policy's
    relsum_policy.json, for --policy folders and for summaries files via their .settings.json."""
    import shutil

    from relsum_core.policy import TRAINING_RECORD

    val = split_queries(["q1", "q2", "q3"], 0.34, 0)[1]
    by_query = {}
    for q, _, p, _ in JUDGMENTS:
        by_query.setdefault(q, []).append(p)
    titles = {p: t for p, t, _ in PRODUCTS}
    ranker = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker)
    (ranker / "relsum_ranker.json").write_text(json.dumps({"train_queries": {}}))
    policy = tmp_path / "policy"
    policy.mkdir()
    hand = tmp_path / "hand.jsonl"
    hand.write_text("".join(json.dumps({"product_id": p, "summary": b}) + "\n" for p, _, b in PRODUCTS))

    def run(trained_products, split="validation", settings=True):
        if trained_products is None:
            (policy / TRAINING_RECORD).unlink(missing_ok=True)
        else:
            record = {"train_products": {p: titles.get(p, "another product") for p in trained_products}}
            (policy / TRAINING_RECORD).write_text(json.dumps(record))
        record = hand.with_name(hand.name + ".settings.json")
        record.unlink(missing_ok=True)
        if settings:
            record.write_text(json.dumps({"policy": str(policy)}))
        return evaluate_summaries(tmp_path / "e", ranker=str(ranker), data=str(data_dir),
                                  summaries={"hand": str(hand)}, split=split, val_fraction=0.34,
                                  device="cpu", plot=False, progress=False)

    val_products = by_query[val[0]]
    with pytest.raises(ValueError, match="the policy behind 'hand' trained on 2 of the 2 validation"):
        run(["p1", "p2", "p3", "p4", "p5", "p6"])
    report = run([p for q in by_query if q not in val for p in by_query[q]])  # the split it trained with
    assert report["n_queries"] == 1 and report["policy_trained_products"] == {"hand": 0}
    # no record (a hand-written file, or a policy folder not from `relsum train`): not known, and said
    with pytest.warns(UserWarning, match="no policy training record .* for hand"):
        assert run(None)["policy_trained_products"] == {"hand": None}
    assert "`hand` has no policy training record" in (tmp_path / "e" / "report.md").read_text()
    # the packaged default trained on nothing; a corrupt or dangling record is not known
    settings = hand.with_name(hand.name + ".settings.json")
    gone = json.dumps({"policy": str(tmp_path / "gone")})
    cases = (('{"policy": "default"}', 0), ("{cut", None), (gone, None))
    for written, want in cases:
        settings.write_text(written)
        report = evaluate_summaries(tmp_path / "e", ranker=str(ranker), data=str(data_dir),
                                    summaries={"hand": str(hand)}, split="all", device="cpu", plot=False,
                                    progress=False)
        assert report["policy_trained_products"] == {"hand": want}, written
        assert "trained on 0" not in (tmp_path / "e" / "report.md").read_text()
    assert run(["p1"], settings=False)["policy_trained_products"] == {"hand": None}
    # another catalog's coinciding ids are other products
    (policy / TRAINING_RECORD).write_text(json.dumps({"train_products": {p: "x" for p in titles}}))
    hand.with_name(hand.name + ".settings.json").write_text(json.dumps({"policy": str(policy)}))
    report = evaluate_summaries(tmp_path / "e", ranker=str(ranker), data=str(data_dir),
                                summaries={"hand": str(hand)}, val_fraction=0.34, device="cpu", plot=False)
    assert report["policy_trained_products"] == {"hand": 0}
    # heldout: the queries none of whose products the policy trained on
    report = run(val_products + by_query["q1" if val[0] != "q1" else "q2"], split="heldout")
    assert report["n_queries"] == 1
    with pytest.raises(ValueError, match="none is held out"):
        run(list(titles), split="heldout")
    # every query, knowingly: the count is reported
    report = run(["p1", "p2", "p3"], split="all")
    assert report["n_queries"] == 3 and report["policy_trained_products"] == {"hand": 3}
    assert "behind `hand` trained on 3 of these products." in (tmp_path / "e/report.md").read_text()
    # --policy folders are checked the same way, before any summarising
    def run_policy():
        return evaluate_summaries(tmp_path / "e2", ranker=str(ranker), data=str(data_dir),
                                  policies={"mine": str(policy)}, val_fraction=0.34, device="cpu", plot=False,
                                  progress=False)

    (policy / TRAINING_RECORD).write_text(json.dumps({"train_products": titles}))
    with pytest.raises(ValueError, match="the policy behind 'mine' trained on 2 of the 2 validation"):
        run_policy()
    (policy / TRAINING_RECORD).write_text(json.dumps({"train_products": ["p1"]}))
    with pytest.raises(ValueError, match="needs train_products, an object of product id: title"):
        run_policy()


def test_validation_keeps_one_query_text_under_two_ids_together(tmp_path, tiny_ranker_dir, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "products.jsonl", "w") as f:
        for pid, title, bullets in PRODUCTS:
            f.write(json.dumps({"product_id": pid, "title": title, "bullet_points": bullets}) + "\n")
    rows = JUDGMENTS + [(f"x{i}", "Red  Shirt", "p2", 3) for i in range(1)] + [
        (f"z{i}", f"query {i}", "p3", 1) for i in range(6)]
    (d / "judgments.csv").write_text("query_id,query,product_id,grade\n"
                                     + "".join(f"{q},{t},{p},{g}\n" for q, t, p, g in rows))
    seen = []
    score = Evaluation.score

    def recording_score(self, texts):
        seen.append(set(self.queries))
        return score(self, texts)

    monkeypatch.setattr(Evaluation, "score", recording_score)
    together = 0
    for seed in (0, 1, 11):  # 11 validates the pair
        seen.clear()
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(d), split_seed=seed,
                           val_fraction=0.3, desc_tokens=(2,), device="cpu", plot=False, progress=False)
        assert ("q1" in seen[0]) == ("x0" in seen[0])
        together += "q1" in seen[0]
    assert together == 1


def test_sharded_summaries_read_as_their_unsharded_name(tmp_path, data_dir, tiny_policy_dir,
                                                        tiny_ranker_dir):
    """What `relsum summarize --num-shards N` (or torchrun) writes reads back under the --out it was
    given, in evaluate too; an incomplete or mixed set of shards is named."""
    import json

    from relsum_core.evaluate import _policy_record
    from relsum_core.summarize import summarize_catalog

    out = tmp_path / "s.jsonl"
    kw = dict(policy=str(tiny_policy_dir), catalog=str(data_dir), budget=4, progress=False, num_shards=2)
    for shard in (0, 1):
        summarize_catalog(out, shard=shard, **kw)
    assert not out.exists() and sorted(read_summaries(out)) == sorted(p for p, _, _ in PRODUCTS)
    report = evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(data_dir),
                                summaries={"s": str(out)}, split="all", device="cpu", plot=False,
                                progress=False)
    assert "title+s" in report["variants"]
    records = [tmp_path / f"s.shard00{k}-of-002.jsonl.settings.json" for k in (0, 1)]
    for r in records:  # as if the packaged policy wrote both shards: its (empty) training record
        r.write_text(json.dumps(json.loads(r.read_text()) | {"policy": "default"}))
    assert _policy_record(out) == {}
    records[1].write_text(json.dumps(json.loads(records[1].read_text()) | {"policy": str(tiny_policy_dir)}))
    with pytest.raises(ValueError, match="the shards of .*s.jsonl were written by different policies"):
        _policy_record(out)
    (tmp_path / "s.shard001-of-002.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"of its 2 shards 1 are missing, e.g. \['s.shard001-of-002"):
        read_summaries(out)
    with pytest.raises(FileNotFoundError, match=r"summaries 's': .*of its 2 shards 1 are missing"):
        evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(data_dir),
                           summaries={"s": str(out)}, split="all", device="cpu", plot=False, progress=False)
    summarize_catalog(out, shard=0, **{**kw, "num_shards": 3})
    with pytest.raises(FileNotFoundError, match=r"shard files come from runs of \[2, 3\] shards"):
        read_summaries(out)


def test_a_policy_evaluated_under_other_budgets_than_it_trained_with_is_warned(tmp_path, data_dir,
                                                                               tiny_ranker_dir):
    from relsum_core.policy import TRAINING_RECORD, PolicyLoadError

    policy = tmp_path / "policy"  # only its record: the warning comes before any summarising
    policy.mkdir()
    (policy / TRAINING_RECORD).write_text(json.dumps({"train_products": {}, "budget": 8,
                                                      "max_product_tokens": 32}))
    for kind in ("policies", "doc2query"):
        with pytest.warns(UserWarning, match=r"policy 'mine' was trained with budget 8, max_product_tokens "
                                             r"32; it is evaluated with budget 32, max_product_tokens 128"):
            with pytest.raises(PolicyLoadError, match="no HF model folder"):
                evaluate_summaries(tmp_path / "e", ranker=str(tiny_ranker_dir), data=str(data_dir),
                                   **{kind: {"mine": str(policy)}}, val_fraction=0.34, device="cpu",
                                   plot=False, progress=False)


def test_parse_named_splits_at_the_first_equals_sign():
    assert parse_named(["a=runs/lr=1e-5/s.jsonl"], "--summaries") == {"a": "runs/lr=1e-5/s.jsonl"}


def test_read_summaries_rows_need_an_id_and_a_summary_or_skipped(tmp_path):
    path = tmp_path / "s.jsonl"
    for row, why in (({"summary": "x"}, "a row needs a string 'product_id'"),
                     ({"product_id": 7, "summary": "x"}, "a row needs a string 'product_id'"),
                     (["p1", "x"], "a row needs a string 'product_id'"),
                     ({"product_id": "p1"}, "a row needs a string 'summary'")):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=rf"s.jsonl:1: {why}"):
            read_summaries(path)


def test_metrics_skip_queries_whose_metric_is_undefined():
    # q1 has no relevant product (NDCG undefined) and no E pair (no recall): resamples of q1 alone
    # are skipped, so the means and intervals stay finite
    js = [Judgment("q1", "x", "a", 0), Judgment("q1", "x", "b", 0),
          Judgment("q2", "y", "c", 3), Judgment("q2", "y", "d", 0)]
    ev = Evaluation(lambda pairs: np.zeros(len(pairs)), js, queries=["q1", "q2"])
    assert any((r == 0).all() for r in ev.resamples)  # the seed draws q1 alone at least once
    s = np.array([0.5, 0.4, 1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN resamples, which are skipped
        m = ev.metrics(s, np.array([0.5, 0.4, 0.0, 1.0]))
    assert m["ndcg@10"] == pytest.approx(1.0)  # the mean of the defined query
    for key in ("ndcg@5", "ndcg@10", "ndcg@10_delta", "recall@p90"):
        assert math.isfinite(m[f"{key}_lo"]) and math.isfinite(m[f"{key}_hi"]), key


def test_resamples_are_seeded_and_draw_every_query_count():
    js = [Judgment(q, text, p, g) for q, text, p, g in JUDGMENTS]
    a, b = (Evaluation(_overlap_scorer, js, queries=["q1", "q2", "q3"], seed=0) for _ in range(2))
    c = Evaluation(_overlap_scorer, js, queries=["q1", "q2", "q3"], seed=1)
    assert a.resamples.shape == (N_BOOTSTRAP, 3)  # a bootstrap resample is as large as the sample
    assert (a.resamples == b.resamples).all() and not (a.resamples == c.resamples).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # no E pair: recall is NaN
def test_a_query_graded_only_complement_is_evaluable():
    # C (grade 1) still has a positive ESCI gain: NDCG is defined
    judged = [Judgment("q", "x", "p1", 1), Judgment("q", "x", "p2", 0)]
    ev = Evaluation(_overlap_scorer, judged, queries=["q"])
    assert ev.metrics(np.array([1.0, 0.0]))["ndcg@10"] == pytest.approx(1.0)


def test_queries_in_any_order_slice_their_own_pairs():
    js = [Judgment("q1", "x", "a", 3), Judgment("q2", "y", "b", 0), Judgment("q2", "y", "c", 3),
          Judgment("q2", "y", "d", 0)]
    ev = Evaluation(lambda pairs: np.zeros(len(pairs)), js, queries=["q2", "q1"])
    assert [j.query_id for j in ev.pairs] == ["q2", "q2", "q2", "q1"]
    assert [ev.grades[s].tolist() for s in ev.slices] == [[0, 3, 0], [3]]


def test_markdown_report_table():
    m = {"ndcg@5": 0.5, "ndcg@5_lo": 0.4, "ndcg@5_hi": 0.6, "ndcg@10": 0.55, "ndcg@10_lo": 0.45,
         "ndcg@10_hi": 0.65, "recall@p90": 0.2, "recall@p90_lo": 0.1, "recall@p90_hi": 0.3,
         "mean_doc_tokens": 12.0}
    report = {"ranker": "r", "n_queries": 3, "split": "all", "n_pairs": 6, "n_products": 6,
              "ranker_trained_queries": 0, "policy_trained_products": {"a": 0, "b": None, "c": 2},
              "variants": {"title": m, "title+a": {**m, "ndcg@10_delta": 0.01, "ndcg@10_delta_lo": -0.02,
                                                    "ndcg@10_delta_hi": 0.03, "mean_words": 7.25}}}
    text = _markdown(report)
    assert text.endswith("|\n")
    assert "ranker trained on" not in text  # 0 queries: nothing to say
    assert "`a`" not in text and "`b` has no policy training record" in text
    assert "The policy behind `c` trained on 2 of these products." in text
    rows = text.splitlines()[-2:]
    assert rows[0] == ("| title | 0.5000 [0.400, 0.600] | 0.5500 [0.450, 0.650] |  | 0.200 [0.100, 0.300] "
                       "|  | 12.0 |")
    assert rows[1] == ("| title+a | 0.5000 [0.400, 0.600] | 0.5500 [0.450, 0.650] "
                       "| +0.0100 [-0.0200, +0.0300] | 0.200 [0.100, 0.300] | 7.2 | 12.0 |")
    assert "The ranker trained on 2 of these queries." in _markdown({**report, "ranker_trained_queries": 2})
