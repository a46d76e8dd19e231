import math

import numpy as np
import pytest

from relsum_core.metrics import (
    dcg_at_k,
    gains_of,
    mean_ndcg,
    ndcg_at_k,
    paired_difference,
    per_query_ndcg,
    recall_at_precision,
)

L3 = math.log2(3)  # discount denominator at rank 2
L4 = 2.0  # rank 3


def test_esci_gains():
    assert gains_of([3, 2, 1, 0]).tolist() == [1.0, 0.1, 0.01, 0.0]
    assert gains_of([3, 2, 1, 0], "grade").tolist() == [3.0, 2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="no ESCI gain"):
        gains_of([4])
    with pytest.raises(ValueError, match="grade 2.7 has no ESCI gain"):
        gains_of([3, 2.7])  # not read as grade 2
    assert gains_of(np.array([3, 0])).tolist() == [1.0, 0.0]  # numpy integers and 3.0 are grades
    assert gains_of([3.0]).tolist() == [1.0]
    with pytest.raises(ValueError, match="unknown gain scheme"):
        gains_of([1], "exp")


def test_perfect_order_is_one():
    assert ndcg_at_k([3.0, 2.0, 1.0], [3, 2, 0], k=10) == pytest.approx(1.0)


def test_reversed_order_by_hand():
    # ranked I, S, E: DCG = 0 + 0.1/log2(3) + 1.0/2 ; IDCG = 1.0 + 0.1/log2(3)
    dcg = 0.1 / L3 + 1.0 / L4
    idcg = 1.0 + 0.1 / L3
    assert ndcg_at_k([1.0, 2.0, 3.0], [3, 2, 0], k=10) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.529675, abs=1e-6)


def test_cutoff_k():
    # k=1 and the E candidate ranked second: only the I at rank 1 counts
    assert ndcg_at_k([2.0, 1.0], [0, 3], k=1) == 0.0
    # k=2: DCG = 1/log2(3), IDCG = 1
    assert ndcg_at_k([2.0, 1.0], [0, 3], k=2) == pytest.approx(1 / L3)


def test_plain_grades_option():
    # I first, E second, plain gains: DCG = 3/log2(3), IDCG = 3
    assert ndcg_at_k([1.0, 0.0], [0, 3], k=5, gains="grade") == pytest.approx(1 / L3)
    # S first, E second: ESCI gains punish it far more than plain grades
    esci = ndcg_at_k([1.0, 0.0], [2, 3], k=5)
    plain = ndcg_at_k([1.0, 0.0], [2, 3], k=5, gains="grade")
    assert esci == pytest.approx((0.1 + 1.0 / L3) / (1.0 + 0.1 / L3))
    assert plain == pytest.approx((2 + 3 / L3) / (3 + 2 / L3))
    assert esci < plain


def test_ties_are_averaged_not_ordered():
    # two tied candidates E and I: each position gets the mean gain 0.5
    expected = 0.5 * (1.0 + 1.0 / L3)
    assert ndcg_at_k([0.0, 0.0], [3, 0], k=10) == pytest.approx(expected)
    assert ndcg_at_k([0.0, 0.0], [0, 3], k=10) == pytest.approx(expected)
    # a tie straddling the cutoff: k=1 sees half of the E
    assert ndcg_at_k([0.0, 0.0], [0, 3], k=1) == pytest.approx(0.5)
    # tie block after a clear winner: ranks 2..3 share (0.1 + 0) / 2
    dcg = dcg_at_k([5.0, 1.0, 1.0], gains_of([3, 2, 0]), k=10)
    assert dcg == pytest.approx(1.0 + 0.05 / L3 + 0.05 / L4)


def test_constant_scorer_is_expected_random_order():
    rng = np.random.default_rng(0)
    grades = [3, 3, 2, 1, 0, 0, 2]
    g = gains_of(grades)
    idcg = dcg_at_k(g, g, 5)
    perms = [rng.permutation(len(g)) for _ in range(20000)]
    mc = np.mean([dcg_at_k(-np.arange(len(g), dtype=float), g[p], 5) for p in perms]) / idcg
    assert ndcg_at_k([1.0] * len(g), grades, 5) == pytest.approx(mc, abs=5e-3)


def test_no_positive_gain_is_nan_and_skipped_in_mean():
    assert math.isnan(ndcg_at_k([1.0, 2.0], [0, 0], k=10))
    scores = {"a": [3.0, 2.0], "b": [1.0, 2.0], "c": [2.0, 1.0]}
    grades = {"a": [3, 0], "b": [3, 0], "c": [0, 0]}
    per_q = per_query_ndcg(scores, grades, 10)
    assert per_q["a"] == pytest.approx(1.0) and per_q["b"] == pytest.approx(1 / L3)
    assert math.isnan(per_q["c"])
    mean, n = mean_ndcg(scores, grades, 10)
    assert n == 2 and mean == pytest.approx((1.0 + 1 / L3) / 2)


def test_bad_input():
    with pytest.raises(ValueError, match="equally long"):
        ndcg_at_k([1.0], [3, 2], k=5)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k([1.0], [3], k=0)
    with pytest.raises(ValueError, match="NaN"):
        ndcg_at_k([float("nan"), 1.0], [3, 2], k=5)
    with pytest.raises(ValueError, match="no scores"):
        per_query_ndcg({"a": [1.0]}, {"a": [3], "b": [2]}, 5)


def test_paired_difference_by_hand():
    ours = {"a": 0.9, "b": 0.5, "c": 0.7, "d": math.nan}
    theirs = {"a": 0.6, "b": 0.6, "c": 0.7, "d": 0.4}
    d = paired_difference(ours, theirs)
    # differences +0.3, -0.1, 0 ("d" is undefined for ours and skipped)
    assert d["n"] == 3 and (d["wins"], d["ties"], d["losses"]) == (1, 1, 1)
    assert d["mean"] == pytest.approx(0.2 / 3)
    assert d["se"] == pytest.approx(np.std([0.3, -0.1, 0.0], ddof=1) / math.sqrt(3))


def test_paired_difference_edges():
    one = paired_difference({"a": 0.5}, {"a": 0.25})
    assert one["mean"] == 0.25 and math.isnan(one["se"]) and one["n"] == 1
    none = paired_difference({"a": math.nan}, {"a": 0.1})
    assert none["n"] == 0 and math.isnan(none["mean"])
    with pytest.raises(ValueError, match="different queries"):
        paired_difference({"a": 0.5}, {"b": 0.5})


def test_ideal_dcg_is_cut_at_k():
    # two exact matches but k=1: the ideal list holds only one of them
    assert ndcg_at_k([1.0, 0.0], [3, 3], k=1) == pytest.approx(1.0)
    # E, I, E with k=2: DCG = 1, IDCG@2 = 1 + 1/log2(3) (the third E is beyond the cutoff)
    assert ndcg_at_k([2.0, 1.0, 0.0], [3, 0, 3], k=2) == pytest.approx(1 / (1 + 1 / L3))


def test_per_query_and_mean_pass_the_gain_scheme_on():
    scores, grades = {"a": [1.0, 0.0]}, {"a": [2, 3]}
    plain = (2 + 3 / L3) / (3 + 2 / L3)
    assert per_query_ndcg(scores, grades, 5, gains="grade")["a"] == pytest.approx(plain)
    assert mean_ndcg(scores, grades, 5, gains="grade") == (pytest.approx(plain), 1)


def test_paired_difference_tie_boundary_and_theirs_undefined():
    # differences +0.25, +0.5, -0.25 with tie=0.25: |d| <= tie is a tie, so 1 win, 2 ties, 0 losses
    d = paired_difference({"a": 0.5, "b": 0.75, "c": 0.0}, {"a": 0.25, "b": 0.25, "c": 0.25}, tie=0.25)
    assert (d["wins"], d["ties"], d["losses"], d["n"]) == (1, 2, 0, 3)
    # an undefined NDCG on the baseline's side is skipped as well
    d = paired_difference({"a": 0.5, "b": 0.2}, {"a": math.nan, "b": 0.1})
    assert d["n"] == 1 and d["mean"] == pytest.approx(0.1)
    # one scorer covering a strict subset of the other's queries is refused too
    with pytest.raises(ValueError, match="different queries"):
        paired_difference({"a": 0.5}, {"a": 0.5, "b": 0.1})


def test_recall_at_precision_just_below_target():
    # 7 positives, a negative, a positive: cutting after 9 gives precision 8/9 < 0.9, so the best
    # threshold stops after the 7th (recall 7/8)
    scores = [1.0 - i / 10 for i in range(9)]
    assert recall_at_precision(scores, [True] * 7 + [False, True], 0.9) == pytest.approx(7 / 8)


def test_recall_at_precision_shape_mismatch():
    with pytest.raises(ValueError, match="must have one shape"):
        recall_at_precision([1.0, 0.5], [True, False, True])
    with pytest.raises(ValueError, match="must have one shape"):
        recall_at_precision([1.0, 0.5], [[True], [False]])
