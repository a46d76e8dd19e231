"""The `relsum` command: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys


def _bench_logprob(args: argparse.Namespace) -> int:
    from relsum_core.bench_logprob import main as run

    return run(n=args.n, d=args.d, v=args.v, repeats=args.repeats, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relsum", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench-logprob", help="time and measure peak memory of fused_logprob vs naive logits")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=_bench_logprob)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
