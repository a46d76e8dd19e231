"""The `relsum` command: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# relsum_core.precision.PRECISIONS, relsum_core.evaluate.SPLITS and relsum_core.export.TARGETS, spelled
# out so that `relsum --help` does not import torch
PRECISION_CHOICES = ("auto", "bf16", "fp32")
SPLIT_CHOICES = ("validation", "heldout", "all")
TARGET_CHOICES = ("auto", "native", "x86-64-v3")  # relsum_core.export.TARGETS


def _add_precision(p: argparse.ArgumentParser, help: str, default: str = "auto") -> None:
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=default, help=help)


def _bench_logprob(args: argparse.Namespace) -> int:
    from relsum_core.bench_logprob import main as run

    return run(n=args.n, d=args.d, v=args.v, repeats=args.repeats, out=args.out, device=args.device,
               dtype=args.dtype, with_compile=not args.no_compile)


def _train_ranker(args: argparse.Namespace) -> int:
    from relsum_core.trainers.ranker import RankerTrainConfig, train_ranker

    cfg = RankerTrainConfig(
        out=args.out, data=args.data, base=args.base, cosine_base=args.cosine_base, epochs=args.epochs,
        lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size, group_size=args.group_size,
        max_steps=args.max_steps, seed=args.seed, split_seed=args.split_seed, val_fraction=args.val_fraction,
        max_attr_tokens=args.max_attr_tokens, max_length=args.max_length, eval_every=args.eval_every,
        max_queries=args.max_queries, progress=not args.no_progress, device=args.device, targets=args.targets,
        freeze_layers=args.freeze_layers, pseudo_steps=args.pseudo_steps, pseudo_lr=args.pseudo_lr,
        pseudo_head_lr=args.pseudo_head_lr, pseudo_attr_prob=args.pseudo_attr_prob,
        warmup=args.warmup, distill_temperature=args.distill_temperature, distill_weight=args.distill_weight,
        pointwise_weight=args.pointwise_weight, keyword_prob=args.keyword_prob, precision=args.precision,
        overwrite=args.overwrite,
    )
    if args.folds is not None:
        from relsum_core.trainers.ranker_cv import cross_validate_ranker

        cross_validate_ranker(cfg, args.folds)
        print((Path(args.out) / "cv_report.md").read_text(), end="")
        print(f"checkpoints: {Path(args.out) / 'fold<i>' / 'best'}")
        return 0
    report = train_ranker(cfg)
    print((Path(args.out) / "report.md").read_text(), end="")
    print(f"checkpoint: {report['checkpoint']}")
    return 0


def _add_train_ranker(sub) -> None:
    p = sub.add_parser("train-ranker", help="fine-tune a cross-encoder ranker on graded judgments")
    p.add_argument("--data", default=None, help="ESCI-style or WANDS folder (default: bundled ESCI-150q)")
    p.add_argument("--base", default=None, help="HF BERT-family folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--cosine-base", default=None,
                   help="encoder for the cosine baseline (default: --base; set it when --base is fine-tuned)")
    p.add_argument("--out", required=True, help="output dir: best/ checkpoint, metrics.jsonl, report.*")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out: its report and best/ are deleted once the "
                   "settings check out (without it, such an --out is refused)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None,
                   help="encoder learning rate of the graded phase (default: 2e-5 after the pseudo-query "
                        "warm-up, 1e-4 with --pseudo-steps 0)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="pooler + classifier learning rate of the graded phase (default: 1e-4 after the "
                        "warm-up, 1e-3 with --pseudo-steps 0, when the head is new)")
    p.add_argument("--pseudo-attr-prob", type=float, default=0.0,
                   help="share of warm-up pseudo-queries extended by words of the positive's shown "
                        "attributes")
    p.add_argument("--pseudo-lr", type=float, default=1e-4, help="encoder learning rate of the warm-up")
    p.add_argument("--pseudo-head-lr", type=float, default=1e-3, help="head learning rate of the warm-up")
    p.add_argument("--batch-size", type=int, default=4, help="queries per step")
    p.add_argument("--group-size", type=int, default=8, help="candidates of a query per softmax")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on the graded phase's steps (default: --epochs' worth); the --pseudo-steps "
                   "warm-up runs first, so a quick trial sets both: --max-steps 3 --pseudo-steps 0")
    p.add_argument("--seed", type=int, default=0, help="data order, prefix lengths, head init")
    p.add_argument("--split-seed", type=int, default=0, help="train/validation split of the queries")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--folds", type=int, default=None,
                   help="K-fold cross-validation instead of one --val-fraction split: K runs into "
                        "OUT/fold<i>, every query validated once, pooled into OUT/cv_report.*")
    p.add_argument("--max-attr-tokens", type=int, default=64, help="training prefixes: 0..N attribute tokens")
    p.add_argument("--targets", choices=["grade", "esci"], default="grade",
                   help="listwise targets: softmax(grade) or proportional to the ESCI NDCG gains")
    p.add_argument("--pointwise-weight", type=float, default=0.0,
                   help="add W x logistic loss of 'is an exact match' so scores mean the same across "
                        "queries (recall at 90%% precision, the reward's sigmoid)")
    p.add_argument("--keyword-prob", type=float, default=0.0,
                   help="share of training texts whose attributes are a shuffled keyword list of the "
                        "product's phrases (the shape of a trained summary) instead of a prefix")
    p.add_argument("--max-length", type=int, default=144, help="pair length cap in tokens")
    p.add_argument("--freeze-layers", type=int, default=0,
                   help="keep the embeddings and the first N encoder layers frozen")
    p.add_argument("--pseudo-steps", type=int, default=240,
                   help="warm-up steps before the graded phase, of the --warmup kind (0: no warm-up)")
    p.add_argument("--warmup", choices=["pseudo", "cosine"], default="pseudo",
                   help="pseudo: title pseudo-queries, other candidates as negatives; cosine: distil the "
                        "untuned encoder's cosine over the training queries' candidates (label-free)")
    p.add_argument("--distill-temperature", type=float, default=0.03,
                   help="distillation target: softmax(untuned cosine / T) over a group of candidates")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="graded phase: add W x the distillation loss to the untuned cosine on the same "
                        "groups (keeps the bi-encoder's semantics while fitting the labelled queries)")
    p.add_argument("--eval-every", type=int, default=None, help="validate every N steps (and each epoch end)")
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N queries")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_precision(p, "training forwards: auto = bf16 on CUDA and on CPUs with bf16 dot products")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_ranker)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from relsum_core.trainers.summarizer import SummarizerConfig, train_summarizer

    names = {f.name for f in fields(SummarizerConfig)}
    cfg = SummarizerConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None},
                           progress=not args.no_progress)
    last = train_summarizer(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 wrote the metrics
        return 0
    if "reward" in last:
        metrics = Path(args.out) / "metrics.jsonl"
        evals = [row for row in map(json.loads, metrics.read_text(encoding="utf-8").splitlines())
                 if row.get("event") == "eval" and row.get("reward") is not None]
        greedy = (f"; validation reward {evals[-1]['reward']:.4f} (greedy, step {evals[-1]['step']})"
                  if evals else "")
        print(f"step {last['step']}: training reward {last['reward']:.4f} (this step's samples){greedy}; "
              f"checkpoint in {Path(args.out) / 'checkpoint'}, metrics in {metrics}")
    else:
        print(f"{Path(args.out) / 'checkpoint'} is at step {last['step']}, not below --steps {cfg.steps}: "
              "nothing to train")
    return 0


class _TrainHelp(argparse.HelpFormatter):
    """`relsum train --help` with SummarizerConfig's defaults.  The options default to None, which
    tells one given from one left out; the trainer module (torch) is imported only to print help."""

    def _get_help_string(self, action):
        from relsum_core.records import dataclass_defaults
        from relsum_core.trainers.summarizer import SummarizerConfig

        text = action.help or ""
        defaults = dataclass_defaults(SummarizerConfig)
        if action.default is None and action.dest in defaults and "default" not in text:
            value = defaults[action.dest]
            text = f"{text} (default {'none' if value is None else value})".strip()
        return text


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the summarizer against the ranker (GRPO or DPO); "
                       "runs data-parallel under torchrun", formatter_class=_TrainHelp)
    p.add_argument("--algo", choices=["grpo", "dpo"], default="grpo")
    p.add_argument("--ranker", required=True, help="frozen ranker checkpoint (e.g. train-ranker's best/)")
    p.add_argument("--policy", default=None, help="HF causal-LM folder (default: packaged SmolLM2-135M)")
    p.add_argument("--data", default=None, help="ESCI-style or WANDS folder (default: bundled ESCI-150q)")
    p.add_argument("--out", required=True, help="output dir: checkpoint/, metrics.jsonl")
    for name, typ, text in (
            ("steps", int, "optimizer steps"),
            ("products-per-step", int, "products a step summarises"),
            ("group-size", int, "summaries sampled per product (GRPO's group, DPO's pair pool)"),
            ("grad-accum", int, "micro-batches a step is split into (memory only)"),
            ("lr", float, "learning rate"),
            ("warmup-steps", int, "linear learning-rate warm-up"),
            ("beta", float, "grpo: KL weight (the start and floor with --kl-target)"),
            ("dpo-beta", float, "dpo: the loss's beta"),
            ("epsilon-low", float, "grpo: lower clip of the ratio"),
            ("epsilon-high", float, "grpo: upper clip of the ratio"),
            ("entropy-coef", float, "entropy bonus weight"),
            ("temperature", float, "sampling temperature of the rollouts"),
            ("top-p", float, "nucleus sampling of the rollouts"),
            ("budget", int, "summary tokens asked for and sampled at most"),
            ("max-product-tokens", int, "product text shown to the policy, in its tokens"),
            ("eval-products", int, "validation products summarised greedily at each evaluation (0: none)"),
            ("eval-every", int, "steps between evaluations"),
            ("save-every", int, "steps between checkpoints"),
            ("seed", int, "product draws and rollouts"),
            ("reward-relevance", float, "reward weight: the ranker's relevance"),
            ("reward-ranking", float, "reward weight: NDCG change of the judged queries"),
            ("reward-budget", float, "reward weight: penalty past the budget"),
            ("reward-faithfulness", float, "reward weight: words found in the product's text"),
            ("reward-novelty", float, "reward weight: attributes beyond the title"),
            ("max-minutes", float, "stop (evaluate, save) at the first step past this wall time"),
            ("kl-target", float, "grpo: adapt beta so the per-token KL tracks this")):
        p.add_argument(f"--{name}", type=typ, default=None, help=text)  # None: left out (see _TrainHelp)
    p.add_argument("--split-seed", type=int, default=None,
                   help="train/validation split of the queries (default 0: train-ranker's and evaluate's)")
    p.add_argument("--val-fraction", type=float, default=None, help="share of queries held out (default 0.2)")
    p.add_argument("--loss-type", choices=["dapo", "grpo", "dr_grpo"], default=None,
                   help="grpo: how token losses are averaged")
    p.add_argument("--advantage", choices=["decoupled", "total"], default=None,
                   help="grpo: normalise each reward component within its group (default) or their sum")
    p.add_argument("--compile-decode", action="store_true", default=None,
                   help="GPU: torch.compile the CUDA-graph decode step (faster after ~20 s per shape)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_precision(p, "sampling and update; bf16 (or auto: bf16 on CUDA and on CPUs with bf16 dot products) "
                      "makes a step 1.6x faster on CPU; the default is fp32 because in one of three GRPO "
                      "seeds its summaries gained far less novelty (weights and optimizer are fp32 in all)",
                   default="fp32")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)


def _summarize(args: argparse.Namespace) -> int:
    from relsum_core.policy import SUMMARY_BUDGET, SUMMARY_PRODUCT_TOKENS, read_prompt_settings
    from relsum_core.summarize import summarize_catalog

    trained = read_prompt_settings(args.policy)  # a relsum train checkpoint's own budgets
    for name, default in (("budget", SUMMARY_BUDGET), ("max_product_tokens", SUMMARY_PRODUCT_TOKENS)):
        if getattr(args, name) is None:
            setattr(args, name, trained.get(name, default))
            if name in trained:
                print(f"{name} {trained[name]}: the policy's training value")
    path = summarize_catalog(args.out, policy=args.policy, catalog=args.catalog, budget=args.budget,
                             batch_size=args.batch_size, temperature=args.temperature, seed=args.seed,
                             max_product_tokens=args.max_product_tokens, shard=args.shard,
                             num_shards=args.num_shards, device=args.device, progress=not args.no_progress,
                             task=args.task, precision=args.precision, max_products=args.max_products)
    print(f"summaries in {path}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from relsum_core.plots import plot_metrics

    out = args.out or str(Path(args.metrics).with_suffix(".png"))
    print(plot_metrics(args.metrics, out, title=args.title))
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl (reward, KL, length / loss, NDCG)")
    p.add_argument("metrics", help="a metrics.jsonl written by train or train-ranker")
    p.add_argument("--out", default=None,
                   help=".png, .pdf or .svg path (default: beside the metrics, .png)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_plot)


def _add_summarize(sub) -> None:
    p = sub.add_parser("summarize", help="summaries for a whole catalog to JSONL (resumable, sharded; the "
                       "bundled 6,764 products take about 45 minutes on a 2-core CPU)")
    p.add_argument("--policy", default=None, help="summarizer folder, e.g. a train run's checkpoint/")
    p.add_argument("--catalog", "--data", dest="catalog", default=None,  # --data as in the other commands
                   help="products JSONL(.gz) or data dir (default: bundled)")
    p.add_argument("--out", required=True, help="output JSONL (shards add .shardKKK-of-NNN)")
    p.add_argument("--budget", type=int, default=None,
                   help="summary tokens (default: the policy's training value, else 32)")
    p.add_argument("--task", choices=["summary", "doc2query"], default="summary",
                   help="write attribute summaries, or search queries for each product (Doc2Query)")
    p.add_argument("--max-product-tokens", type=int, default=None,
                   help="product text given to the policy (default: the policy's training value, else 128)")
    p.add_argument("--batch-size", type=int, default=16, help="products summarised together")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-products", type=int, default=None,
                   help="only the first N products in id order (a trial; a larger N later appends the rest)")
    p.add_argument("--shard", type=int, default=None, help="default: torchrun RANK")
    p.add_argument("--num-shards", type=int, default=None, help="default: torchrun WORLD_SIZE")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_precision(p, "sampling dtype: auto = bf16 on CPUs with bf16 dot products, else fp32")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_summarize)


def _evaluate(args: argparse.Namespace) -> int:
    from relsum_core.evaluate import evaluate_summaries, parse_named

    evaluate_summaries(
        args.out, ranker=args.ranker, data=args.data, summaries=parse_named(args.summaries, "--summaries"),
        policies=parse_named(args.policy, "--policy"), doc2query=parse_named(args.doc2query, "--doc2query"),
        split=args.split, val_fraction=args.val_fraction,
        split_seed=args.split_seed, desc_tokens=args.desc_tokens, budget=args.budget,
        max_product_tokens=args.max_product_tokens, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress, precision=args.precision)
    print((Path(args.out) / "report.md").read_text(), end="")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="ranking metrics (NDCG@5/10, recall@P90, bootstrap intervals) of "
                       "title, title + description prefix and title + summaries")
    p.add_argument("--ranker", required=True, help="frozen ranker checkpoint")
    p.add_argument("--data", default=None, help="ESCI-style or WANDS folder (default: bundled ESCI-150q)")
    p.add_argument("--out", required=True, help="output dir: report.json, report.md, ndcg.png")
    p.add_argument("--summaries", action="append", default=[], metavar="NAME=JSONL",
                   help="a relsum summarize output to evaluate as title + summary (repeatable)")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=DIR",
                   help="summarise the evaluated products with this policy first ('default' = packaged "
                   "SmolLM2; repeatable)")
    p.add_argument("--doc2query", action="append", default=[], metavar="NAME=DIR",
                   help="the Doc2Query baseline: this policy writes search queries for each evaluated "
                   "product, scored as title + queries ('default' = packaged SmolLM2; repeatable)")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="validation",
                   help="the validation queries of the training split (refused where the ranker's or a "
                   "policy's record lists some of them, or of their products, as trained on), every "
                   "query no model trained on (heldout: for --folds / --max-queries rankers), or every query")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0, help="the seed the ranker and summarizer split with")
    p.add_argument("--desc-tokens", type=int, nargs="+", default=[32],
                   help="title + the first K description tokens, one variant per K")
    p.add_argument("--budget", type=int, default=32, help="--policy / --doc2query: generated tokens")
    p.add_argument("--max-product-tokens", type=int, default=128,
                   help="--policy / --doc2query: product text tokens")
    p.add_argument("--batch-size", type=int, default=16,
                   help="--policy / --doc2query: products summarised together (the ranker scores 128 "
                   "pairs a batch)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_precision(p, "--policy / --doc2query sampling: auto = bf16 on CPUs with bf16 dot products")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate)


def _export_ranker(args: argparse.Namespace) -> int:
    import torch

    from relsum_core.export import export_ranker
    from relsum_core.ranker import CrossEncoder

    ranker = CrossEncoder.from_pretrained(args.model, device="cpu", max_length=args.max_length)
    out = export_ranker(ranker, args.out, dtype=getattr(torch, args.dtype), target=args.target)
    print(f"exported {args.model} -> {out} (serve it with bindings/: relsum_rerank {out})")
    return 0


def _add_export_ranker(sub) -> None:
    p = sub.add_parser("export-ranker", help="freeze a cross-encoder checkpoint into a directory the "
                       "C++ API (bindings/) serves: AOTInductor package + tokenizer tables")
    p.add_argument("--model", required=True, help="HF BERT-family checkpoint folder (e.g. runs/ranker/best)")
    p.add_argument("--out", required=True,
                   help="export directory: new, empty, or a previous export (replaced atomically)")
    p.add_argument("--max-length", type=int, default=None,
                   help="pair length cap in tokens (default: the checkpoint's relsum_ranker.json, else "
                        "the model's max_position_embeddings)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 runs 1.7x (AVX512-BF16) to 2.7x (AMX) faster on CPUs that have them "
                   "(scores move ~1e-2)")
    p.add_argument("--target", choices=TARGET_CHOICES, default="auto",
                   help="native: compiled for this CPU's vector extensions (the C++ refuses CPUs without "
                   "them); x86-64-v3: any AVX2 x86 CPU; auto (default): x86-64-v3 on x86, else native")
    p.set_defaults(func=_export_ranker)


def _rerank(args: argparse.Namespace) -> int:
    import torch

    from relsum_core.precision import resolve_device
    from relsum_core.ranker import CrossEncoder
    from relsum_core.rerank_lines import parse, read_lines, run

    if args.top_k is not None and not args.rank:
        raise ValueError("--top-k needs --rank")
    if sys.stdin is None:
        raise ValueError("stdin is closed: pipe the lines in")
    request = parse(read_lines(sys.stdin.buffer), rank=args.rank)  # a malformed line costs no model load
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would land beside the scores in a terminal
    try:
        ranker = CrossEncoder.from_pretrained(args.model, device=resolve_device(args.device),
                                              dtype=getattr(torch, args.dtype), max_length=args.max_length)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    run(ranker, request, sys.stdout, top_k=args.top_k, batch_size=args.batch_size, max_tokens=args.max_tokens)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_rerank(sub) -> None:
    p = sub.add_parser("rerank", help="score QUERY<TAB>DOC lines (or rank a query's candidates) from stdin "
                       "with a ranker checkpoint, in the C++ relsum_rerank's format")
    p.add_argument("--model", required=True, help="HF BERT-family checkpoint folder (e.g. runs/ranker/best)")
    p.add_argument("--rank", action="store_true",
                   help="stdin: the query, then a candidate a line; stdout: CORPUS_ID<TAB>SCORE, best first")
    p.add_argument("--top-k", type=_positive_int, default=None, help="--rank: keep the best K")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="pairs a forward")
    p.add_argument("--max-tokens", type=_positive_int, default=16384,
                   help="packed tokens a forward, at least the pair length cap (the C++ tool counts padded "
                   "tokens, default 2048)")
    p.add_argument("--max-length", type=_positive_int, default=None,
                   help="pair length cap in tokens (default: the checkpoint's, as export-ranker's); give "
                   "the --max-length an export was made with to compare with it")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: faster on CPUs with bf16 dot products (scores move ~1e-2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.epilog = "In texts, \\t, \\n and \\\\ stand for a tab, a line break and a backslash."
    p.set_defaults(func=_rerank)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relsum", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench-logprob", help="time and measure peak memory of fused_logprob vs naive logits")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_bench_logprob)
    _add_train_ranker(sub)
    _add_train(sub)
    _add_summarize(sub)
    _add_evaluate(sub)
    _add_plot(sub)
    _add_export_ranker(sub)
    _add_rerank(sub)
    return parser


# Bad input (a missing folder, a malformed data row, a checkpoint of the wrong kind, a bad option value)
# ends the command with an error line naming the problem, as argparse's own errors do; RELSUM_TRACEBACK=1
# shows the traceback as well.  PolicyLoadError derives from RuntimeError, so it is named on its own.
def _input_errors() -> tuple[type[BaseException], ...]:
    from relsum_core.policy import PolicyLoadError

    return (ValueError, TypeError, OSError, PolicyLoadError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # checkpoints and outputs are written atomically, so what was saved before this is intact
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, with the status of a tool SIGPIPE ended; stdout
        # points at /dev/null so that the exit's own flush does not fail on the closed pipe again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
            pass
        return 141
    except _input_errors() as e:
        if os.environ.get("RELSUM_TRACEBACK", "") not in ("", "0"):
            raise
        parser.exit(2, f"{prog}: error: {type(e).__name__}: {e}\n"
                       f"(set RELSUM_TRACEBACK=1 for the traceback)\n")


if __name__ == "__main__":
    sys.exit(main())
