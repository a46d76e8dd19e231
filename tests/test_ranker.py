"""CrossEncoder / Reranker: parity with HF, truncation rule, save/load, ranking, bad input, buckets."""

import copy
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
)

from relsum_core.ranker import (  # noqa: E402
    CrossEncoder,
    PackedBatch,
    Reranker,
    _distinct_pairs,
    _geometric,
    padded_pairs,
    plan_bucket,
    truncate_pair,
)

from conftest import minilm_dir  # noqa: E402


def minilm_path(weights: bool = True) -> str:
    return str(minilm_dir(weights=weights))


WORDS = ("red running shoe waterproof jacket kitchen towel rack stainless steel cordless drill battery "
         "organic green tea wireless headphones noise cancelling kids lego set garden hose").split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def mixed_pairs(seed=0):
    rng = random.Random(seed)
    pairs = [(text(rng, rng.randint(1, 6)), text(rng, rng.randint(0, 60))) for _ in range(10)]
    pairs += [("", "an empty query"), ("an empty doc", ""), ("", ""), (text(rng, 80), text(rng, 700))]
    return pairs


def hf_reference(model, ce, pairs):
    """HF eager fp32, one pair at a time, on the token ids of the documented rule."""
    model = model.eval()
    model.set_attn_implementation("eager")
    out = []
    with torch.no_grad():
        for ids, n_first in ce.encode_pairs(pairs):
            t = torch.tensor([ids])
            tt = torch.tensor([[int(j >= n_first) for j in range(len(ids))]])
            out.append(model(input_ids=t, token_type_ids=tt).logits[0, 0].item())
    return np.array(out)


def hf_padded_reference(model, ce, pairs):
    """HF eager fp32 on one right-padded batch (attention masked): the plain-transformers way."""
    model = model.eval()
    model.set_attn_implementation("eager")
    encoded = ce.encode_pairs(pairs)
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (tokens, n_first) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        types[row, n_first: len(tokens)] = 1
        mask[row, : len(tokens)] = 1
    with torch.no_grad():
        return model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits[:, 0].numpy()


@pytest.fixture(scope="module")
def minilm():
    return CrossEncoder.from_pretrained(minilm_path(), device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random BertForSequenceClassification (1 label) with MiniLM's tokenizer."""
    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(minilm_path(weights=False))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)  # scores that differ visibly between pairs
        model.classifier.bias.fill_(0.3)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return CrossEncoder.from_pretrained(tiny_dir, device="cpu")


# ------------------------------------------------------------------ parity with HF
def test_minilm_predict_matches_hf_eager(minilm):
    pairs = mixed_pairs()
    got = minilm.predict(pairs, batch_size=5)
    assert got.dtype == np.float32 and got.shape == (len(pairs),)
    ref = hf_reference(minilm.model, minilm, pairs)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    assert np.ptp(ref) > 1e-3  # scores differ between pairs, so order mistakes would show


def test_tiny_predict_matches_hf_eager_and_hf_tokenizer(tiny, tiny_dir):
    pairs = mixed_pairs(seed=3)
    got = tiny.predict(pairs)
    hf = BertForSequenceClassification.from_pretrained(tiny_dir)
    np.testing.assert_allclose(got, hf_reference(hf, tiny, pairs), rtol=0, atol=1e-5)
    # Where no truncation happens and both texts are non-empty, the ids are exactly HF's pair encoding.
    for (q, d), (ids, n_first) in zip(pairs, tiny.encode_pairs(pairs)):
        if q and d and len(ids) < tiny.max_length:
            enc = tiny.tokenizer(q, d)
            assert enc["input_ids"] == ids
            assert enc["token_type_ids"] == [int(j >= n_first) for j in range(len(ids))]


def test_scores_independent_of_batching(tiny):
    pairs = mixed_pairs(seed=4) * 3
    a = tiny.predict(pairs, batch_size=1)
    b = tiny.predict(pairs, batch_size=128, max_tokens=tiny.max_length)
    c = tiny.predict(pairs[::-1])[::-1]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)
    # the grouping: one batch in input order when all fits, else longest first within both limits
    assert tiny._batches([3, 9, 5], 3, 17) == [[0, 1, 2]]
    assert tiny._batches([3, 9, 5], 2, 100) == [[1, 2], [0]]
    assert tiny._batches([3, 9, 5], 3, 12) == [[1], [2, 0]]


# ------------------------------------------------------------------ truncation rule
def test_truncation_rule_doc_first():
    q, d = list(range(100)), list(range(1000, 2000))
    tq, td = truncate_pair(q, d, 512)
    assert tq == q[:64] and td == d[: 512 - 3 - 64]
    tq, td = truncate_pair(q[:10], d, 512)
    assert tq == q[:10] and td == d[: 512 - 3 - 10]
    tq, td = truncate_pair(q, d, 20)  # the query alone fills the budget: no doc tokens
    assert tq == q[:17] and td == []
    assert truncate_pair([], [], 3) == ([], [])


def test_long_texts_truncated_by_rule(tiny):
    rng = random.Random(7)
    pairs = [(text(rng, 200), text(rng, 400)), (text(rng, 3), text(rng, 400)), (text(rng, 100), "")]
    enc = tiny.encode_pairs(pairs)
    L = tiny.max_length
    assert L == 128  # the model's max_position_embeddings
    (ids0, nf0), (ids1, nf1), (ids2, nf2) = enc
    assert len(ids0) == L and nf0 == 64 + 2  # query cut to 64, doc fills the rest
    assert len(ids1) == L and nf1 == 3 + 2  # short query kept whole, doc gets the rest
    assert len(ids2) == 64 + 3 and nf2 == 66  # empty doc: [CLS] q [SEP] [SEP]
    assert ids0[0] == tiny.tokenizer.cls_token_id and ids0[65] == ids0[-1] == tiny.tokenizer.sep_token_id
    assert tiny.encode_pairs(pairs) == enc  # deterministic
    short = CrossEncoder.from_model(tiny.model, tiny.tokenizer, max_length=40)
    assert [len(ids) for ids, _ in short.encode_pairs(pairs)] == [40, 40, 40]


# ------------------------------------------------------------------ loading
def test_bare_bertmodel_gets_seeded_head():
    a = CrossEncoder.from_pretrained(minilm_path(), device="cpu")
    b = CrossEncoder.from_pretrained(minilm_path(), device="cpu")
    c = CrossEncoder.from_pretrained(minilm_path(), device="cpu", head_seed=1)
    wa, wb, wc = (x.model.classifier.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    std = a.model.config.initializer_range
    assert 0.5 * std < wa.std().item() < 1.5 * std and a.model.classifier.bias.item() == 0.0
    # The checkpoint's pooler is loaded, not re-initialised.
    from safetensors.torch import load_file

    pooler = load_file(os.path.join(minilm_path(), "model.safetensors"))["pooler.dense.weight"]
    assert torch.equal(a.model.bert.pooler.dense.weight, pooler)


def test_from_model_bertmodel_and_classifier(tiny, tiny_dir):
    bare = BertModel.from_pretrained(tiny_dir)
    ce = CrossEncoder.from_model(bare, tiny.tokenizer)
    assert ce.model.bert is bare and ce.model.num_labels == 1
    shared = CrossEncoder.from_model(tiny.model, tiny.tokenizer)
    assert shared.model is tiny.model
    np.testing.assert_array_equal(shared.predict([("a", "b")]), tiny.predict([("a", "b")]))
    with pytest.raises(TypeError, match="BertModel or BertForSequenceClassification"):
        CrossEncoder.from_model(torch.nn.Linear(2, 2), tiny.tokenizer)


def test_not_bert_family_is_a_clear_error(tmp_path):
    gpt = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not BERT-family"):
        CrossEncoder.from_pretrained(gpt)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json") as e:
        CrossEncoder.from_pretrained(empty)
    assert "best" not in str(e.value)
    # train-ranker's output folder: its best/ is named
    (empty / "best").mkdir()
    (empty / "best" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no config.json.*empty/best is one \(train-ranker's output folder"):
        CrossEncoder.from_pretrained(empty)
    with pytest.raises(FileNotFoundError):
        CrossEncoder.from_pretrained(tmp_path / "missing")


def test_corrupt_ranker_checkpoint_names_its_folder(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny.save(ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{ckpt}: cannot load the weights"):
        CrossEncoder.from_pretrained(ckpt)
    (ckpt / "config.json").write_text('{"model_type": "bert",\n')
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        CrossEncoder.from_pretrained(ckpt)


def test_bert_loads_check_themselves_quietly_one_at_a_time(tiny, tmp_path):
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    bare = tmp_path / "bare"  # a bare encoder: its head is new
    BertModel(tiny.model.config).save_pretrained(bare)
    tiny.tokenizer.save_pretrained(bare)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    level = hf_logger.level
    try:
        import threading

        # from two threads at once, as a service building rankers may: unserialised, transformers'
        # loads left the next tied-embedding model's lm_head on the meta device
        tied = tmp_path / "tied"
        AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tied)
        for _ in range(2):
            threads = [threading.Thread(target=CrossEncoder.from_pretrained, args=(minilm_path(),))
                       for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.bfloat16)
            assert not [n for n, p in after.named_parameters() if p.is_meta]
        assert hf_logger.level == level  # no global verbosity change
        assert not any("LOAD REPORT" in r.getMessage() for r in records)  # not reported as if an error
        BertForSequenceClassification.from_pretrained(bare, num_labels=1)  # a user's own load: reported
        assert any("LOAD REPORT" in r.getMessage() for r in records)
    finally:
        hf_logger.removeHandler(handler)
    ckpt = tmp_path / "ckpt"
    tiny.save(ckpt)
    weights = load_file(ckpt / "model.safetensors")
    dropped = sorted(k for k in weights if ".layer.1." in k)
    save_file({k: v for k, v in weights.items() if k not in dropped}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"ckpt: the checkpoint lacks {len(dropped)} encoder weights"):
        CrossEncoder.from_pretrained(ckpt)


def test_bare_encoder_without_a_pooler_loads_as_a_cross_encoder(tmp_path, tiny):
    # sentence-transformers exports often have no pooler: it is part of the new head, not missing
    BertModel(tiny.model.config, add_pooling_layer=False).save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    ce = CrossEncoder.from_pretrained(tmp_path)
    assert np.isfinite(ce.predict([("red shirt", "cotton shirt, red")])).all()


def test_multi_label_classifier_rejected(tmp_path, tiny):
    cfg = BertConfig(**{**tiny.model.config.to_dict(), "num_labels": 3})
    multi = BertForSequenceClassification(cfg)
    multi.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="3 labels"):
        CrossEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="one-label"):
        CrossEncoder(multi, tiny.tokenizer)
    # Without architectures/id2label in the config, the head's weight shape still gives it away.
    cfg_file = tmp_path / "config.json"
    raw = {k: v for k, v in json.loads(cfg_file.read_text()).items()
           if k not in ("architectures", "id2label", "label2id")}
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="do not fit a one-label cross-encoder"):
        CrossEncoder.from_pretrained(tmp_path)


def test_bad_max_length(tiny):
    with pytest.raises(ValueError, match="max_length"):
        CrossEncoder.from_model(tiny.model, tiny.tokenizer, max_length=129)
    with pytest.raises(ValueError, match="max_length"):
        CrossEncoder.from_model(tiny.model, tiny.tokenizer, max_length=2)


# ------------------------------------------------------------------ save / load
def test_save_round_trip_via_plain_transformers(tiny, tmp_path):
    pairs = mixed_pairs(seed=5)
    before = tiny.predict(pairs)
    out = tmp_path / "ckpt"
    tiny.save(out)
    tiny.save(out)  # over an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    assert hf.config.num_labels == 1
    np.testing.assert_allclose(hf_reference(hf, tiny, pairs), before, rtol=0, atol=1e-5)
    again = CrossEncoder.from_pretrained(out, device="cpu")
    np.testing.assert_array_equal(again.predict(pairs), before)
    assert again.max_length == tiny.max_length


def test_minilm_with_new_head_saves_and_reloads(minilm, tmp_path):
    pairs = mixed_pairs(seed=6)[:4]
    minilm.save(tmp_path / "m")
    again = CrossEncoder.from_pretrained(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(again.predict(pairs), minilm.predict(pairs))


def test_save_refuses_a_file(tiny, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError):
        tiny.save(f)


def test_save_never_deletes_a_folder_that_is_not_a_checkpoint(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        tiny.save(run)  # save() swaps the whole folder: the log would be gone
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    (tmp_path / "empty").mkdir()
    tiny.save(tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ValueError, match="is .or holds. the working directory"):
        tiny.save(".")  # swapping it would leave this process in a deleted directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]  # nothing stray


def test_scores_follow_weights_written_through_data(tiny):
    # The encoder's joined QKV copy follows version counters, which .data writes bypass: refresh().
    pairs = mixed_pairs(seed=9)[:3]
    rr = Reranker(tiny)
    before = tiny.predict(pairs)
    w = tiny.model.bert.encoder.layer[0].attention.self.value.weight
    saved = w.detach().clone()
    try:
        w.data.mul_(5.0)
        tiny.refresh()
        fresh = CrossEncoder.from_model(copy.deepcopy(tiny.model), tiny.tokenizer).predict(pairs)
        assert not np.allclose(fresh, before)
        np.testing.assert_allclose(tiny.predict(pairs), fresh, atol=1e-6)
        w.data.mul_(0.5)
        rr.clear()  # the Reranker's clear() refreshes its encoder too
        fresh = CrossEncoder.from_model(copy.deepcopy(tiny.model), tiny.tokenizer).predict(pairs)
        np.testing.assert_allclose(rr.score(pairs[0][0], [d for _, d in pairs[:1]]), fresh[:1], atol=1e-6)
    finally:
        w.data.copy_(saved)
        tiny.refresh()


def test_reranker_graphs_are_recaptured_after_refresh(tiny):
    """A captured CUDA graph holds the joined QKV copies' addresses, not the copies: ce.refresh()
    frees them, so the Reranker's weights key must move with it (a .data write moves nothing else)."""
    rr = Reranker(tiny)
    key = rr._current_weights_key()
    assert rr._current_weights_key() == key
    tiny.refresh()
    assert rr._current_weights_key() != key


def test_scoring_runs_on_the_models_device(tiny, monkeypatch):
    """Triton launches on the thread's current CUDA device: both scoring paths enter the model's."""
    import relsum_core.ranker as ranker_module

    entered = []
    scope = ranker_module.device_scope
    monkeypatch.setattr(ranker_module, "device_scope", lambda dev: entered.append(dev) or scope(dev))
    tiny.predict(mixed_pairs(seed=2)[:2])
    assert entered == [tiny.device]
    entered.clear()
    Reranker(tiny).score("q", ["a", "b"])
    assert entered and set(entered) == {tiny.device}


def test_inference_mode_weights(tiny, tiny_dir):
    from transformers import BertForSequenceClassification

    with torch.inference_mode():  # loaded under inference mode, no move: still normal tensors
        loaded = CrossEncoder.from_pretrained(tiny_dir, device="cpu")
        pairs = mixed_pairs(seed=3)[:2]
        np.testing.assert_allclose(loaded.predict(pairs), tiny.predict(pairs))

    # Loaded or converted under inference mode: the moved weights are still normal tensors.
    model = copy.deepcopy(tiny.model)
    with torch.inference_mode():
        ce = CrossEncoder.from_model(model, tiny.tokenizer, dtype=torch.bfloat16)
        scores = ce.predict(mixed_pairs(seed=3)[:2])
    assert np.isfinite(scores).all() and not any(p.is_inference() for p in ce.model.parameters())
    # Built under inference mode: a clear error, not "Inference tensors do not track version counter"
    with torch.inference_mode():
        built = BertForSequenceClassification(tiny.model.config)
    with pytest.raises(ValueError, match="weights are inference tensors"):
        CrossEncoder(built, tiny.tokenizer)


# ------------------------------------------------------------------ rank
def test_rank_sorted_top_k_and_documents(tiny):
    docs = [text(random.Random(i), 5 + i) for i in range(12)]
    scores = tiny.predict([("kids lego", d) for d in docs])
    res = tiny.rank("kids lego", docs)
    assert [r["corpus_id"] for r in res] == list(np.argsort(-scores, kind="stable"))
    assert all(res[i]["score"] >= res[i + 1]["score"] for i in range(len(res) - 1))
    assert set(res[0]) == {"corpus_id", "score"}
    top = tiny.rank("kids lego", docs, top_k=3, return_documents=True)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in res[:3]]
    assert all(r["text"] == docs[r["corpus_id"]] for r in top)
    assert len(tiny.rank("kids lego", docs, top_k=100)) == 12


def test_rank_ties_keep_input_order(tiny):
    res = tiny.rank("q", ["same", "same", "same"])
    assert [r["corpus_id"] for r in res] == [0, 1, 2]


# ------------------------------------------------------------------ bad input
def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.predict([])
    with pytest.raises(ValueError, match="candidate list is empty"):
        tiny.rank("q", [])
    with pytest.raises(TypeError, match=r"pairs\[1\]\[1\] \(doc\) must be a str"):
        tiny.predict([("q", "d"), ("q", None)])
    with pytest.raises(TypeError, match=r"candidates\[0\]"):
        tiny.rank("q", [3])
    with pytest.raises(TypeError, match="query must be a str"):
        tiny.rank(None, ["d"])
    with pytest.raises(TypeError, match="wrap a single pair"):
        tiny.predict(("q", "d"))
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a \(query, doc\) pair"):
        tiny.predict([("q", "d", "x")])
    with pytest.raises(TypeError, match="list of strings"):
        tiny.rank("q", "just one string")
    with pytest.raises(ValueError, match="top_k"):
        tiny.rank("q", ["a"], top_k=0)
    assert len(tiny.rank("q", ["a", "b", "c"], top_k=np.int64(2))) == 2  # numpy ints are ints
    with pytest.raises(ValueError, match=r"pairs\[0\]\[1\] \(doc\) is not valid text"):
        tiny.predict([("q", "a\ud800b")])  # a lone surrogate, as json.loads makes from "\\ud800"
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny.predict([("q", "d")], batch_size=2.5)
    with pytest.raises(ValueError, match="dtype must be"):
        CrossEncoder(tiny.model, tiny.tokenizer, dtype=torch.float64)
    # Token ids a caller packs by hand are checked before they index the embedding tables.
    good = tiny.encode_pairs([("q", "d"), ("q", "a longer doc")])
    bad_id = [good[0], ([*good[1][0][:-1], tiny.vocab_size], good[1][1])]
    for scorer in (tiny.score_encoded, Reranker(tiny).score_encoded,
                   lambda e: tiny.score_encoded(e, batch_size=1),  # named by its place in the list,
                   Reranker(tiny, max_candidates=1).score_encoded):  # not in its batch
        with pytest.raises(ValueError, match=r"sequence 1 holds token ids outside \[0, "):
            scorer(bad_id)
        too_long = [(list(range(5, 5 + tiny.max_length + 1)), 2)]
        with pytest.raises(ValueError, match="sequence 0 has .* more than max_length"):
            scorer(too_long)
    # ... named by its place in the caller's list when an identical pair comes before it
    dup_bad = [good[1], good[0], good[1], bad_id[1]]
    float_ids = [(np.asarray(ids), t) for ids, t in good] * 2
    float_ids.append((np.asarray(good[0][0], dtype=np.float32), 1))
    one_a_batch = lambda e: tiny.score_encoded(e, batch_size=1)  # noqa: E731
    for scorer in (tiny.score_encoded, Reranker(tiny).score_encoded, one_a_batch):
        with pytest.raises(ValueError, match=r"sequence 3 holds token ids outside \[0, "):
            scorer(dup_bad)
        with pytest.raises(TypeError, match="1-D integer arrays; sequence 4 is float32"):
            scorer(float_ids)
    # Empty strings are allowed and scored.
    s = tiny.predict([("", ""), ("q", "")])
    assert np.isfinite(s).all()


def test_duplicate_pairs_tie_exactly_and_keep_corpus_order(minilm):
    """An fp32 score moves by ~1e-8 with the GEMM row tile a pair lands in: scored twice, copies of
    one listing did not tie, and rank put a later copy first (a soak of 200 requests: 39 untied)."""
    from relsum_core.data import load_catalog

    titles = [p.title for p in list(load_catalog().values())[:3]]
    a, b, c = titles
    q, request = "red running shoes", [a, b, a, c, a]  # scored apart, copy 4 came 2e-8 above 0 and 2
    pairs = [(q, d) for d in request]
    as_arrays = [(np.asarray(ids), t) for ids, t in minilm.encode_pairs(pairs)]
    reranked = Reranker(minilm).score(q, request)
    for scores in (minilm.predict(pairs), reranked, minilm.score_encoded(as_arrays)):
        assert scores[0] == scores[2] == scores[4]
        np.testing.assert_allclose(scores, minilm.predict([(q, d) for d in titles])[
            [0, 1, 0, 2, 0]], rtol=0, atol=1e-5)
    for ranked in (minilm.rank(q, request), Reranker(minilm).rerank(q, request)):
        order = [r["corpus_id"] for r in ranked]
        assert [i for i in order if i in (0, 2, 4)] == [0, 2, 4]  # copies in corpus order


def test_cpu_scoring_hands_freed_memory_back(tiny, monkeypatch):
    """On CPU each scoring call checks the resident size; past the threshold it trims (glibc)."""
    import relsum_core.ranker as ranker_mod

    calls = []
    monkeypatch.setitem(ranker_mod._TRIM, "fn", lambda pad: calls.append(pad) or 1)
    monkeypatch.setitem(ranker_mod._TRIM, "loaded", True)
    monkeypatch.setitem(ranker_mod._TRIM, "base", None)
    tiny.predict([("q", "d")])
    assert calls == []  # the first call only notes the size
    monkeypatch.setitem(ranker_mod._TRIM, "base", ranker_mod._TRIM["base"] - 300)  # as if it grew 300 MiB
    Reranker(tiny).score("q", ["d", "e"])
    assert calls == [0]
    tiny.predict([("q", "d")])
    assert calls == [0]  # the base moved to the size after the trim
    monkeypatch.setattr(tiny, "trim_threshold_mib", None)
    monkeypatch.setitem(ranker_mod._TRIM, "base", 0.0)
    tiny.predict([("q", "d")])
    assert calls == [0]  # turned off
    assert ranker_mod._malloc_trim() is not None  # this CI's Linux has glibc


def test_a_scoring_call_that_fails_still_trims(tiny, monkeypatch):
    """A forward that fails mid-way (out of memory, an interrupt) freed its activations too."""
    import relsum_core.ranker as ranker_mod

    checks = []
    monkeypatch.setattr(ranker_mod, "trim_freed_memory", lambda threshold: checks.append(threshold))

    def fail(*args, **kwargs):
        raise MemoryError("out of memory mid-forward")

    # on the classes: an instance attribute would outlive the test (monkeypatch restores it as one)
    monkeypatch.setattr(CrossEncoder, "score_packed", fail)
    with pytest.raises(MemoryError):
        tiny.predict([("q", "d")])
    assert checks == [256.0]
    monkeypatch.setattr(Reranker, "_score_chunk", fail)
    with pytest.raises(MemoryError):
        Reranker(tiny).score("q", ["d", "e"])
    assert checks == [256.0, 256.0]


# ------------------------------------------------------------------ buckets and the Reranker
def test_packed_batch_layout():
    b = PackedBatch([([101, 5, 102, 7, 102], 3), ([101, 102, 102], 2)])
    assert b.input_ids.tolist() == [101, 5, 102, 7, 102, 101, 102, 102]
    assert b.token_type_ids.tolist() == [0, 0, 0, 1, 1, 0, 0, 1]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert b.cu_seqlens.tolist() == [0, 5, 8] and b.cu_seqlens.dtype == torch.int32 and b.max_seqlen == 5
    # pad sequences: the same as appending pad-id sequences whose tokens are all type 0
    seqs = [([101, 5, 102, 7, 102], 3), ([101, 102, 102], 2)]
    padded = PackedBatch(seqs, pad_lens=[2, 6], pad_id=9)
    listed = PackedBatch(seqs + [([9] * 2, 2), ([9] * 6, 6)])
    for name in ("input_ids", "token_type_ids", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(padded, name), getattr(listed, name)), name
    assert padded.lens == [5, 3, 2, 6] and padded.max_seqlen == 6
    assert padded.token_type_ids[8:].tolist() == [0] * 8
    with pytest.raises(ValueError, match="no empty sequences"):
        PackedBatch(seqs, pad_lens=[0])
    # ids as integer arrays (a serving cache): the same batch, without the per-token conversion
    arrays = PackedBatch([(np.array(x, dtype=np.int32), n) for x, n in seqs], pad_lens=[2, 6], pad_id=9)
    for name in ("input_ids", "token_type_ids", "position_ids", "cu_seqlens"):
        assert torch.equal(getattr(arrays, name), getattr(listed, name)), name
    with pytest.raises(TypeError, match="sequence 1 is float64"):
        PackedBatch([(np.array([101, 102]), 1), (np.array([1.5, 2.0]), 1)])
    with pytest.raises(TypeError, match="1-D integer arrays"):
        PackedBatch([(np.array([[101, 102]]), 1)])
    with pytest.raises(ValueError, match="at least one sequence"):
        PackedBatch([])
    # one staging buffer (a single host-to-device copy) holds all four inputs and gives them back
    staged = padded.stage(torch.full((padded.staged_size,), -1, dtype=torch.int64))
    assert staged.min() >= 0  # every slot written
    back = PackedBatch.unstage(staged, padded.input_ids.numel())
    for name, t in zip(("input_ids", "token_type_ids", "position_ids", "cu_seqlens"), back):
        assert torch.equal(t, getattr(padded, name)), name
    assert back[3].dtype == torch.int32


def test_geometric_buckets():
    tb = _geometric(256, 65536, 2 ** 0.25, multiple=64)
    assert tb[0] == 256 and tb[-1] == 65536 and len(set(tb)) == len(tb) == 33
    assert all(b % 64 == 0 for b in tb) and list(tb) == sorted(tb)
    assert {1024, 2048, 4096, 8192} <= set(tb)  # no float drift past a power of two
    assert max(b / a for a, b in zip(tb, tb[1:])) <= 1.25  # 2**0.25 = 1.19, plus rounding to 64
    assert _geometric(256, 65536, 2 ** 0.5)[8] == 4096
    assert _geometric(8, 2100, 2.0) == (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 2100)
    assert _geometric(256, 300, 1.5, multiple=64) == (256, 300)  # never past hi


def test_plan_bucket_properties():
    tb = _geometric(256, 65536, 2 ** 0.5)
    sb = _geometric(8, 1024 + 1 + 1024, 2.0)
    lb = (64, 128, 256, 512)
    rng = random.Random(0)
    keys = set()
    for _ in range(300):
        n = rng.randint(1, 1000)
        hi = rng.choice([96, 512])
        lens = [rng.randint(3, hi) for _ in range(n)]
        if sum(lens) > 65536 - sb[-1]:
            continue
        lay = plan_bucket(lens, tb, sb, lb)
        assert lay is not None
        assert lay.tokens in tb and lay.seqs in sb and lay.max_seqlen in lb
        assert lay.max_seqlen >= max(lens) and (lay.max_seqlen == 64 or lay.max_seqlen // 2 < max(lens))
        assert len(lay.dummy_lens) == lay.seqs - n >= 1
        assert sum(lens) + sum(lay.dummy_lens) == lay.tokens
        assert all(1 <= d <= lay.max_seqlen for d in lay.dummy_lens)
        keys.add(lay.key)
    assert len(keys) < 120  # shapes collapse onto few buckets (so few graphs)
    assert plan_bucket([600], tb, sb, lb) is None  # longer than the longest seqlen bucket
    # exactly on a token and a sequence bucket: still room for a dummy sequence
    lay = plan_bucket([32] * 8, (256, 512, 1024), (8, 16, 32), lb)
    assert lay.seqs == 16 and lay.tokens == 512 and len(lay.dummy_lens) == 8


def test_reranker_buckets_match_predict(tiny):
    rng = random.Random(2)
    cands = [text(rng, rng.randint(0, 150)) for _ in range(40)]
    ref = tiny.predict([("garden hose", c) for c in cands])
    plain = Reranker(tiny)
    assert not plain.cuda_graphs and not plain.use_buckets
    np.testing.assert_allclose(plain.score("garden hose", cands), ref, rtol=0, atol=1e-5)
    # Padded bucket layout, small chunks: dummy sequences must not change real scores.
    bucketed = Reranker(tiny, use_buckets=True, max_tokens=2048, max_candidates=16)
    np.testing.assert_allclose(bucketed.score("garden hose", cands), ref, rtol=0, atol=1e-5)
    enc = tiny.encode_pairs([("garden hose", c) for c in cands])
    as_arrays = [(np.asarray(ids), nf) for ids, nf in enc]
    np.testing.assert_allclose(bucketed.score_encoded(as_arrays), ref, rtol=0, atol=1e-5)
    res = bucketed.rerank("garden hose", cands, top_k=5)
    assert [r["corpus_id"] for r in res] == list(np.argsort(-ref, kind="stable")[:5])
    with pytest.raises(ValueError, match="candidate list is empty"):
        bucketed.score("q", [])


def test_cpu_reranker_buckets_bf16_by_default(tiny):
    """In bf16 the CPU Reranker bounds the shapes oneDNN builds kernels for; in fp32 it runs exact."""
    rng = random.Random(4)
    cands = [text(rng, rng.randint(0, 150)) for _ in range(30)]
    half = CrossEncoder.from_model(copy.deepcopy(tiny.model), tiny.tokenizer, dtype=torch.bfloat16)
    rr = Reranker(half)
    assert rr.use_buckets and not rr.cuda_graphs and not Reranker(half, use_buckets=False).use_buckets
    got, want = rr.score("garden hose", cands), half.predict([("garden hose", c) for c in cands])
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * max(1.0, np.abs(want).max()))


def test_predict_pads_batches_to_bucket_shapes_on_cpu_in_bf16(tiny, monkeypatch):
    """predict in bf16 on CPU runs a few fixed shapes (oneDNN keeps kernels per shape); the padding's
    dummy sequences never change a real score, and fp32 keeps each batch's exact shape."""
    rng = random.Random(5)
    pairs = [("garden hose", text(rng, rng.randint(0, 150))) for _ in range(45)]
    seen = []
    score_packed = CrossEncoder.score_packed

    def recording(self, batch):
        seen.append((self, len(batch.lens), int(batch.cu_seqlens[-1])))
        return score_packed(self, batch)

    monkeypatch.setattr(CrossEncoder, "score_packed", recording)
    exact = tiny.predict(pairs, batch_size=8)
    assert [n for _, n, _ in seen] == [8, 8, 8, 8, 8, 5]  # fp32: each batch as it is
    half = CrossEncoder.from_model(copy.deepcopy(tiny.model), tiny.tokenizer, dtype=torch.bfloat16)
    for ce, tol in ((tiny, 1e-5), (half, 0.02 * max(1.0, np.abs(exact).max()))):
        if ce is tiny:
            ce.use_buckets = True  # forced in fp32, to compare the scores exactly
        seen.clear()
        np.testing.assert_allclose(ce.predict(pairs, batch_size=8), exact, rtol=0, atol=tol)
        shapes = ce._shapes[(8, 16384)]
        assert len(seen) == 6 and all(n in shapes.seqs and t in shapes.tokens for _, n, t in seen)
    tiny.use_buckets = None
    assert tiny._bucket_shapes(8, 16384) is None and half._bucket_shapes(8, 16384) is not None
    # token-bound batches (small max_tokens) still fit a bucket, max_seqlen included
    seen.clear()
    seqlens = []
    monkeypatch.setattr(CrossEncoder, "score_packed",
                        lambda self, batch: seqlens.append(batch.max_seqlen) or recording(self, batch))
    np.testing.assert_allclose(half.predict(pairs, batch_size=64, max_tokens=256), exact, rtol=0,
                               atol=0.02 * max(1.0, np.abs(exact).max()))
    shapes = half._shapes[(64, 256)]
    assert len(seen) > 1 and all(t in shapes.tokens and n in shapes.seqs for _, n, t in seen)
    assert all(s in shapes.seqlens for s in seqlens)


def test_reranker_guards(tiny):
    with pytest.raises(ValueError, match="CUDA"):
        Reranker(tiny, cuda_graphs=True)
    with pytest.raises(ValueError, match="too small"):
        Reranker(tiny, max_tokens=256, max_candidates=1024)
    for ratio in (1.0, 0.5, 8.0, float("nan")):
        with pytest.raises(ValueError, match="bucket_ratio"):
            Reranker(tiny, bucket_ratio=ratio)
    with pytest.raises(ValueError, match="max_candidates"):
        Reranker(tiny, max_candidates=0)
    assert all(b % 64 == 0 for b in Reranker(tiny).token_buckets[:-1])
    # Captured graphs bake in weight addresses: an in-place edit must change the key that drops them.
    rr = Reranker(tiny)
    before = rr._current_weights_key()
    w = tiny.model.bert.encoder.layer[0].output.dense.bias
    with torch.no_grad():
        w.add_(0.0)
    assert rr._current_weights_key() != before
    # ...and so must switching the encoder's kernels (a graph replays what it captured)
    before = rr._current_weights_key()
    tiny.encoder.fused_ffn_up = True
    try:
        assert rr._current_weights_key() != before
    finally:
        tiny.encoder.fused_ffn_up = False
    for flag in ("fused_dense_ln", "fused_ffn"):
        setattr(tiny.encoder, flag, True)
        try:
            assert rr._current_weights_key() != before
        finally:
            setattr(tiny.encoder, flag, False)
    tiny.encoder.attention_config = {"SHORT": True, "HEADS": 4, "BLOCK_M": 64}
    try:
        assert rr._current_weights_key() != before
    finally:
        tiny.encoder.attention_config = None
    assert rr._current_weights_key() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check; on CUDA: test_reranker_cuda_graphs")
def test_reranker_bucket_layout_through_triton_kernels(tiny):
    """The exact single-buffer inputs and bucket shapes the CUDA graphs capture, run through the Triton
    kernels (interpreter on CPU): dummy sequences and a rounded-up max_seqlen leave real scores alone."""
    rng = random.Random(3)
    cands = [text(rng, rng.randint(0, 40)) for _ in range(6)]
    ref = tiny.predict([("lego", c) for c in cands])
    tiny.encoder.impl = "triton"
    try:
        got = Reranker(tiny, use_buckets=True, max_tokens=4096, max_candidates=8).score("lego", cands)
    finally:
        tiny.encoder.impl = "auto"
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reranker_cuda_graphs(tiny_dir):
    ce = CrossEncoder.from_pretrained(tiny_dir, device="cuda")
    rng = random.Random(5)
    cands = [text(rng, rng.randint(0, 150)) for _ in range(50)]
    pairs = [("garden hose", c) for c in cands]
    ref = ce.predict(pairs)  # packed, Triton kernels, no graphs
    cpu = CrossEncoder.from_pretrained(tiny_dir, device="cpu").predict(pairs)
    np.testing.assert_allclose(ref, cpu, rtol=0, atol=1e-4)
    rr = Reranker(ce)
    assert rr.cuda_graphs and rr.use_buckets
    first = rr.score("garden hose", cands)
    np.testing.assert_allclose(first, ref, rtol=0, atol=1e-5)
    n_graphs = len(rr._graphs)
    assert n_graphs >= 1
    np.testing.assert_array_equal(rr.score("garden hose", cands), first)  # a replay
    other = [" ".join(reversed(c.split())) for c in cands]  # same lengths, so same bucket; new inputs
    want = ce.predict([("garden hose", c) for c in other])
    np.testing.assert_allclose(rr.score("garden hose", other), want, rtol=0, atol=1e-5)
    assert len(rr._graphs) == n_graphs
    # The fused QKV weight is a copy baked into the graph: an in-place edit must trigger a recapture.
    v = ce.model.bert.encoder.layer[0].attention.self.value.weight
    with torch.no_grad():
        v.add_(torch.randn_like(v))
    edited = rr.score("garden hose", cands)
    assert np.abs(edited - first).max() > 1e-4
    np.testing.assert_allclose(edited, ce.predict(pairs), rtol=0, atol=1e-5)
    # A .data write moves no version counter; refresh() frees the joined copies the graphs read.
    with torch.no_grad():
        v.data.mul_(0.5)
    ce.refresh()
    fresh = CrossEncoder.from_model(copy.deepcopy(ce.model), ce.tokenizer).predict(pairs)
    np.testing.assert_allclose(rr.score("garden hose", cands), fresh, rtol=0, atol=1e-5)
    # From a worker thread (which starts on its own current device), as a server calls it.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        np.testing.assert_allclose(pool.submit(rr.score, "garden hose", cands).result(), fresh, rtol=0,
                                   atol=1e-5)
    ce16 = CrossEncoder.from_pretrained(tiny_dir, device="cuda", dtype=torch.bfloat16)
    np.testing.assert_allclose(Reranker(ce16).score("garden hose", cands), ref, rtol=0, atol=5e-2)


class _FakeCUDAGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture records the forward the Reranker runs
    under it, replay runs it again on the same static input buffer and writes the same static output,
    as a real graph does.  So the graph path's bookkeeping runs here: staging into the static
    buffers, one capture per bucket shape, replays, recapture when the weights move."""

    recording = None
    captures = 0

    def replay(self):
        with torch.inference_mode():
            self.out.copy_(self.forward())


def test_reranker_graph_path_bookkeeping_with_a_fake_graph_on_cpu(tiny_dir, monkeypatch):
    import contextlib

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode=None):
        assert _FakeCUDAGraph.recording is None, "one capture at a time"
        _FakeCUDAGraph.recording, _FakeCUDAGraph.captures = g, _FakeCUDAGraph.captures + 1
        try:
            yield
        finally:
            _FakeCUDAGraph.recording = None

    forward = Reranker._forward_static

    def recorded_forward(self, inputs, layout):
        out = forward(self, inputs, layout)
        g = _FakeCUDAGraph.recording
        if g is not None:
            g.forward, g.out = (lambda: forward(self, inputs, layout)), out
        return out

    monkeypatch.setattr(Reranker, "_forward_static", recorded_forward)
    monkeypatch.setattr(_FakeCUDAGraph, "captures", 0)
    for name, value in (("graph", graph), ("CUDAGraph", _FakeCUDAGraph), ("Stream", Stream),
                        ("graph_pool_handle", object), ("current_stream", lambda device=None: Stream()),
                        ("stream", lambda s: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)

    ce = CrossEncoder.from_pretrained(tiny_dir, device="cpu")
    rr = Reranker(ce, cuda_graphs=False, use_buckets=True)
    rr.cuda_graphs = True  # the graph branch, which the constructor keeps for CUDA
    rng = random.Random(5)
    cands = [text(rng, rng.randint(0, 150)) for _ in range(50)]
    pairs = [("garden hose", c) for c in cands]
    want = ce.predict(pairs)
    first = rr.score("garden hose", cands)
    np.testing.assert_allclose(first, want, rtol=0, atol=1e-5)
    n_graphs = len(rr._graphs)
    assert n_graphs >= 1 and _FakeCUDAGraph.captures == n_graphs
    np.testing.assert_array_equal(rr.score("garden hose", cands), first)  # replays only
    other = [" ".join(reversed(c.split())) for c in cands]  # same lengths: same buckets, new inputs
    np.testing.assert_allclose(rr.score("garden hose", other),
                               ce.predict([("garden hose", c) for c in other]), rtol=0, atol=1e-5)
    assert _FakeCUDAGraph.captures == n_graphs and len(rr._graphs) == n_graphs
    # A fuller query (another bucket) adds its own graph; the earlier ones stay.
    many = [text(rng, rng.randint(0, 150)) for _ in range(120)]
    np.testing.assert_allclose(rr.score("garden hose", many), ce.predict([("garden hose", c) for c in many]),
                               rtol=0, atol=1e-5)
    assert len(rr._graphs) > n_graphs and _FakeCUDAGraph.captures == len(rr._graphs)
    # An in-place weight edit (the version counter) and a refresh (new joined copies) recapture.
    v = ce.model.bert.encoder.layer[0].attention.self.value.weight
    for edit in (lambda: v.add_(torch.randn_like(v)), ce.refresh):
        before = _FakeCUDAGraph.captures
        with torch.no_grad():
            edit()
        np.testing.assert_allclose(rr.score("garden hose", cands), ce.predict(pairs), rtol=0, atol=1e-5)
        assert _FakeCUDAGraph.captures > before
    # Token ids as numpy arrays take the same path.
    arrays = [(np.asarray(ids), split) for ids, split in ce.encode_pairs(pairs)]
    np.testing.assert_allclose(rr.score_encoded(arrays), ce.predict(pairs), rtol=0, atol=1e-5)


def test_minilm_rankings_agree_with_hf_on_esci_validation_queries(minilm):
    """Every validation query of the default split, title + 64 attribute tokens: same order as HF."""
    from relsum_core.data import group_by_query, load_dataset, split_queries
    from relsum_core.text import product_text

    catalog, judgments = load_dataset()
    by_query = group_by_query(judgments)
    _, val_q = split_queries(list(by_query), 0.2, seed=0)
    assert len(val_q) == 22
    n_checked = 0
    for q in val_q:
        pairs = [(j.query, product_text(catalog[j.product_id], minilm.tokenizer, 64)) for j in by_query[q]]
        got = minilm.predict(pairs, batch_size=64)
        ref = hf_padded_reference(minilm.model, minilm, pairs)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
        # same order wherever HF separates two candidates by more than the tolerance
        i, k = np.triu_indices(len(ref), 1)
        clear = np.abs(ref[i] - ref[k]) > 2e-4
        assert np.array_equal(np.sign(got[i] - got[k])[clear], np.sign(ref[i] - ref[k])[clear]), q
        n_checked += int(clear.sum())
    assert n_checked > 10_000  # the order of (almost) every pair was compared


# ------------------------------------------------------------------ mutation-test additions
# (needs: from relsum_core.ranker import padded_pairs, _distinct_pairs)
def test_padded_pairs_layout_by_hand():
    """The padded [B, L] counterpart of PackedBatch: pad ids, type 1 from the doc on, padding type 0
    and masked out."""
    ids, types, mask = padded_pairs([([101, 5, 102, 7, 102], 3), ([101, 102, 102], 2)], pad_id=9)
    assert ids.tolist() == [[101, 5, 102, 7, 102], [101, 102, 102, 9, 9]]
    assert types.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert ids.dtype == types.dtype == mask.dtype == torch.int64


def test_counts_and_top_k_refuse_booleans(tiny):
    """True is an int to Python: batch_size=True or top_k=True is a mistake, not 1."""
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny.predict([("q", "d")], batch_size=True)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        tiny.predict([("q", "d")], max_tokens=True)
    with pytest.raises(ValueError, match="top_k"):
        tiny.rank("q", ["a", "b"], top_k=True)


def test_duplicates_are_pairs_with_the_same_ids_and_the_same_type_split(tiny):
    """Two pairs with equal token ids but token type 1 starting elsewhere are different inputs: each
    keeps its own score (as lists and as arrays), and only true copies share one."""
    (ids, split), = tiny.encode_pairs([("red running shoe", "waterproof jacket kitchen towel")])
    other = (ids, split + 2)  # same ids, the query "longer" by two tokens
    want = np.array([tiny.score_encoded([(ids, split)])[0], tiny.score_encoded([other])[0]])
    assert abs(want[0] - want[1]) > 1e-4  # the token types matter to this model
    for enc in ([(ids, split), (ids, split), other], [(np.asarray(ids), split), (np.asarray(ids), split),
                                                      (np.asarray(ids), split + 2)]):
        for scorer in (tiny.score_encoded, Reranker(tiny).score_encoded):
            np.testing.assert_allclose(scorer(enc), want[[0, 0, 1]], rtol=0, atol=1e-5)
    distinct, origin, inverse = _distinct_pairs([(ids, split), other, (ids, split), other])
    assert origin == [0, 1] and inverse.tolist() == [0, 1, 0, 1]  # each copy's first index


def test_a_bad_pair_listed_twice_is_named_by_its_first_place(tiny):
    good = tiny.encode_pairs([("q", "d")])[0]
    bad = ([*good[0][:-1], tiny.vocab_size], good[1])
    for scorer in (tiny.score_encoded, Reranker(tiny).score_encoded):
        with pytest.raises(ValueError, match=r"sequence 1 holds token ids outside"):
            scorer([good, bad, good, bad])


def test_token_id_zero_is_a_valid_id(tiny):
    """Id 0 ([PAD] in BERT vocabularies) is inside [0, vocab_size): scored, not refused."""
    ids = [tiny.tokenizer.cls_token_id, 0, tiny.tokenizer.sep_token_id, 0, tiny.tokenizer.sep_token_id]
    for scorer in (tiny.score_encoded, Reranker(tiny).score_encoded):
        assert np.isfinite(scorer([(ids, 3)])).all()


def test_many_tied_scores_keep_corpus_order(tiny):
    """Ties are broken by corpus_id however many there are (a small list sorts stably anyway)."""
    docs = ["same doc"] * 40 + ["garden hose"] * 40
    docs = [d for pair in zip(docs[:40], docs[40:]) for d in pair]  # interleaved
    for ranked in (tiny.rank("q", docs), Reranker(tiny).rerank("q", docs)):
        order = [r["corpus_id"] for r in ranked]
        assert order[:40] == sorted(order[:40]) and order[40:] == sorted(order[40:])
        assert len({r["score"] for r in ranked[:40]}) == 1


def test_batches_fill_a_batch_exactly_to_max_tokens(tiny):
    assert tiny._batches([3, 9, 5], 3, 14) == [[1, 2], [0]]  # 9 + 5 == 14 fits
    assert tiny._batches([4, 4, 4, 4], 4, 8) == [[0, 1], [2, 3]]


def test_plan_bucket_by_hand_edges():
    # one spare token, one spare sequence slot: a single dummy of one token
    lay = plan_bucket([5, 5, 5], (16, 32), (4, 8), (64,))
    assert (lay.tokens, lay.seqs, lay.max_seqlen, lay.dummy_lens) == (16, 4, 64, [1])
    # the sequence bucket asks for 7 dummies but only 5 tokens are spare: the next token bucket
    # that gives each dummy a token (>= 27 + 7 = 34), not 33
    lay = plan_bucket([3] * 9, (32, 33, 64), (16, 32), (64,))
    assert (lay.tokens, lay.seqs, lay.dummy_lens) == (64, 16, [6, 6, 5, 5, 5, 5, 5])


def test_geometric_buckets_are_distinct_where_steps_are_finer_than_the_multiple():
    # ratio 1.05 from 256: each step is < 64, so several land on one multiple of 64; listed once
    assert _geometric(256, 1024, 1.05, multiple=64) == tuple(range(256, 1025, 64))


def test_a_too_long_sequence_is_named_by_its_place(tiny):
    good = tiny.encode_pairs([("q", "d")])[0]
    too_long = (list(range(5, 5 + tiny.max_length + 1)), 2)
    for scorer in (tiny.score_encoded, Reranker(tiny).score_encoded):
        with pytest.raises(ValueError, match="sequence 1 has .* more than max_length"):
            scorer([good, too_long])


def test_a_checkpoint_without_tokenizer_files_is_refused(tiny_ranker_dir, tmp_path):
    """transformers would build an empty WordPiece tokenizer: every text one [UNK], every score alike."""
    import shutil

    bare = tmp_path / "weights_only"
    bare.mkdir()
    for f in tiny_ranker_dir.iterdir():
        if f.name not in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(f, bare / f.name)
    with pytest.raises(ValueError, match="has no tokenizer \\(tokenizer.json or vocab.txt\\)"):
        CrossEncoder.from_pretrained(bare, device="cpu")


def test_rank_checks_top_k_before_scoring(tiny, monkeypatch):
    def scored(*args, **kwargs):
        raise AssertionError("scored before checking top_k")

    monkeypatch.setattr(CrossEncoder, "predict", scored)
    monkeypatch.setattr(Reranker, "score", scored)
    for top_k in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="top_k must be a positive int"):
            tiny.rank("q", ["a", "b"], top_k=top_k)
        with pytest.raises(ValueError, match="top_k must be a positive int"):
            Reranker(tiny).rerank("q", ["a", "b"], top_k=top_k)
