import json
import math
from dataclasses import replace

import pytest

from relsum_core.cli import main
from relsum_core.data import fold_queries, group_by_query, load_dataset
from relsum_core.trainers.ranker import RankerTrainConfig, default_base
from relsum_core.trainers.ranker_cv import RANKER, _changed_settings, pool_folds


def _args(base, out, *extra):
    return ["train-ranker", "--base", str(base), "--out", str(out), "--max-queries", "6", "--folds", "3",
            "--epochs", "1", "--batch-size", "2", "--group-size", "4", "--max-attr-tokens", "16",
            "--max-length", "64", "--no-progress", "--pseudo-steps", "0", *extra]


def test_cross_validation_pools_every_query_and_resumes(tmp_path, tiny_base, capsys):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_base, tmp_path / "base")  # its own copy: rewritten below
    tiny_base = tmp_path / "base"
    out = tmp_path / "cv"
    assert main(_args(tiny_base, out)) == 0
    printed = capsys.readouterr().out
    assert "3-fold cross-validation" in printed and printed.count("training into") == 3

    first6 = list(group_by_query(load_dataset()[1]))[:6]
    report = json.loads((out / "cv_report.json").read_text())
    assert report["folds"] == 3 and len(report["fold_rows"]) == 3
    for i in range(3):
        fold = json.loads((out / f"fold{i}" / "report.json").read_text())
        assert fold["split"]["val_query_ids"] == fold_queries(first6, 3, i)[1]
    table = report["table"]
    assert table[RANKER]["n_queries"] == 6 == table["BM25 (bm25s)"]["n_queries"]
    for scorer in ("BM25 (bm25s)", "untuned encoder cosine"):
        for variant in ("title", "title+64"):
            d = report["paired_ndcg@10"][scorer][variant]
            assert d["wins"] + d["ties"] + d["losses"] == d["n"]
            if d["n"] == 6:  # every query defined: the paired mean is the difference of pooled means
                want = table[RANKER][f"{variant}/ndcg@10"] - table[scorer][f"{variant}/ndcg@10"]
                assert d["mean"] == pytest.approx(want, abs=1e-12)
    assert "| fold | queries | kept step |" in (out / "cv_report.md").read_text()

    for i in range(3):  # each fold's ranker records what it trained on, for `relsum evaluate`
        settings = json.loads((out / f"fold{i}" / "best" / "relsum_ranker.json").read_text())
        assert sorted(settings["train_queries"]) == sorted(fold_queries(first6, 3, i)[0])

    # A second run with the same settings reuses every fold instead of training again, also one
    # whose report holds an undefined NDCG (a query with no relevant product), which strict JSON
    # writes as null.
    fold1 = json.loads((out / "fold1" / "report.json").read_text())
    undefined = fold1["split"]["val_query_ids"][0]
    fold1["per_query_ndcg"][RANKER]["title+64/ndcg@10"][undefined] = None
    (out / "fold1" / "report.json").write_text(json.dumps(fold1))
    mtime = (out / "fold1" / "report.json").stat().st_mtime_ns
    assert main(_args(tiny_base, out)) == 0
    assert capsys.readouterr().out.count("reusing") == 3
    pooled = json.loads((out / "cv_report.json").read_text(), parse_constant=pytest.fail)
    assert pooled["table"][RANKER]["n_queries"] == 5  # the undefined one is left out, not a crash
    assert (out / "fold1" / "report.json").stat().st_mtime_ns == mtime
    # Other settings (here a step limit) are neither reused nor silently trained over ...
    with pytest.raises(SystemExit) as e:
        main(_args(tiny_base, out, "--max-steps", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "fold trained with other settings (max_steps None -> 1)" in err
    assert (out / "fold1" / "report.json").stat().st_mtime_ns == mtime
    # ... nor data that changed under the same query ids (an edited grade, a product's text) ...
    fold1 = json.loads((out / "fold1" / "report.json").read_text())
    digest = fold1["split"]["data_digest"]
    edited = fold1 | {"split": fold1["split"] | {"data_digest": "0"}}
    (out / "fold1" / "report.json").write_text(json.dumps(edited))
    with pytest.raises(SystemExit) as e:
        main(_args(tiny_base, out))
    assert e.value.code == 2 and "other data (judgments or product texts)" in capsys.readouterr().err
    # (a report from before the digest is reused as it was)
    del fold1["split"]["data_digest"]
    (out / "fold1" / "report.json").write_text(json.dumps(fold1))
    assert main(_args(tiny_base, out)) == 0 and capsys.readouterr().out.count("reusing") == 3
    assert len(digest) == 64
    # ... nor a base rewritten in place since; the same base under another path is reused (a report
    # recording its sources and digest: a legacy one compares the path strings)
    fold1["split"]["data_digest"] = digest
    (out / "fold1" / "report.json").write_text(json.dumps(fold1))
    (tmp_path / "link").symlink_to(tiny_base)
    assert main(_args(tmp_path / "link", out)) == 0 and capsys.readouterr().out.count("reusing") == 3
    weights = next(tiny_base.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert main(_args(tiny_base, out)) == 0 and capsys.readouterr().out.count("reusing") == 3  # same bytes
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] + 0.5}, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        main(_args(tiny_base, out))
    assert e.value.code == 2 and "other base weights (rewritten since, or another checkpoint)" in (
        capsys.readouterr().err)
    # ... unless asked: then every fold is trained again
    assert main(_args(tiny_base, out, "--max-steps", "1", "--overwrite")) == 0
    assert capsys.readouterr().out.count("training into") == 3


def test_saved_fold_is_reused_only_with_the_same_settings():
    cfg = RankerTrainConfig(out="x", folds=3, fold=1, epochs=2)
    # as train_ranker records it: base, cosine base and learning rates resolved
    saved = vars(cfg) | {"out": "elsewhere", "progress": False, "base": default_base(),
                         "cosine_base": default_base(), "lr": 2e-5, "head_lr": 1e-4, "device": "cpu"}
    assert not _changed_settings(saved, cfg)  # out/progress ignored; None = what the run resolved
    assert _changed_settings(saved | {"epochs": 3}, cfg)
    assert _changed_settings(saved | {"fold": 2}, cfg)
    # None means no limit / the bundled data, not "whatever the saved run used"
    for smoke in ({"max_steps": 1}, {"max_queries": 6}, {"eval_every": 5}, {"data": "/other/data"},
                  {"base": "/custom/bert"}, {"lr": 5e-5}):
        assert _changed_settings(saved | smoke, cfg), smoke
    assert _changed_settings(saved, replace(cfg, lr=5e-5))
    assert _changed_settings(saved, replace(cfg, seed=1))  # another draw of data order and heads
    # A setting the saved report lacks was added later: it matches only at its default.
    older = {k: v for k, v in saved.items() if k != "warmup"}
    assert not _changed_settings(older, cfg)
    assert _changed_settings(older, replace(cfg, warmup="cosine"))


def _fake(fold, values):
    per_query = {f"{v}/ndcg@{k}": dict(values) for v in ("title", "title+64") for k in (5, 10)}
    row = {f"{v}/ndcg@10": 0.5 for v in ("title", "title+64")}
    bm25 = {m: {q: 0.5 for q in d} for m, d in per_query.items()}
    return {"split": {"fold": fold, "val_queries": len(values)}, "best": {"step": 1}, "steps": 2,
            "table": {RANKER: row, "BM25": row}, "per_query_ndcg": {RANKER: per_query, "BM25": bm25}}


def test_pool_folds_by_hand_and_rejects_overlap():
    pooled = pool_folds([_fake(0, {"a": 0.9, "b": math.nan}), _fake(1, {"c": 0.3})])
    assert pooled["table"][RANKER]["title/ndcg@10"] == pytest.approx(0.6)  # NaN skipped
    assert pooled["table"][RANKER]["n_queries"] == 2 and pooled["table"]["BM25"]["n_queries"] == 3
    d = pooled["paired_ndcg@10"]["BM25"]["title+64"]
    assert (d["n"], d["wins"], d["losses"]) == (2, 1, 1) and d["mean"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="overlap"):
        pool_folds([_fake(0, {"a": 0.9}), _fake(1, {"a": 0.3})])


@pytest.mark.parametrize("folds, message", [("1", "folds must be >= 2"),
                                            ("9", "at least 9 distinct queries")])
def test_bad_folds_are_a_clear_error(tmp_path, tiny_base, capsys, folds, message):
    args = _args(tiny_base, tmp_path / "cv")
    args[args.index("--folds") + 1] = folds
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cv" / "cv_report.json").exists()


def test_fold_rows_name_the_kept_step():
    per_query = {f"{v}/ndcg@{k}": {"a": 0.5} for v in ("title", "title+64") for k in (5, 10)}
    report = {"split": {"fold": 0, "val_queries": 1}, "best": {"step": 1}, "steps": 2,
              "table": {RANKER: {"title+64/ndcg@10": 0.5}}, "per_query_ndcg": {RANKER: per_query}}
    row = pool_folds([report])["fold_rows"][0]
    assert (row["kept_step"], row["steps"]) == (1, 2)


def test_data_digest_follows_grades_and_product_texts_not_order():
    from dataclasses import replace as swap

    from relsum_core.data import Judgment, Product, data_digest

    catalog = {"a": Product("a", "red shirt", "cotton"), "b": Product("b", "blue towel")}
    by_query = {"q1": [Judgment("q1", "shirt", "a", 3), Judgment("q1", "shirt", "b", 0)]}
    digest = data_digest(by_query, catalog, ["q1"])
    assert data_digest({"q1": by_query["q1"][::-1]}, catalog, ["q1"]) == digest  # order does not matter
    regraded = {"q1": [swap(by_query["q1"][0], grade=2), by_query["q1"][1]]}
    assert data_digest(regraded, catalog, ["q1"]) != digest
    assert data_digest(by_query, catalog | {"a": Product("a", "red shirt", "linen")}, ["q1"]) != digest


def test_data_digest_ignores_the_order_of_query_ids():
    from relsum_core.data import Judgment, Product, data_digest

    catalog = {"a": Product("a", "red shirt"), "b": Product("b", "blue towel")}
    by_query = {"q1": [Judgment("q1", "shirt", "a", 3)], "q2": [Judgment("q2", "towel", "b", 3)]}
    assert data_digest(by_query, catalog, ["q1", "q2"]) == data_digest(by_query, catalog, ["q2", "q1"])
