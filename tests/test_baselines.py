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
