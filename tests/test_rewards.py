import math

import numpy as np
import pytest

from relsum_core.data import Judgment, Product
from relsum_core.metrics import ndcg_at_k
from relsum_core.rewards import (
    RankerReward,
    RewardConfig,
    content_words,
    decoupled_advantages,
    group_advantages,
)


def overlap_scorer(calls):
    """Score = number of query words in the doc: hand-checkable, and it records every call."""
    def score(pairs):
        calls.append(list(pairs))
        return np.array([float(len(set(q.split()) & set(d.lower().replace("|", " ").split())))
                         for q, d in pairs])
    return score


CATALOG = {
    "a": Product("a", "Acme bottle", bullets=("stainless steel", "holds water")),
    "b": Product("b", "Bolt shirt", bullets=("cotton",)),
    "c": Product("c", "Cozy blanket", description="fleece throw"),
}
JUDGED = [
    Judgment("q1", "steel water bottle", "a", 3),
    Judgment("q1", "steel water bottle", "b", 0),
    Judgment("q1", "steel water bottle", "c", 0),
    Judgment("q2", "fleece blanket", "c", 3),
]


def _reward(**cfg):
    calls = []
    return RankerReward(overlap_scorer(calls), CATALOG, JUDGED, RewardConfig(**cfg)), calls


def test_relevance_uses_sigmoid_and_grade_weights():
    r, _ = _reward()
    out = r(["a", "b"], ["steel water", "steel water"], [2, 2])
    # "a" title+summary holds "bottle steel water" -> 3 overlaps, grade 3 weight +1
    assert out["relevance"][0] == pytest.approx(1 / (1 + math.exp(-3)))
    # "b" is irrelevant (weight -1) to the same query: the same summary is punished
    assert out["relevance"][1] == pytest.approx(-1 / (1 + math.exp(-2)))


def test_ranking_is_ndcg_delta_with_other_candidates_fixed():
    r, _ = _reward()
    out = r(["a"], ["steel water"], [2])
    # title-only scores for q1: a "Acme bottle" -> 1, b -> 0, c -> 0; a already ranks first, so
    # making it score 3 cannot raise NDCG.
    assert out["ranking"][0] == pytest.approx(0.0)
    out = r(["b"], ["steel water bottle"], [3])
    base = ndcg_at_k([1, 0, 0], [3, 0, 0], 10)
    worse = ndcg_at_k([1, 3, 0], [3, 0, 0], 10)  # the irrelevant b now outranks a
    assert out["ranking"][0] == pytest.approx(worse - base) and worse < base


def test_budget_penalty_and_faithfulness():
    r, _ = _reward(budget_tokens=4)
    out = r(["c", "c"], ["fleece throw, warm", "fleece"], [6, 3])
    assert out["budget"].tolist() == [pytest.approx(-0.5), 0.0]
    # content words of the first: fleece throw warm -> 2 of 3 in the product's text
    assert out["faithfulness"][0] == pytest.approx(2 / 3)
    assert out["faithfulness"][1] == 1.0
    assert r.faithfulness("c", "the and of") == 0.0  # no content words at all


def test_total_is_the_weighted_sum_and_one_ranker_call_per_batch():
    r, calls = _reward(relevance=2.0, ranking=0.0, budget=1.0, faithfulness=0.25, novelty=0.5)
    out = r(["a", "c", "a"], ["steel", "fleece", "blue"], [1, 1, 40])
    expect = 2.0 * out["relevance"] + 1.0 * out["budget"] + 0.25 * out["faithfulness"] + 0.5 * out["novelty"]
    assert out["novelty"].tolist() == [1 / 16, 1 / 16, 0.0]  # one new word against a 16-word floor
    assert np.allclose(out["total"], expect)
    # one call for the title-only scores of q1 and q2, one for the batch: a and a judged for q1,
    # c for q1 and q2
    assert len(calls) == 2 and len(calls[1]) == 4
    r(["b"], ["x"], [1])
    assert len(calls) == 3  # title-only scores are cached


def test_content_words():
    words = content_words("The 2 Stainless-steel bottles, for kids!")
    assert words == ["2", "stainless", "steel", "bottles", "kids"]


def test_reward_bad_input():
    r, _ = _reward()
    with pytest.raises(ValueError, match="empty batch"):
        r([], [], [])
    with pytest.raises(ValueError, match="equally long"):
        r(["a"], ["x", "y"], [1])
    with pytest.raises(ValueError, match="unknown product"):
        r(["zzz"], ["x"], [1])
    with pytest.raises(ValueError, match="unknown product"):
        RankerReward(overlap_scorer([]), CATALOG, [Judgment("q", "x", "nope", 1)])
    with pytest.raises(ValueError, match="budget_tokens"):
        RewardConfig(budget_tokens=0)


def test_group_advantages_hand_worked():
    adv = group_advantages([1.0, 3.0, 5.0, 2.0, 2.0, 2.0], 3)
    # group 1: mean 3, unbiased std 2 -> (-1, 0, 1); group 2: all equal -> 0
    assert np.allclose(adv, [-1, 0, 1, 0, 0, 0], atol=1e-4)
    assert np.allclose(group_advantages([1.0, 3.0], 2, scale=False), [-1, 1])
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages([1.0, 2.0, 3.0], 2)


def test_novelty_counts_distinct_words_the_title_lacks_and_the_product_has_per_word():
    r, _ = _reward(budget_tokens=4)  # no fewer than 2 words in the denominator
    assert r.novelty("a", "Acme bottle") == 0.0  # a copy of the title tells the ranker nothing new
    assert r.novelty("a", "stainless steel") == 1.0  # both from the bullets
    # stainless steel steel bottle purple -> 2 distinct new true words of 5
    assert r.novelty("a", "stainless steel, steel bottle, purple") == pytest.approx(2 / 5)
    # the same attributes in a sentence: function words dilute them
    assert r.novelty("a", "it is made of stainless steel") == pytest.approx(2 / 6)
    assert r.novelty("a", "") == 0.0
    # one true new word is not a whole summary: the denominator never drops below K/2 words
    assert r.novelty("a", "steel") == pytest.approx(1 / 2)
    assert _reward(budget_tokens=32)[0].novelty("a", "stainless steel") == pytest.approx(2 / 16)


def test_decoupled_advantages_give_each_component_its_own_scale():
    # In each group relevance moves by 0.01 and faithfulness by 0.5, in opposite directions.
    comps = {"relevance": np.array([0.51, 0.50, 0.30, 0.31]), "faithfulness": np.array([0.0, 0.5, 1.0, 0.5])}
    total = comps["relevance"] + 0.5 * comps["faithfulness"]
    # normalising the sum lets faithfulness decide every sign ...
    assert np.sign(group_advantages(total, 2)).tolist() == [-1, 1, 1, -1]
    # ... while with each component normalised first, relevance (weight 1) beats faithfulness (0.5)
    adv = decoupled_advantages(comps, {"relevance": 1.0, "faithfulness": 0.5}, 2)
    assert np.sign(adv).tolist() == [1, -1, -1, 1]
    assert np.allclose(np.abs(adv), np.abs(adv[0]))  # every z-score is +-1 in groups of 2
    # a component equal across a group adds nothing; weight 0 drops it; all-zero weights are an error
    flat = decoupled_advantages({**comps, "budget": np.array([-1.0, -1.0, 0.0, 0.0])},
                                {"relevance": 1.0, "faithfulness": 0.5, "budget": 1.0}, 2)
    assert np.allclose(flat / flat[0], adv / adv[0])  # the same up to the fixed divisor
    with pytest.raises(ValueError, match="all reward weights are 0"):
        decoupled_advantages(comps, {"relevance": 0.0}, 2)


# Two queries with two or more candidates each, so one title-score call covers both and slicing it
# per query matters; product c is judged for both.
CATALOG2 = {**CATALOG, "d": Product("d", "Fleece blanket", bullets=("wool",))}
JUDGED2 = JUDGED + [Judgment("q2", "fleece blanket", "d", 0)]


def test_title_scores_are_sliced_per_query_from_one_call():
    calls = []
    r = RankerReward(overlap_scorer(calls), CATALOG2, JUDGED2)
    r(["a", "d"], ["x", "x"], [1, 1])
    assert len(calls[0]) == 5  # q1's three titles and q2's two, in one call
    # q1: a "Acme bottle" 1, b 0, c 0; q2: c "Cozy blanket" 1, d "Fleece blanket" 2
    assert r._title_scores["q1"].tolist() == [1.0, 0.0, 0.0]
    assert r._title_scores["q2"].tolist() == [1.0, 2.0]


def test_relevance_and_ranking_average_over_the_products_queries():
    r = RankerReward(overlap_scorer([]), CATALOG2, JUDGED2)
    out = r(["c"], ["steel fleece"], [2])
    # "Cozy blanket | steel fleece": q1 (c is grade 0) overlaps 1 word, q2 (grade 3) 2 words
    sig1, sig2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))
    assert out["relevance"][0] == pytest.approx((-sig1 + sig2) / 2)
    d1 = ndcg_at_k([1, 0, 1], [3, 0, 0], 10) - ndcg_at_k([1, 0, 0], [3, 0, 0], 10)  # c ties a: worse
    d2 = ndcg_at_k([2, 2], [3, 0], 10) - ndcg_at_k([1, 2], [3, 0], 10)  # c ties d: better
    assert d1 < 0 < d2
    assert out["ranking"][0] == pytest.approx((d1 + d2) / 2)


def test_faithfulness_counts_title_words_and_novelty_does_not():
    r, _ = _reward()
    assert r.faithfulness("a", "Acme bottle") == 1.0  # the product's own title is faithful
    steel = RankerReward(overlap_scorer([]), {"s": Product("s", "Steel bottle", bullets=("steel", "blue"))},
                         [Judgment("q", "steel", "s", 3)], RewardConfig(budget_tokens=2))
    assert steel.novelty("s", "steel") == 0.0  # in the bullets, but the title already says it
    assert steel.novelty("s", "blue") == 1.0


def test_decoupled_advantages_scale_by_the_weights_norm():
    comps = {"relevance": np.array([0.2, 0.4, 0.9, 0.1]), "faithfulness": np.array([1.0, 0.0, 0.3, 0.8])}
    adv = decoupled_advantages(comps, {"relevance": 1.0, "faithfulness": 0.5}, 2)
    want = (group_advantages(comps["relevance"], 2) + 0.5 * group_advantages(comps["faithfulness"], 2))
    np.testing.assert_allclose(adv, want / math.sqrt(1.0 + 0.25), rtol=1e-12)


def test_titles_are_cut_to_the_rankers_title_budget_as_in_training():
    from transformers import AutoTokenizer

    from relsum_core.text import TITLE_TOKENS, product_text, summary_text
    from relsum_core.trainers.ranker import default_base

    tok = AutoTokenizer.from_pretrained(default_base())
    long_title = " ".join(f"word{i}" for i in range(100))  # ~200 tokens
    catalog = {**CATALOG, "a": Product("a", long_title, bullets=("stainless steel",))}
    calls = []
    r = RankerReward(overlap_scorer(calls), catalog, JUDGED, tokenizer=tok)
    r(["a"], ["steel water"], [2])
    cut = product_text(catalog["a"], tok, 0)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) == TITLE_TOKENS
    texts = [d for call in calls for _, d in call]
    assert cut in texts and f"{cut} | steel water" in texts  # title-only and title | summary alike
    assert summary_text(long_title, " steel\n water ", tok) == f"{cut} | steel water"  # the serving rule
    assert not any(long_title in d for d in texts)
    # without the ranker's tokenizer, the whole title
    calls.clear()
    RankerReward(overlap_scorer(calls), catalog, JUDGED)(["a"], ["steel water"], [2])
    assert f"{long_title} | steel water" in [d for call in calls for _, d in call]


def test_scorer_output_is_checked_and_extreme_logits_do_not_overflow():
    def constant(value, shape=None):
        def score(pairs):
            out = np.full(len(pairs), value, dtype=np.float64)
            return out.reshape(shape(len(pairs))) if shape else out
        return score

    # a logit below -709 overflowed math.exp(-s); the logistic saturates instead
    out = RankerReward(constant(-800.0), CATALOG, JUDGED)(["a", "b"], ["x", "x"], [1, 1])
    assert out["relevance"][0] == 0.0 and np.isfinite(out["total"]).all()
    out = RankerReward(constant(800.0), CATALOG, JUDGED)(["a", "b"], ["x", "x"], [1, 1])
    assert out["relevance"].tolist() == [1.0, -1.0]
    # a raw [N, 1] head output is one score per pair
    out = RankerReward(constant(2.0, lambda n: (n, 1)), CATALOG, JUDGED)(["a"], ["x"], [1])
    assert out["relevance"][0] == pytest.approx(1 / (1 + math.exp(-2)))
    for scorer, message in ((lambda pairs: np.zeros(len(pairs) - 1), r"shape \(2,\) for 3 pairs"),
                            (lambda pairs: np.zeros((len(pairs), 2)), r"shape \(3, 2\) for 3 pairs"),
                            (constant(float("nan")), "NaN for 3 of 3 pairs")):
        with pytest.raises(ValueError, match=message):
            RankerReward(scorer, CATALOG, JUDGED)(["a"], ["x"], [1])


def test_faithfulness_and_novelty_read_words_of_any_script():
    """A French, German or Japanese summary made of the product's own words is faithful (the ASCII
    word rule cut "réglable" to "glable" and found no word in Japanese: faithfulness 0)."""
    catalog = {
        "fr": Product("fr", "Pied de lampe réglable", bullets=("Laiton brossé, hauteur 120 cm",)),
        "de": Product("de", "Topf spülmaschinenfest", description="Edelstahl, 3 Liter"),
        "ja": Product("ja", "高品質ステンレス包丁", bullets=("刃渡り１７０ｍｍ、重さ150g",)),
    }
    judged = [Judgment("q", "lampe", pid, 3 if pid == "fr" else 0) for pid in catalog]
    r = RankerReward(overlap_scorer([]), catalog, judged, RewardConfig(budget_tokens=4))
    assert r.faithfulness("fr", "laiton brossé réglable") == 1.0
    assert r.faithfulness("fr", "laiton glable") == 0.5
    assert r.novelty("fr", "Laiton brossé") == 1.0  # both from the bullets, neither in the title
    assert r.faithfulness("de", "Spülmaschinenfest, Edelstahl") == 1.0
    assert r.faithfulness("ja", "高品質 ステンレス 包丁") == 1.0  # bigrams of the title's run
    assert r.faithfulness("ja", "170mm 150g") == 1.0  # full-width digits read as ASCII
    assert r.faithfulness("ja", "木製 まな板") < 0.2  # words the product does not have
    assert r.novelty("ja", "刃渡り") > 0 and r.novelty("ja", "包丁") == 0.0
    assert content_words("à la crème") == ["la", "crème"]  # a lone Latin letter is not a content word
    assert content_words("鍋") == ["鍋"]  # a lone kanji is


def test_ndcg_k_below_one_is_refused():
    with pytest.raises(ValueError, match="ndcg_k"):
        RewardConfig(ndcg_k=0)


def test_faithfulness_counts_every_word_not_each_distinct_word():
    r, _ = _reward()
    assert r.faithfulness("c", "fleece fleece fleece purple") == pytest.approx(3 / 4)


def test_novelty_floor_is_half_the_budget_rounded_down():
    r, _ = _reward(budget_tokens=5)  # a floor of 2 words, not 3
    assert r.novelty("a", "steel") == pytest.approx(1 / 2)


def test_brand_and_colour_are_the_products_own_words():
    p = Product("p", "Water bottle", brand="Hydra", color="Navy blue")
    r = RankerReward(overlap_scorer([]), {"p": p}, [Judgment("q", "bottle", "p", 3)],
                     RewardConfig(budget_tokens=2))
    assert r.faithfulness("p", "hydra navy") == 1.0
    assert r.novelty("p", "hydra navy") == 1.0


def test_title_markup_is_not_a_title_word():
    # "&amp;" in a title is "&", no word "amp" of the product
    p = Product("p", "Salt &amp; pepper mill", bullets=("ceramic",))
    r = RankerReward(overlap_scorer([]), {"p": p}, [Judgment("q", "mill", "p", 3)])
    assert r.faithfulness("p", "amp") == 0.0
    assert r.faithfulness("p", "salt pepper ceramic") == 1.0


def test_a_product_without_judged_queries_is_refused():
    # its relevance would be the mean of nothing, NaN
    catalog = {**CATALOG, "z": Product("z", "Zed lamp")}
    r = RankerReward(overlap_scorer([]), catalog, JUDGED)
    with pytest.raises(ValueError, match="product z has no judged query"):
        r(["z"], ["x"], [1])


def test_a_grade_without_a_weight_counts_zero():
    r, _ = _reward(grade_weights={3: 1.0})
    assert r(["b"], ["steel water"], [2])["relevance"][0] == 0.0  # b is grade 0 for q1


def test_ranking_of_a_product_only_in_queries_without_relevant_candidates_is_zero():
    # such a query has no NDCG (all gains 0): no NaN delta is averaged in
    catalog = {**CATALOG, "d": Product("d", "Wool socks")}
    judged = JUDGED + [Judgment("q3", "wool socks", "d", 0)]
    out = RankerReward(overlap_scorer([]), catalog, judged)(["d"], ["wool"], [1])
    assert out["ranking"][0] == 0.0 and np.isfinite(out["total"]).all()


def test_total_weighs_every_component():
    # ranking included: test_total_is_the_weighted_sum_and_one_ranker_call_per_batch weighs it 0
    r, _ = _reward()
    out = r(["b"], ["steel water bottle"], [3])
    assert out["ranking"][0] < 0
    cfg = RewardConfig()
    components = ("relevance", "ranking", "budget", "faithfulness", "novelty")
    want = sum(getattr(cfg, c) * out[c] for c in components)
    assert np.allclose(out["total"], want)


def test_groups_of_one_sample_have_zero_advantage():
    # a group of one has no std (NaN with ddof=1): nothing to scale
    with np.errstate(all="ignore"):
        adv = group_advantages([1.0, 5.0], 1)
    assert adv.tolist() == [0.0, 0.0]
    assert math.isfinite(adv.sum())
