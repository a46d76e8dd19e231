import json

import pytest

from relsum_core.summarize import shard_path, summarize_catalog, summary_files

# U+2028 and U+0085 stay raw in the output (ensure_ascii=False) and are line breaks to str.splitlines()
TITLES = ["red cotton shirt", "blue\u2028shirt", "steel water bottle", "dog\x85food", "kids bottle"]


@pytest.fixture()
def catalog(tmp_path):
    path = tmp_path / "products.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(TITLES):
            f.write(json.dumps({"product_id": f"p{i}", "title": t, "bullet_points": "pack of two"}) + "\n")
    return path


def _rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x]


def test_summarize_writes_every_product_once_and_resumes(tmp_path, catalog, tiny_policy_dir):
    out = tmp_path / "out" / "summaries.jsonl"
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), budget=4, batch_size=2, progress=False)
    summarize_catalog(out, **kw)
    rows = _rows(out)
    assert sorted(r["product_id"] for r in rows) == [f"p{i}" for i in range(5)]
    assert all(0 < r["tokens"] <= 4 and isinstance(r["summary"], str) for r in rows)
    # a crash mid-write: two whole lines and half of the third survive
    text = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(text[:2]) + b"\n" + text[2][:7])
    summarize_catalog(out, **kw)
    again = _rows(out)
    assert sorted(r["product_id"] for r in again) == [f"p{i}" for i in range(5)]
    assert again[:2] == rows[:2]  # what was written stays
    # greedy: the resumed rows equal the first run's
    assert {r["product_id"]: r["summary"] for r in again} == {r["product_id"]: r["summary"] for r in rows}


def test_shards_partition_the_catalog(tmp_path, catalog, tiny_policy_dir):
    out = tmp_path / "s.jsonl"
    ids = []
    for k in range(2):
        p = summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), budget=3, shard=k,
                              num_shards=2, progress=False)
        assert p == shard_path(out, k, 2) and p.name == f"s.shard{k:03d}-of-002.jsonl"
        ids += [r["product_id"] for r in _rows(p)]
    assert sorted(ids) == [f"p{i}" for i in range(5)]


def test_bad_arguments(tmp_path, catalog):
    with pytest.raises(ValueError, match="shard"):
        summarize_catalog(tmp_path / "x.jsonl", catalog=str(catalog), shard=2, num_shards=2)
    with pytest.raises(ValueError, match="budget"):
        summarize_catalog(tmp_path / "x.jsonl", catalog=str(catalog), budget=0)
    with pytest.raises(ValueError, match="max_product_tokens must be >= 1"):
        summarize_catalog(tmp_path / "x.jsonl", catalog=str(catalog), max_product_tokens=-1)
    assert not (tmp_path / "x.jsonl").exists()


def test_sampled_summaries_survive_a_resume_and_sharding(tmp_path, catalog, tiny_policy_dir):
    # Each product draws with its own seed, so where a run stopped or which shard took a product
    # does not change its summary.
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), budget=4, batch_size=2, temperature=1.0,
              seed=5, progress=False)
    whole = {r["product_id"]: r["summary"] for r in _rows(summarize_catalog(tmp_path / "a.jsonl", **kw))}
    resumed = tmp_path / "b.jsonl"
    summarize_catalog(resumed, product_ids=["p3", "p1"], **kw)  # a run that stopped early
    summarize_catalog(resumed, **kw)
    assert {r["product_id"]: r["summary"] for r in _rows(resumed)} == whole
    shards = {}
    for k in range(2):
        shards.update({r["product_id"]: r["summary"]
                       for r in _rows(summarize_catalog(tmp_path / "c.jsonl", shard=k, num_shards=2, **kw))})
    assert shards == whole


def test_other_settings_or_another_file_are_refused_not_appended(tmp_path, catalog, tiny_policy_dir):
    out = tmp_path / "s.jsonl"
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), progress=False)
    summarize_catalog(out, budget=4, product_ids=["p0"], **kw)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"other settings \(budget 4 -> 3\)"):
        summarize_catalog(out, budget=3, **kw)
    with pytest.raises(ValueError, match="other settings .*task 'summary' -> 'doc2query'"):
        summarize_catalog(out, budget=4, task="doc2query", **kw)
    assert out.read_bytes() == before
    # a file with no settings record: not adopted, and nothing cut from it (here the catalog itself,
    # whose rows even have a product_id and whose last line is unterminated)
    text = catalog.read_text().rstrip("\n")
    catalog.write_text(text)
    with pytest.raises(ValueError, match=r"holds lines but no products.jsonl.settings.json"):
        summarize_catalog(catalog, budget=4, **kw)
    assert catalog.read_text() == text and not (tmp_path / "products.jsonl.settings.json").exists()
    # shards merged with cat: no record either
    merged = tmp_path / "merged.jsonl"
    merged.write_bytes(before + before)
    with pytest.raises(ValueError, match="holds lines but no merged.jsonl.settings.json"):
        summarize_catalog(merged, budget=4, **kw)
    # a record beside lines that are not summaries (a product_id alone is not enough)
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"product_id": "p1", "title": "x"}\n{"a": 2, "note": "precious"}')
    (tmp_path / "notes.jsonl.settings.json").write_text((tmp_path / "s.jsonl.settings.json").read_text())
    with pytest.raises(ValueError, match=f"{notes}:1: not a summaries row"):
        summarize_catalog(notes, budget=4, **kw)
    assert notes.read_text() == '{"product_id": "p1", "title": "x"}\n{"a": 2, "note": "precious"}'
    # a refused run cuts nothing either: a partial last line stays until a run that may append
    out.write_bytes(before + b'{"product_id": "p')
    with pytest.raises(ValueError, match="other settings"):
        summarize_catalog(out, budget=3, **kw)
    assert out.read_bytes() == before + b'{"product_id": "p'
    # the catalog's texts edited in place: another catalog, refused
    catalog.write_text(text.replace("pack of two", "pack of three"))
    with pytest.raises(ValueError, match=r"written from the catalog at .*products.jsonl before its product "
                                         "ids or texts changed"):
        summarize_catalog(out, budget=4, **kw)


def test_a_shard_with_nothing_to_do_still_has_its_file_and_a_bad_record_is_named(tmp_path, catalog,
                                                                                   tiny_policy_dir):
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), progress=False, budget=4)
    out = summarize_catalog(tmp_path / "none.jsonl", product_ids=[], **kw)
    assert out.is_file() and out.read_text() == ""  # the CLI prints this path
    summarize_catalog(tmp_path / "none.jsonl", product_ids=[], **{**kw, "budget": 3})  # empty: any settings
    record = tmp_path / "none.jsonl.settings.json"
    record.write_text("{cut")
    with pytest.raises(ValueError, match=r"none.jsonl.settings.json: not valid JSON .*delete it"):
        summarize_catalog(tmp_path / "none.jsonl", product_ids=[], **kw)
    record.write_text("[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        summarize_catalog(tmp_path / "none.jsonl", product_ids=[], **kw)


def test_summaries_of_rewritten_policy_weights_are_not_resumed(tmp_path, catalog, tiny_policy_dir):
    """A training run rewrites its checkpoint in place: the old weights' summaries must not pass for
    the new policy's."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, policy)
    out = tmp_path / "s.jsonl"
    kw = dict(policy=str(policy), catalog=str(catalog), budget=4, progress=False)
    summarize_catalog(out, product_ids=["p0"], **kw)
    # the same weights saved again, or the folder copied away and back (new file times): the same policy
    AutoModelForCausalLM.from_pretrained(policy).save_pretrained(policy)
    shutil.copytree(policy, tmp_path / "copy", copy_function=shutil.copy)
    shutil.rmtree(policy)
    (tmp_path / "copy").rename(policy)
    summarize_catalog(out, product_ids=["p1"], **kw)
    assert [r["product_id"] for r in _rows(out)] == ["p0", "p1"]
    # under another path: refused (its prompt files are not compared, and evaluate reads the path)
    shutil.copytree(policy, tmp_path / "moved")
    moved = {**kw, "policy": str(tmp_path / "moved")}
    with pytest.raises(ValueError, match=r"other settings \(policy "):
        summarize_catalog(out, **moved)
    # trained since: other weights, refused
    model = AutoModelForCausalLM.from_pretrained(policy)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(policy)
    with pytest.raises(ValueError, match=r"written by the policy at .*policy before its weights changed"):
        summarize_catalog(out, **kw)
    # a record from before the weights were recorded resumes as it did
    record = tmp_path / "s.jsonl.settings.json"
    settings = json.loads(record.read_text())
    del settings["policy_weights"]
    record.write_text(json.dumps(settings))
    summarize_catalog(out, **kw)
    assert len(_rows(out)) == 5


def test_deleting_the_summaries_lets_other_settings_start_again(tmp_path, catalog, tiny_policy_dir):
    import json

    out = tmp_path / "s.jsonl"
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), progress=False, product_ids=["p0"])
    summarize_catalog(out, budget=4, **kw)
    out.unlink()  # what the refusal tells the user to do
    summarize_catalog(out, budget=3, **kw)
    assert json.loads((tmp_path / "s.jsonl.settings.json").read_text())["budget"] == 3


def test_a_missing_policy_folder_is_named_and_leaves_no_file(tmp_path, catalog):
    from relsum_core.policy import PolicyLoadError

    out = tmp_path / "out" / "s.jsonl"
    with pytest.raises(PolicyLoadError, match=r"no HF model folder at .*nope \(config.json missing\)"):
        summarize_catalog(out, policy=str(tmp_path / "nope"), catalog=str(catalog), progress=False)
    assert not (tmp_path / "out").exists()  # no settings record to refuse the corrected command


def test_max_products_summarises_a_prefix_and_a_larger_one_appends(tmp_path, catalog, tiny_policy_dir):
    from relsum_core.cli import main

    out = tmp_path / "s.jsonl"
    args = ["summarize", "--policy", str(tiny_policy_dir), "--catalog", str(catalog), "--out", str(out),
            "--budget", "4", "--no-progress"]
    assert main([*args, "--max-products", "2"]) == 0
    assert [r["product_id"] for r in _rows(out)] == ["p0", "p1"]
    assert main([*args, "--max-products", "3"]) == 0  # the same settings: a resume, one more product
    assert [r["product_id"] for r in _rows(out)] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError, match="max_products must be >= 1"):
        summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), budget=4, max_products=0)


def test_summarize_defaults_to_the_budgets_the_policy_trained_with(tmp_path, catalog, tiny_policy_dir,
                                                                   capsys):
    import shutil

    from relsum_core.cli import main
    from relsum_core.policy import TRAINING_RECORD

    policy = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, policy)
    (policy / TRAINING_RECORD).write_text(json.dumps({"train_products": {}, "budget": 3,
                                                      "max_product_tokens": 16}))
    out = tmp_path / "s.jsonl"
    args = ["summarize", "--policy", str(policy), "--catalog", str(catalog), "--out", str(out),
            "--max-products", "2", "--no-progress"]
    assert main(args) == 0
    assert "budget 3: the policy's training value" in capsys.readouterr().out
    settings = json.loads((tmp_path / "s.jsonl.settings.json").read_text())
    assert (settings["budget"], settings["max_product_tokens"]) == (3, 16)
    assert all(r["tokens"] <= 3 for r in _rows(out))
    with pytest.raises(ValueError, match=r"other settings \(budget 3 -> 5\)"):  # given: it wins
        summarize_catalog(out, policy=str(policy), catalog=str(catalog), budget=5, max_product_tokens=16,
                          progress=False)


def test_max_products_is_a_prefix_of_the_whole_catalog_across_shards(tmp_path, catalog, tiny_policy_dir):
    out = tmp_path / "s.jsonl"
    ids = []
    for k in range(2):
        p = summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), budget=3, shard=k,
                              num_shards=2, max_products=3, progress=False)
        ids += [r["product_id"] for r in _rows(p)]
    assert sorted(ids) == ["p0", "p1", "p2"]


def test_a_record_from_before_the_catalog_digest_still_resumes(tmp_path, catalog, tiny_policy_dir):
    out = tmp_path / "s.jsonl"
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), budget=3, progress=False)
    summarize_catalog(out, max_products=2, **kw)
    record = out.with_name(out.name + ".settings.json")
    saved = json.loads(record.read_text())
    del saved["catalog_digest"]  # what an earlier relsum wrote
    record.write_text(json.dumps(saved))
    summarize_catalog(out, **kw)
    assert len(_rows(out)) == 5


def test_summary_files_take_no_other_files_shards(tmp_path):
    """`s.shardtest.shard000-of-002.jsonl` are the shards of `s.shardtest.jsonl`, not of `s.jsonl`."""
    for k in (0, 1):
        shard_path(tmp_path / "s.shardtest.jsonl", k, 2).write_text("")
    with pytest.raises(FileNotFoundError, match=r"s.jsonl does not exist$"):
        summary_files(tmp_path / "s.jsonl")
    own = [shard_path(tmp_path / "s.jsonl", k, 3) for k in range(3)]
    for f in own:
        f.write_text("")
    assert summary_files(tmp_path / "s.jsonl") == own
    assert summary_files(tmp_path / "s.shardtest.jsonl") == [tmp_path / f"s.shardtest.shard00{k}-of-002.jsonl"
                                                             for k in (0, 1)]


# ---------------------------------------------------------------- from mutation testing
def _started(out, catalog, policy, **kw):
    """A summaries file and its settings record as a run with ``kw`` leaves them, without sampling:
    a run over no products writes the record, then one hand-written row stands for its output."""
    summarize_catalog(out, policy=str(policy), catalog=str(catalog), product_ids=[], progress=False, **kw)
    out.write_text(json.dumps({"product_id": "p0", "title": TITLES[0], "summary": "red"}) + "\n")


def test_bad_shard_batch_and_token_arguments_leave_no_file(tmp_path, catalog, tiny_policy_dir):
    # kills S26 (shard -1 took wanted[-1::n]), S27 (batch_size 0: range() fails after the record
    # and the model load), S28 (max_product_tokens 0)
    out = tmp_path / "x.jsonl"
    for bad, why in ((dict(shard=-1, num_shards=2), "shard"), (dict(batch_size=0), "batch_size must be >= 1"),
                     (dict(max_product_tokens=0), "max_product_tokens must be >= 1"),
                     (dict(shard=0, num_shards=0), "shard")):
        with pytest.raises(ValueError, match=why):
            summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), progress=False, **bad)
    assert list(tmp_path.iterdir()) == [catalog]


def test_torchrun_world_size_and_rank_pick_the_shard(tmp_path, catalog, tiny_policy_dir, monkeypatch):
    # kills S29/S30: the global WORLD_SIZE/RANK, not the node-local ones, pick the shard (2 nodes x 2)
    for k, v in dict(WORLD_SIZE="4", RANK="3", LOCAL_WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "s.jsonl"
    p = summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), product_ids=[],
                          progress=False, device="cpu")
    assert p == shard_path(out, 3, 4) and p.name == "s.shard003-of-004.jsonl" and p.is_file()


@pytest.mark.parametrize("change, why", [
    (dict(temperature=0.7), r"temperature 0\.0 -> 0\.7"), (dict(seed=1, temperature=1.0), r"seed 0 -> 1"),
    (dict(max_product_tokens=64), r"max_product_tokens 32 -> 64"),
    (dict(precision="bf16"), r"precision 'fp32' -> 'bf16'")])
def test_each_recorded_setting_is_checked_on_resume(tmp_path, catalog, tiny_policy_dir, change, why):
    # kills S35-S39 dropping a setting from the record (temperature, seed when sampling,
    # max_product_tokens, precision)
    out = tmp_path / "s.jsonl"
    base = dict(budget=4, temperature=1.0 if "seed" in change else 0.0, seed=0, max_product_tokens=32,
                precision="fp32")
    _started(out, catalog, tiny_policy_dir, **base)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=f"other settings \\(.*{why}"):
        summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), product_ids=["p0"],
                          progress=False, **{**base, **change})
    assert out.read_bytes() == before


def test_a_greedy_run_resumes_under_another_seed(tmp_path, catalog, tiny_policy_dir):
    # kills S35 (the seed recorded when greedy: the same greedy command with another --seed refused)
    out = tmp_path / "s.jsonl"
    _started(out, catalog, tiny_policy_dir, budget=4, seed=0)
    summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), product_ids=["p0"], budget=4,
                      seed=7, progress=False)
    assert json.loads((tmp_path / "s.jsonl.settings.json").read_text())["seed"] is None


def test_relative_and_absolute_paths_of_the_same_policy_and_catalog_resume(tmp_path, catalog,
                                                                           tiny_policy_dir, monkeypatch):
    # kills S40/S41: the record holds resolved paths, so the same command from another folder (or
    # with the absolute path) resumes, and a relative path means what it meant when it was written
    import os

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.jsonl"
    summarize_catalog(out, policy=os.path.relpath(tiny_policy_dir), catalog="products.jsonl",
                      product_ids=[], budget=4, progress=False)
    out.write_text(json.dumps({"product_id": "p0", "summary": "red"}) + "\n")
    summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), product_ids=["p0"], budget=4,
                      progress=False)
    settings = json.loads((tmp_path / "s.jsonl.settings.json").read_text())
    assert settings["policy"] == str(tiny_policy_dir.resolve())
    assert settings["catalog"] == str(catalog.resolve())


def test_resuming_from_an_old_record_does_not_rewrite_it(tmp_path, catalog, tiny_policy_dir):
    # kills S21: a record from before the weights were recorded must not gain them on a resume (the
    # rows written before are of unknown weights: the record is written only with a new file)
    out = tmp_path / "s.jsonl"
    _started(out, catalog, tiny_policy_dir, budget=4)
    record = tmp_path / "s.jsonl.settings.json"
    old = {k: v for k, v in json.loads(record.read_text()).items()
           if k not in ("policy_weights", "catalog_digest")}
    record.write_text(json.dumps(old))
    summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), product_ids=["p0"], budget=4,
                      progress=False)
    assert json.loads(record.read_text()) == old


def test_rows_need_a_string_product_id(tmp_path, catalog, tiny_policy_dir):
    # kills S12: {"product_id": 7, ...} is not a summaries row (evaluate refuses it too)
    out = tmp_path / "s.jsonl"
    _started(out, catalog, tiny_policy_dir, budget=4)
    out.write_text('{"product_id": 7, "summary": "x"}\n')
    with pytest.raises(ValueError, match=f"{out}:1: not a summaries row"):
        summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), product_ids=[], budget=4,
                          progress=False)
    assert out.read_text() == '{"product_id": 7, "summary": "x"}\n'


def test_summary_files_ignore_a_deleted_runs_leftover_records(tmp_path):
    # kills S05: the shards of a 3-shard run were deleted (as the refusal says) but their
    # .settings.json records stay; the new 2-shard run's files are the set
    for k in range(3):
        (tmp_path / f"s.shard{k:03d}-of-003.jsonl.settings.json").write_text("{}")
    own = [shard_path(tmp_path / "s.jsonl", k, 2) for k in range(2)]
    for f in own:
        f.write_text("")
    assert summary_files(tmp_path / "s.jsonl") == own


def test_summary_files_refuse_a_directory(tmp_path):
    # kills S04 (a folder passed for the file: read as one, IsADirectoryError deep in a reader)
    (tmp_path / "s.jsonl").mkdir()
    with pytest.raises(FileNotFoundError, match="s.jsonl does not exist"):
        summary_files(tmp_path / "s.jsonl")


def test_summary_files_of_a_name_with_glob_characters(tmp_path):
    # kills S08 (the stem used as a glob pattern: "[" is a character class there)
    own = [shard_path(tmp_path / "run[1].jsonl", k, 2) for k in range(2)]
    for f in own:
        f.write_text("")
    assert summary_files(tmp_path / "run[1].jsonl") == own


def test_repeated_product_ids_are_summarised_once(tmp_path, catalog, tiny_policy_dir):
    # kills S31/S32 (a product asked for twice was written twice)
    out = tmp_path / "s.jsonl"
    summarize_catalog(out, policy=str(tiny_policy_dir), catalog=str(catalog), product_ids=["p2", "p1", "p2"],
                      budget=2, progress=False)
    assert [r["product_id"] for r in _rows(out)] == ["p1", "p2"]  # id order, each once
    assert all("task" not in r for r in _rows(out))  # kills S45: only doc2query rows name their task


def test_a_product_with_no_text_is_recorded_as_skipped_and_not_retried(tmp_path, tiny_policy_dir,
                                                                       monkeypatch):
    # kills S44 (a product with no text left out, so every rerun retried it and the file never
    # covered the catalog)
    import relsum_core.summarize as summarize

    catalog = tmp_path / "products.jsonl"
    catalog.write_text(json.dumps({"product_id": "p0", "title": " red cotton shirt  "}) + "\n"
                       + json.dumps({"product_id": "p1", "title": "<br>"}) + "\n")  # no text once cleaned
    out = tmp_path / "s.jsonl"
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), budget=2, progress=False)
    summarize_catalog(out, **kw)
    rows = {r["product_id"]: r for r in _rows(out)}
    assert set(rows) == {"p0", "p1"} and "summary" in rows["p0"]
    assert rows["p0"]["title"] == " red cotton shirt  "  # S54: as in the catalog (evaluate compares)
    assert rows["p1"]["title"] == "<br>" and "no text" in rows["p1"]["skipped"]
    assert "summary" not in rows["p1"]
    monkeypatch.setattr(summarize, "load_policy", lambda *a, **k: pytest.fail("nothing left to do"))
    summarize_catalog(out, **kw)
    assert len(_rows(out)) == 2


def test_sampling_follows_the_temperature(tmp_path, catalog, tiny_policy_dir):
    # kills S46 (sampling always greedy): the tiny random policy samples other tokens than its argmax
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), budget=4, batch_size=5, progress=False)
    greedy = _rows(summarize_catalog(tmp_path / "g.jsonl", **kw))
    sampled = _rows(summarize_catalog(tmp_path / "t.jsonl", temperature=1.0, seed=3, **kw))
    assert [r["summary"] for r in greedy] != [r["summary"] for r in sampled]


def test_each_batch_is_on_disk_before_the_next_is_sampled_and_a_crash_loses_no_row(tmp_path, catalog,
                                                                                     tiny_policy_dir,
                                                                                     monkeypatch):
    # kills S48 (no flush) and S49 (rows written only at the end: a crash lost the whole run)
    import relsum_core.summarize as summarize

    out = tmp_path / "s.jsonl"
    kw = dict(policy=str(tiny_policy_dir), catalog=str(catalog), budget=2, batch_size=2, progress=False)
    real, seen = summarize.sample, []

    def crashing_sample(*args, **kwargs):
        seen.append(len(_rows(out)))  # what another process (or a crash now) would find on disk
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(summarize, "sample", crashing_sample)
    with pytest.raises(KeyboardInterrupt):
        summarize_catalog(out, **kw)
    assert seen == [0, 2, 4] and [r["product_id"] for r in _rows(out)] == ["p0", "p1", "p2", "p3"]
    monkeypatch.setattr(summarize, "sample", real)
    summarize_catalog(out, **kw)
    assert [r["product_id"] for r in _rows(out)] == [f"p{i}" for i in range(5)]
