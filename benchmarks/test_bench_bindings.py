"""Rerank latency on CPU through the C++ API (bindings/) against the Python ``CrossEncoder``.

One query against N candidates of 24-96 tokens (real ESCI product texts cut to length), MiniLM-L6
weights with a seeded head, fp32, both timed *from text* (tokenising included):

- ``python_rank``: ``CrossEncoder.rank`` in this process;
- ``cpp_process``: one whole ``relsum_rerank --rank`` process a round: start, load the export,
  tokenise, score; what a cold start of a C++ service costs.  Its ``extra_info`` also carries
  ``warm_median_ms`` / ``warm_p90_ms``: the same binary timing ``Ranker::rank`` in process over
  ``RELSUM_BENCH_CPP_REPEAT`` calls after one warm-up (the steady-state latency of a C++ service).
- ``*_bf16``: the same with the model in bf16 (``CrossEncoder(dtype=torch.bfloat16)``,
  ``relsum export-ranker --dtype bfloat16``).

The build and each export happen once per session (about 10 s and 25 s).  The binary runs with its
defaults (``--max-tokens 2048`` padded tokens a forward) and ``--batch-size`` from
``RELSUM_BENCH_CPP_BATCH`` (default 128, as ``predict``'s).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from relsum_core.data import load_dataset  # noqa: E402
from relsum_core.ranker import CrossEncoder, packaged_minilm_path  # noqa: E402
from relsum_core.rerank_lines import escape  # noqa: E402
from relsum_core.text import attributes_text, cut_to_tokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = [(20, 24, 96), (100, 24, 96)]
ROUNDS = int(os.environ.get("RELSUM_BENCH_CPU_ROUNDS", "5"))
REPEAT = int(os.environ.get("RELSUM_BENCH_CPP_REPEAT", "10"))
BATCH = os.environ.get("RELSUM_BENCH_CPP_BATCH", "128")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ bindings cannot be built")
    try:
        minilm = packaged_minilm_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from relsum_core.export import export_ranker

    root = tmp_path_factory.mktemp("bench_bindings")
    models, exports = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        models[dtype] = CrossEncoder.from_pretrained(minilm, device="cpu", dtype=dtype, max_length=128)
        exports[dtype] = export_ranker(models[dtype], root / f"export-{dtype}", dtype=dtype)
    build = root / "build"
    subprocess.run(["cmake", "-S", str(REPO / "bindings"), "-B", str(build),
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2", "--target", "relsum_rerank"], check=True,
                   capture_output=True)
    return models, exports, build / "relsum_rerank"


def _case(ce: CrossEncoder, n: int, lo: int, hi: int, seed: int = 0) -> tuple[str, list[str]]:
    """A judged ESCI query and n product texts cut so each pair has lo..hi tokens."""
    products, judgments = load_dataset()
    rng = random.Random(seed)
    query = judgments[0].query
    q_len = len(ce.tokenizer.tokenize(query)) + 3
    docs = [f"{p.title} {attributes_text(p)}" for p in sorted(products.values(), key=lambda p: p.product_id)]
    return query, [cut_to_tokens(d, ce.tokenizer, rng.randint(lo, hi) - q_len) for d in rng.sample(docs, n)]


@pytest.mark.parametrize("method", ["python_rank", "cpp_process", "python_rank_bf16", "cpp_process_bf16"])
@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[0]}cands-{r[1]}-{r[2]}")
def test_cpu_cpp_rerank_latency(benchmark, setup, row, method):
    models, exports, binary = setup
    dtype = torch.bfloat16 if method.endswith("_bf16") else torch.float32
    ce, export = models[dtype], exports[dtype]
    query, cands = _case(ce, *row)
    lens = [len(ids) for ids, _ in ce.encode_pairs([(query, c) for c in cands])]
    stdin = "".join(escape(t) + "\n" for t in (query, *cands))
    torch.set_num_threads(os.cpu_count() or 1)
    want = {r["corpus_id"]: r["score"] for r in ce.rank(query, cands)}
    warm = {}
    if method.startswith("python_rank"):
        def run():
            return ce.rank(query, cands)
    else:
        def run():
            return subprocess.run([str(binary), str(export), "--rank", "--batch-size", BATCH], input=stdin,
                                  capture_output=True, text=True, check=True)
        cmd = [str(binary), str(export), "--rank", "--batch-size", BATCH, "--repeat", str(REPEAT)]
        timed = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True)
        got = {int(i): float(s) for i, s in (line.split("\t") for line in timed.stdout.splitlines())}
        assert got.keys() == want.keys()
        tol = 1e-3 if dtype == torch.float32 else 2e-2  # bf16: the two sides round in different places
        assert max(abs(got[i] - want[i]) for i in want) < tol, "C++ scores differ from CrossEncoder.rank's"
        m = re.search(r"median ([\d.]+) ms, p90 ([\d.]+) ms", timed.stderr)
        warm = dict(warm_median_ms=float(m.group(1)), warm_p90_ms=float(m.group(2)), warm_runs=REPEAT)
    benchmark.group = f"bindings-cpu-rerank-minilm-{row[0]}cands-{row[1]}-{row[2]}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        method=method, model="minilm-l6-h384", device="cpu", dtype=str(dtype).removeprefix("torch."),
        timed_from="text",
        pairs=len(cands), tokens=sum(lens), median_ms=benchmark.stats.stats.median * 1e3,
        cpp_batch_size=int(BATCH), **warm,
    )
