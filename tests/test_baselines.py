import math

import numpy as np
import pytest

from relsum_core.baselines import CosineScorer, bm25_scores
from relsum_core.metrics import ndcg_at_k
from relsum_core.trainers.ranker import default_base


def test_bm25_prefers_matching_terms():
    docs = ["Red running shoes for men", "Blue cotton kitchen towels", "Running socks, red"]
    s = bm25_scores("red running shoes", docs)
    assert s.shape == (3,)
    assert s[0] > s[2] > s[1] == 0.0


def test_bm25_no_match_ties_and_empty():
    s = bm25_scores("zebra", ["red shoe", "blue towel"])
    assert s.tolist() == [0.0, 0.0]  # NDCG then averages the tie instead of trusting input order
    assert ndcg_at_k(s, [0, 3], 10) == pytest.approx(ndcg_at_k(s, [3, 0], 10))
    assert bm25_scores("the of", ["red shoe"]).tolist() == [0.0]  # stop words only
    assert bm25_scores("red", []).shape == (0,)


@pytest.fixture(scope="module")
def cosine():
    return CosineScorer.from_pretrained(default_base())


def test_cosine_embeddings_are_unit_and_order_kept(cosine):
    texts = ["red running shoes", "stainless steel kitchen towel rack", "a"]
    e = cosine.embed(texts, batch_size=2)
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(cosine.embed(texts[1:2])[0], e[1], atol=1e-5)  # padding does not leak


def test_cosine_ranks_related_text_first(cosine):
    s = cosine.scores("running shoes", ["Nike men's running shoe", "Cotton kitchen towels, 6 pack"])
    assert s[0] > s[1]
    assert cosine.scores("q", []).shape == (0,)


def test_cosine_truncates_to_the_models_position_table():
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(default_base())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, max_position_embeddings=40))
    scorer = CosineScorer(model, tok)  # asks for 256 tokens; the model has 40 positions
    assert scorer.max_length == 40
    assert np.isfinite(scorer.scores("red shoe", ["word " * 300, "red shoe"])).all()


def test_cosine_refuses_a_tokenizer_larger_than_the_encoders_vocabulary():
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(default_base())
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(ValueError, match="30522 tokens, more than the encoder's vocabulary of 1000"):
        CosineScorer(model, tok)


def test_bm25_length_normalisation_and_saturation_follow_b_and_k1():
    docs = ["red shoe", "red red shoe", "red shoe blue towel kitchen"]
    flat = bm25_scores("red", docs, k1=1.5, b=0.0)  # no length normalisation: tf decides
    assert flat[1] > flat[0] == pytest.approx(flat[2])
    norm = bm25_scores("red", docs, k1=1.5, b=0.75)  # the longer doc with the same tf scores lower
    assert norm[0] > norm[2]


def test_cosine_mean_pooling_ignores_padding(cosine):
    short = cosine.embed(["red shoe"])[0]
    padded = cosine.embed(["red shoe", "a much longer text about stainless steel kitchen towel racks"])[0]
    np.testing.assert_allclose(padded, short, atol=1e-5)


# ---------------------------------------------------------------- from mutation testing
def _hand_bm25(query_terms, doc_terms, k1, b):
    """Lucene BM25, written out: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    tf part = tf / (tf + k1 * (1 - b + b * |d| / avgdl))  (no (k1 + 1) factor in Lucene's variant)."""
    n = len(doc_terms)
    avgdl = sum(map(len, doc_terms)) / n
    out = []
    for d in doc_terms:
        s = 0.0
        for t in query_terms:
            df = sum(t in x for x in doc_terms)
            tf = d.count(t)
            s += math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return out


def test_bm25_matches_a_hand_computation():
    # kills B01 (k1 default), B02 (b default), B07 (no stemmer), B12 (float32), and B03-B05/B13
    pytest.importorskip("Stemmer")
    docs = ["Running shoes for the marathon", "shoe rack", "red running shoe, red laces", "kitchen towel"]
    # what the English stop words and the Snowball stemmer leave of each document
    terms = [["run", "shoe", "marathon"], ["shoe", "rack"], ["red", "run", "shoe", "red", "lace"],
             ["kitchen", "towel"]]
    s = bm25_scores("running shoes", docs)  # defaults: k1 1.5, b 0.75
    assert s.dtype == np.float64 and s.shape == (4,)
    np.testing.assert_allclose(s, _hand_bm25(["run", "shoe"], terms, 1.5, 0.75), rtol=1e-5)
    np.testing.assert_allclose(bm25_scores("running shoes", docs, k1=1.2, b=0.5),
                               _hand_bm25(["run", "shoe"], terms, 1.2, 0.5), rtol=1e-5)
    # case and punctuation do not matter; a term twice in a document saturates through k1
    np.testing.assert_allclose(bm25_scores("RED!", docs), _hand_bm25(["red"], terms, 1.5, 0.75), rtol=1e-5)


def test_bm25_ignores_english_stop_words_in_query_and_documents():
    # kills B06 (stopwords=None): "the" would match the first document
    s = bm25_scores("the red shoe", ["the the the towel", "red shoe"])
    assert s[0] == 0.0 and s[1] > 0.0


def test_bm25_empty_and_punctuation_only_text_ties():
    # kills B09 (an all-empty corpus reached bm25s, which raises on an empty vocabulary)
    for docs in (["", ""], ["!!!", "..."], ["a", "", "?"]):  # nothing left after tokenising
        s = bm25_scores("red shoe", docs)
        assert s.dtype == np.float64 and s.tolist() == [0.0] * len(docs)
    for query in ("", "   ", "?!", "a"):  # an empty query, punctuation or a 1-letter word: no terms
        assert bm25_scores(query, ["red shoe", "blue towel"]).tolist() == [0.0, 0.0]
    # an empty document among others scores 0 and counts in the average length
    s = bm25_scores("red", ["", "red"], k1=1.5, b=0.75)
    assert s[0] == 0.0
    assert s[1] == pytest.approx(math.log(2) / (1 + 1.5 * (0.25 + 0.75 * 1 / 0.5)), rel=1e-5)


def test_cosine_scores_are_one_per_document(tiny_base):
    # kills B18 (an (n, 1) column instead of n scores)
    scorer = CosineScorer.from_pretrained(str(tiny_base))
    s = scorer.scores("red shoe", ["red shoe", "blue towel", "steel bottle"])
    assert s.shape == (3,) and s.dtype == np.float64
    assert s[0] == pytest.approx(1.0, abs=1e-5)  # the query's own text: cosine 1


def test_cosine_embeddings_are_the_masked_mean_of_the_last_hidden_state(tiny_base):
    # kills B22 (a token left out of the mean); B23 (sum, not mean) is equivalent after normalising
    import torch

    scorer = CosineScorer.from_pretrained(str(tiny_base))
    texts = ["red shoe", "a much longer text about steel kitchen towel racks"]
    enc = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = scorer.model(**enc).last_hidden_state
    want = []
    for row, mask in zip(hidden, enc["attention_mask"]):
        mean = row[mask.bool()].mean(0)
        want.append((mean / mean.norm()).numpy())
    np.testing.assert_allclose(scorer.embed(texts), np.stack(want), atol=1e-5)


def test_cosine_scorer_puts_a_training_mode_model_in_eval_mode(tiny_base):
    # kills B19: a model built or loaded in training mode kept its dropout on, so the same text
    # embedded twice gave two embeddings
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(tiny_base).train()
    scorer = CosineScorer(model, AutoTokenizer.from_pretrained(tiny_base))
    texts = ["red running shoe with laces", "blue towel"]
    np.testing.assert_array_equal(scorer.embed(texts), scorer.embed(texts))


def test_cosine_from_pretrained_names_a_bad_folder_and_keeps_max_length(tmp_path, tiny_base):
    # kills B20 (the folder not named) and B21 (max_length dropped)
    with pytest.raises(ValueError, match=f"{tmp_path}: cannot load the encoder"):
        CosineScorer.from_pretrained(str(tmp_path))  # an empty folder: no config.json
    assert CosineScorer.from_pretrained(str(tiny_base), max_length=16).max_length == 16
