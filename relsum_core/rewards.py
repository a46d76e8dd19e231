"""Rewards for summaries, computed by the frozen ranker: what the summary does for search.

For a product p with title t and a sampled summary s, the ranker sees ``t | s`` (the rule of
`relsum_core.text`).  Components, each logged on its own:

* relevance: mean over p's judged queries q of ``w(grade) * sigmoid(score(q, t | s))``; grade
  weights push the summary towards the queries p is relevant for and away from the ones it is not
  (defaults E +1, S +0.5, C 0, I -1).
* ranking: mean over p's judged queries of the NDCG@k change of q's candidate list when p's text
  is ``t | s`` instead of ``t`` alone, every other candidate kept at its title-only score.
* budget: ``-max(0, length - K) / K`` for a summary of ``length`` tokens and budget K.
* faithfulness: share of the summary's content words that occur in p's own text (a guard against
  attributes the product does not have).
* novelty: distinct words of p's bullets/description/brand/colour that its title lacks, per word of
  the summary (function words count in the denominator), but never per fewer than K/2 words for a
  budget of K tokens: a per-word ratio alone pays most for a one-word summary, and a GRPO run
  collapsed to 3-word summaries on it (KL 2-7).  The ranker already reads the title, so
  budget spent repeating it, repeating a word, or on function words buys nothing; without this term
  faithfulness alone pays most for copying the title, and a content-word-only ratio pays as much
  for a copied description sentence as for a dense attribute list.

``total = sum(weight_c * component_c)``.  Every ranker call of a batch goes through one
``scorer(pairs)`` call (e.g. ``CrossEncoder.predict``), and title-only scores are cached per query.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from relsum_core.data import Judgment, Product
from relsum_core.metrics import ndcg_at_k
from relsum_core.text import attributes_text, is_unspaced, normalise, summary_text, title_text, words

Scorer = Callable[[list[tuple[str, str]]], np.ndarray]
COMPONENTS = ("relevance", "ranking", "budget", "faithfulness", "novelty")

# Function words carry no attribute; leaving them out keeps faithfulness about content.
STOPWORDS = frozenset(
    "a an the and or of for with in on at to by from as is are be it its this that these those "
    "your you our we it's into over under up out no not than then so very can will".split())


def content_words(text: str) -> list[str]:
    """:func:`~relsum_core.text.words` less stopwords and lone letters (a lone character of an unspaced
    script is a word)."""
    return [w for w in words(text) if w not in STOPWORDS and (len(w) > 1 or w.isdigit() or is_unspaced(w))]


@dataclass
class RewardConfig:
    relevance: float = 1.0
    ranking: float = 1.0
    budget: float = 0.5
    faithfulness: float = 0.5
    novelty: float = 1.0
    budget_tokens: int = 32
    ndcg_k: int = 10
    grade_weights: Mapping[int, float] = field(default_factory=lambda: {3: 1.0, 2: 0.5, 1: 0.0, 0: -1.0})

    def __post_init__(self):
        if self.budget_tokens <= 0:
            raise ValueError(f"budget_tokens must be > 0, got {self.budget_tokens}")
        if self.ndcg_k < 1:
            raise ValueError(f"ndcg_k must be >= 1, got {self.ndcg_k}")


class RankerReward:
    """Scores batches of (product, summary) with the frozen ranker; see the module docstring."""

    def __init__(self, scorer: Scorer, catalog: Mapping[str, Product], judgments: Sequence[Judgment],
                 config: RewardConfig | None = None, tokenizer=None):
        """``tokenizer``: the ranker's, to cut titles to ``TITLE_TOKENS`` of it as the ranker saw them in
        training (None: whole titles)."""
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.config = config or RewardConfig()
        self.by_query: dict[str, list[Judgment]] = defaultdict(list)
        self.by_product: dict[str, list[Judgment]] = defaultdict(list)
        for j in judgments:
            if j.product_id not in catalog:
                raise ValueError(f"judgment for query {j.query_id} names unknown product {j.product_id}")
            self.by_query[j.query_id].append(j)
            self.by_product[j.product_id].append(j)
        self._title_scores: dict[str, np.ndarray] = {}
        self._titles: dict[str, str] = {}
        self._product_words: dict[str, tuple[frozenset[str], frozenset[str]]] = {}

    def title(self, product_id: str) -> str:
        title = self._titles.get(product_id)
        if title is None:
            product = self.catalog[product_id]
            title = title_text(product.title, self.tokenizer)
            self._titles[product_id] = title
        return title

    def _score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """The scorer's logits as float64 [len(pairs)]; a raw [N, 1] head output is accepted."""
        scores = np.asarray(self.scorer(pairs), dtype=np.float64)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.shape != (len(pairs),):
            raise ValueError(f"the scorer returned scores of shape {scores.shape} for {len(pairs)} pairs; "
                             f"it must return one score per pair")
        if np.isnan(scores).any():
            n = int(np.isnan(scores).sum())
            raise ValueError(f"the scorer returned NaN for {n} of {len(pairs)} pairs (a diverged ranker?)")
        return scores

    def _ensure_title_scores(self, query_ids: set[str]) -> None:
        todo = sorted(q for q in query_ids if q not in self._title_scores)
        if not todo:
            return
        pairs = [(j.query, self.title(j.product_id)) for q in todo for j in self.by_query[q]]
        scores = self._score(pairs)
        at = 0
        for q in todo:
            n = len(self.by_query[q])
            self._title_scores[q] = scores[at: at + n]
            at += n

    def __call__(self, product_ids: Sequence[str], summaries: Sequence[str],
                 lengths: Sequence[int]) -> dict[str, np.ndarray]:
        """Components and ``total`` for each sample, as float arrays of len(product_ids)."""
        if not (len(product_ids) == len(summaries) == len(lengths)):
            raise ValueError("product_ids, summaries and lengths must be equally long")
        if not product_ids:
            raise ValueError("empty batch: no summaries to reward")
        cfg = self.config
        for pid in product_ids:
            if pid not in self.catalog:
                raise ValueError(f"unknown product {pid}")
            if not self.by_product[pid]:
                raise ValueError(f"product {pid} has no judged query to reward against")
        self._ensure_title_scores({j.query_id for pid in product_ids for j in self.by_product[pid]})

        pairs = [(j.query, summary_text(self.catalog[pid].title, s, self.tokenizer))
                 for pid, s in zip(product_ids, summaries) for j in self.by_product[pid]]
        scores = self._score(pairs)
        out = {c: np.zeros(len(product_ids)) for c in COMPONENTS}
        at = 0
        for i, (pid, summary, length) in enumerate(zip(product_ids, summaries, lengths)):
            rel, rank = [], []
            for j in self.by_product[pid]:
                s = scores[at]
                at += 1
                # the logistic as tanh: 1 / (1 + exp(-s)) overflows for a logit below -709
                rel.append(cfg.grade_weights.get(j.grade, 0.0) * 0.5 * (1.0 + math.tanh(0.5 * s)))
                rank.append(self._ndcg_delta(j, s))
            out["relevance"][i] = float(np.mean(rel))
            deltas = [d for d in rank if not math.isnan(d)]
            out["ranking"][i] = float(np.mean(deltas)) if deltas else 0.0
            out["budget"][i] = -max(0, int(length) - cfg.budget_tokens) / cfg.budget_tokens
            out["faithfulness"][i] = self.faithfulness(pid, summary)
            out["novelty"][i] = self.novelty(pid, summary)
        out["total"] = sum(getattr(cfg, c) * out[c] for c in COMPONENTS)
        return out

    def _ndcg_delta(self, j: Judgment, new_score: float) -> float:
        cands = self.by_query[j.query_id]
        base = self._title_scores[j.query_id]
        grades = [c.grade for c in cands]
        idx = next(i for i, c in enumerate(cands) if c.product_id == j.product_id)
        changed = base.copy()
        changed[idx] = new_score
        k = self.config.ndcg_k
        return ndcg_at_k(changed, grades, k) - ndcg_at_k(base, grades, k)

    def _words(self, product_id: str) -> tuple[frozenset[str], frozenset[str]]:
        """(title words, words of the rest of the product's text), computed once per product."""
        hit = self._product_words.get(product_id)
        if hit is None:
            p = self.catalog[product_id]
            hit = (frozenset(content_words(normalise(p.title))),
                   frozenset(content_words(f"{attributes_text(p)}\n{normalise(p.brand)}\n{normalise(p.color)}")))
            self._product_words[product_id] = hit
        return hit

    def faithfulness(self, product_id: str, summary: str) -> float:
        words = content_words(summary)
        if not words:
            return 0.0
        title, rest = self._words(product_id)
        return sum(w in title or w in rest for w in words) / len(words)

    def novelty(self, product_id: str, summary: str) -> float:
        n_words = len(words(summary))
        if not n_words:
            return 0.0
        title, rest = self._words(product_id)
        floor = max(1, self.config.budget_tokens // 2)  # about the words K tokens hold
        return len((rest - title).intersection(content_words(summary))) / max(n_words, floor)


def group_advantages(rewards: np.ndarray | Sequence[float], group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> np.ndarray:
    """GRPO advantages: each reward minus its group's mean, over the group's std when ``scale``.

    ``rewards`` holds consecutive groups of ``group_size`` samples of the same prompt.  The std is
    the unbiased one (as in TRL); a group whose rewards are all equal gets advantages 0.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if group_size < 1 or r.ndim != 1 or r.size == 0 or r.size % group_size:
        raise ValueError(f"need a non-empty 1-D reward array whose length is a multiple of group_size="
                         f"{group_size}, got shape {r.shape}")
    g = r.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale and group_size > 1:
        adv = adv / (g.std(axis=1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def decoupled_advantages(components: Mapping[str, np.ndarray], weights: Mapping[str, float],
                         group_size: int, eps: float = 1e-4) -> np.ndarray:
    """Advantages that normalise each reward component within its group before weighting.

    Normalising the weighted total lets the component with the widest spread decide the sign: the
    ranker's relevance moves by ~0.01 between samples of one product while faithfulness moves by
    ~0.2, so the ranker would barely count.  Here each component gets unit spread inside each group
    (a component equal across a group contributes 0, as in GDPO, arXiv 2601.05242), the weights say
    how much each counts, and the sum is divided by the weights' norm, so independent components
    give about unit spread.  A fixed divisor, not the batch std, keeps each group's advantages a
    function of that group alone: data-parallel processes then agree with one process.
    """
    total, norm = None, 0.0
    for name, w in weights.items():
        if w == 0.0:
            continue
        adv = w * group_advantages(components[name], group_size, eps=eps)
        total = adv if total is None else total + adv
        norm += w * w
    if total is None:
        raise ValueError("all reward weights are 0: nothing to learn from")
    return total / math.sqrt(norm)
