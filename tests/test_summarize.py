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
