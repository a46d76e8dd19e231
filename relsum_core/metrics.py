"""Ranking metrics over graded judgments: NDCG@k, per query and averaged.

Definition::

    DCG@k  = sum_{r=1..k} gain(grade at rank r) / log2(r + 1)
    NDCG@k = DCG@k / IDCG@k      (IDCG: the same judged candidates sorted by gain)

* Gains: ``"esci"`` (default) uses the ESCI paper's gains E 1.0, S 0.1, C 0.01, I 0, so an exact
  match is what counts; ``"grade"`` uses the plain grade 3/2/1/0 as the gain.
* Ties in score are averaged over every order of the tied candidates (McSherry & Najork 2008):
  each tied block takes its mean gain at each of the positions it spans.  So the input order never
  helps or hurts a scorer, and a constant scorer gets the expected NDCG of a random order.  BM25,
  which gives many candidates the score 0, needs this to be compared fairly.
* A query whose candidates all have gain 0 has no defined NDCG: its value is NaN and the mean
  skips it (``mean_ndcg`` reports how many queries it averaged).

``recall_at_precision``: the recall a single score threshold over all pairs (of every query) reaches
at a given precision, ReLSum's "recall at 90% precision".  Unlike NDCG it needs scores that mean the
same across queries: a ranker trained only listwise gets close to 0 here whatever its NDCG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from relsum_core.data import ESCI_GRADES

ESCI_GAINS = {3: 1.0, 2: 0.1, 1: 0.01, 0: 0.0}
# Recall at 90% precision: exact matches (E) are the positives.
POSITIVE_GRADE = ESCI_GRADES["E"]
PRECISION_TARGET = 0.9
GAIN_SCHEMES = ("esci", "grade")


def gains_of(grades: Sequence[int], scheme: str = "esci") -> np.ndarray:
    if scheme == "esci":
        out = []
        for g in grades:  # ESCI_GAINS[int(2.7)] would quietly read grade 2
            if g not in ESCI_GAINS:
                raise ValueError(f"grade {g} has no ESCI gain (grades are the integers 0..3)")
            out.append(ESCI_GAINS[g])
        return np.array(out, dtype=np.float64)
    if scheme == "grade":
        return np.asarray(grades, dtype=np.float64)
    raise ValueError(f"unknown gain scheme {scheme!r}; choose one of {GAIN_SCHEMES}")


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def dcg_at_k(scores: Sequence[float], gains: Sequence[float], k: int) -> float:
    """Tie-averaged DCG@k of candidates ranked by descending score."""
    scores = np.asarray(scores, dtype=np.float64)
    gains = np.asarray(gains, dtype=np.float64)
    if scores.shape != gains.shape or scores.ndim != 1:
        raise ValueError(f"scores and gains must be 1-D and equally long, got {scores.shape}, {gains.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-scores, kind="stable")
    s, g = scores[order], gains[order]
    disc = _discounts(min(k, len(s)))
    total, start = 0.0, 0
    while start < len(disc):
        end = start + 1
        while end < len(s) and s[end] == s[start]:
            end += 1
        total += g[start:end].mean() * disc[start:end].sum()  # disc slice stops at k by itself
        start = end
    return float(total)


def ndcg_at_k(scores: Sequence[float], grades: Sequence[int], k: int, gains: str = "esci") -> float:
    """NDCG@k for one query; NaN when no candidate has a positive gain."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    g = gains_of(grades, gains)
    if len(scores) != len(g):
        raise ValueError(f"scores and gains must be 1-D and equally long, got {len(scores)}, {len(g)}")
    ideal = float((np.sort(g)[::-1][:k] * _discounts(min(k, len(g)))).sum()) if len(g) else 0.0
    if ideal <= 0.0:
        return math.nan
    return dcg_at_k(scores, g, k) / ideal


def per_query_ndcg(
    scores: Mapping[str, Sequence[float]], grades: Mapping[str, Sequence[int]], k: int, gains: str = "esci"
) -> dict[str, float]:
    """NDCG@k of each query id in ``grades``; every such query needs scores."""
    missing = set(grades) - set(scores)
    if missing:
        raise ValueError(f"no scores for {len(missing)} queries, e.g. {sorted(missing)[:3]}")
    return {q: ndcg_at_k(scores[q], grades[q], k, gains) for q in grades}


def mean_ndcg(
    scores: Mapping[str, Sequence[float]], grades: Mapping[str, Sequence[int]], k: int, gains: str = "esci"
) -> tuple[float, int]:
    """(mean NDCG@k over queries with a defined value, number of such queries)."""
    values = [v for v in per_query_ndcg(scores, grades, k, gains).values() if not math.isnan(v)]
    return (float(np.mean(values)) if values else math.nan), len(values)


def paired_difference(ours: Mapping[str, float], theirs: Mapping[str, float], tie: float = 1e-9) -> dict:
    """Per-query ``ours - theirs`` over the queries where both are defined (not NaN).

    Why: with tens of validation queries, per-query NDCG differences spread by ~0.2, so a mean
    difference of a few hundredths means nothing without its standard error; wins/ties/losses say
    whether a gain is broad or rests on a few queries.  ``se`` is the sample standard deviation over
    sqrt(n) (NaN below two queries).
    """
    if set(ours) != set(theirs):
        raise ValueError(f"the two scorers cover different queries: {sorted(set(ours) ^ set(theirs))[:3]}")
    d = np.array([ours[q] - theirs[q] for q in ours if not (math.isnan(ours[q]) or math.isnan(theirs[q]))])
    n = len(d)
    return {
        "mean": float(d.mean()) if n else math.nan,
        "se": float(d.std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan,
        "wins": int((d > tie).sum()),
        "ties": int((np.abs(d) <= tie).sum()),
        "losses": int((d < -tie).sum()),
        "n": n,
    }


def recall_at_precision(scores: Sequence[float], positive: Sequence[bool],
                        precision: float = PRECISION_TARGET) -> float:
    """The largest recall of a score threshold whose precision is at least ``precision``; 0 if none,
    NaN without positives.  Tied scores go in or out together, as a threshold takes them."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.shape != pos.shape:
        raise ValueError(f"scores {s.shape} and positive {pos.shape} must have one shape")
    if not 0.0 < precision <= 1.0:  # 90 for 0.9 would silently give 0
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    if np.isnan(s).any():  # argsort would rank NaN last, as if the lowest score
        raise ValueError("scores contain NaN")
    n_pos = int(pos.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    tp = np.cumsum(pos)
    n = np.arange(1, len(s) + 1)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a threshold can only cut after a run of equal scores
    ok = last_of_tie & (tp / n >= precision)
    return float(tp[ok].max() / n_pos) if ok.any() else 0.0
