"""Where a packed cross-encoder forward spends its GPU time: relsum against the strong peer.

The throughput benchmark (``test_bench_ranker.py``) says relsum only ties the strong peer (packed
tokens, ``varlen_attn``, ``torch.compile``) although relsum's attention kernel alone is 1.6x faster
than torch's.  This script says why: it profiles one forward of each, from token ids already on the
device, and sums kernel time by kind (GEMM, attention, fused epilogues, inductor kernels, embedding
gathers, copies), beside the wall time of the forward (the gap is host/launch time).

    python benchmarks/profile_ranker.py --out prof.md            # CUDA: ANCHORS table-2 rows, bf16
    python benchmarks/profile_ranker.py --dry-run                # CPU: tiny model, checks the wiring

Writes a markdown table (stdout, and ``--out``) and the raw per-kernel rows as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# test_bench_ranker (the benchmark's models and strong peer) sits beside this script, which makes
# its folder sys.path[0] when run.
import torch  # noqa: E402
from test_bench_ranker import SHAPES, StrongPeer, _kernel_choices, _model, _tokenizer, make_pairs  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from relsum_core.ranker import CrossEncoder, PackedBatch  # noqa: E402

# Kernel name -> kind, first match wins (names of cuBLAS/cuDNN/flash/inductor kernels as seen in traces).
KINDS = [
    ("relsum attention", ("_varlen_attn_fwd_kernel", "_varlen_attn_short_kernel")),
    ("relsum bias+gelu", ("_bias_gelu_kernel",)),
    ("relsum linear+gelu gemm", ("_linear_gelu_kernel",)),
    ("relsum fused ffn", ("_fused_ffn_kernel",)),
    ("relsum linear+residual+ln gemm", ("_linear_residual_ln_kernel",)),
    ("relsum residual+ln", ("_residual_ln_kernel",)),
    ("relsum cls head", ("_cls_score_kernel",)),
    ("inductor fused", ("triton_",)),
    ("attention (torch/flash)", ("flash", "fmha", "attention", "varlen")),
    ("gemm", ("gemm", "gemv", "splitk", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "ampere_",
              "addmm", "aten::mm")),
    ("embedding gather", ("index", "embedding", "gather")),
    ("copy", ("memcpy", "memset", "copy", "cat")),
    ("layernorm (eager)", ("layer_norm", "layernorm")),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled", "gelu", "add", "tanh")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _device_time(evt) -> float:
    """Self time on the device in microseconds (attribute names moved between torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def profile_forward(fn, *, cuda: bool, reps: int) -> dict:
    """Kernel rows and wall time per forward of ``fn`` (already warmed up)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    wall_ms = (time.perf_counter() - t0) / reps * 1e3
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        sync()
    rows = []
    for e in prof.key_averages():
        us = _device_time(e) if cuda else float(e.self_cpu_time_total)
        if us <= 0:
            continue
        if cuda and getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue  # CPU-side op rows also carry their children's device time
        rows.append(dict(name=e.key, kind=kind_of(e.key), count=e.count // reps, ms=us / reps / 1e3))
    rows.sort(key=lambda r: -r["ms"])
    by_kind: dict[str, float] = defaultdict(float)
    for r in rows:
        by_kind[r["kind"]] += r["ms"]
    return dict(wall_ms=wall_ms, busy_ms=sum(r["ms"] for r in rows),
                kernels=sum(r["count"] for r in rows), by_kind=dict(by_kind), rows=rows)


def build_model(shape: str, device, dtype, *, dry_run: bool):
    tok = _tokenizer()
    if dry_run:
        torch.manual_seed(0)
        hf = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=128,
                                                      num_labels=1)).eval()
    else:
        hf = _model(shape)
    hf = hf.to(device, dtype)
    return hf, CrossEncoder.from_model(hf, tok, device=device, dtype=dtype), tok


def build_batch(ce, tok, lengths, n_pairs: int, device):
    enc = ce.encode_pairs(make_pairs(tok, [(n_pairs, *lengths)], seed=1))
    b = PackedBatch(enc)
    args = (b.input_ids.to(device), b.token_type_ids.to(device), b.position_ids.to(device),
            b.cu_seqlens.to(device), b.max_seqlen)
    return args, sum(len(ids) for ids, _ in enc)


def table(title: str, res: dict) -> list[str]:
    """Markdown: one column per variant, rows = wall time, kernel time, launches, time by kind."""
    kinds = sorted({k for r in res.values() for k in r["by_kind"]},
                   key=lambda k: -max(r["by_kind"].get(k, 0.0) for r in res.values()))

    def line(label, fmt):
        return f"| {label} | " + " | ".join(fmt(r) for r in res.values()) + " |"

    out = [f"## {title}", "", "| | " + " | ".join(res) + " |", "|---|" + "---|" * len(res),
           line("wall ms per forward", lambda r: f"{r['wall_ms']:.3f}"),
           line("kernel ms (sum)", lambda r: f"{r['busy_ms']:.3f}"),
           line("kernels launched", lambda r: str(r["kernels"]))]
    out += [line(k, lambda r, k=k: f"{r['by_kind'].get(k, 0.0):.3f}") for k in kinds]
    out.append("")
    for name, r in res.items():
        out.append(f"Top kernels, {name}:")
        out += [f"- {x['ms']:.3f} ms, {x['count']}x, {x['kind']}: `{x['name'][:90]}`" for x in r["rows"][:8]]
        out.append("")
    return out


def tuned_forward(ce, args):
    """relsum's forward with the kernel candidates on (test_bench_ranker.TUNED)."""
    with _kernel_choices(ce, tuned=True):
        return ce.encoder(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, a tiny model and 16 pairs: checks the wiring")
    ap.add_argument("--rows", nargs="*", default=["minilm-l6-h384:24-96", "minilm-l6-h384:24-96x100",
                                                   "minilm-l6-h384:128-512", "bert-base:24-96",
                                                   "bert-base:128-512"],
                    help="SHAPE:LO-HI[xPAIRS] rows (default: the ANCHORS table-2 rows at --pairs, most "
                         "wanted first, and the table-3 latency row's size, 100 pairs, eager: no CUDA graph)")
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-peer", action="store_true", help="profile relsum only (no torch.compile)")
    ap.add_argument("--out", type=Path, help="write the markdown here and the raw rows to OUT.json")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.dry_run
    if not cuda and not a.dry_run:
        ap.error("no CUDA device: use --dry-run on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    n_pairs = 16 if a.dry_run else a.pairs
    reps = 2 if a.dry_run else a.reps
    rows = a.rows[:2] if a.dry_run else a.rows
    card = torch.cuda.get_device_name() if cuda else "cpu"
    lines = [f"# Packed cross-encoder forward, per-kernel time ({card}, {str(dtype).removeprefix('torch.')},"
             f" from token ids on the device)", ""]
    print("\n".join(lines), flush=True)
    raw = {}
    models = {}  # shape -> (hf, ce, tok, peer): one torch.compile per model (dynamic shapes)
    for row in rows:
        shape, span = row.split(":")
        if shape not in SHAPES:
            ap.error(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        span, _, count = span.partition("x")
        lengths = tuple(int(x) for x in span.split("-"))
        row_pairs = int(count) if count else n_pairs
        if a.dry_run:
            row_pairs = min(row_pairs, n_pairs)
        if shape not in models:
            hf, ce, tok = build_model(shape, device, dtype, dry_run=a.dry_run)
            peer = None
            if not a.no_peer and a.dry_run:
                from relsum_kernels import varlen_attention

                peer = StrongPeer(hf, lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, m))
            elif not a.no_peer:
                peer = torch.compile(StrongPeer(hf, "torch_varlen"), dynamic=True)
            models[shape] = (hf, ce, tok, peer)
        hf, ce, tok, peer = models[shape]
        args, tokens = build_batch(ce, tok, lengths, row_pairs, device)
        variants = {"relsum": lambda ce=ce, args=args: ce.encoder(*args),
                    "relsum_tuned": lambda ce=ce, args=args: tuned_forward(ce, args)}
        if peer is not None:
            variants["peer_varlen_attn_compile"] = lambda peer=peer, args=args: peer(*args)
        res = {}
        with torch.inference_mode():
            ref = None
            for name, fn in variants.items():
                for _ in range(3):  # compile / autotune / allocator warm-up
                    out = fn()
                ref = out if ref is None else ref
                err = (out.float() - ref.float()).abs().max().item()
                # bf16: half the scores' spread (test_bench_ranker.INIT_RANGE); a mis-wired path must
                # not post a profile
                if err > (0.5 * ref.float().std().item() if cuda else 1e-4):
                    raise SystemExit(f"{row} {name}: scores differ from relsum's by {err:.3g}")
                res[name] = profile_forward(fn, cuda=cuda, reps=reps)
        raw[row] = res
        rows_md = table(f"{row} ({row_pairs} pairs, {tokens} tokens)", res)
        print("\n".join(rows_md), flush=True)
        lines += rows_md
        if a.out:  # after every row: a time limit that cuts the run short keeps the rows done
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text("\n".join(lines) + "\n")
            a.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
