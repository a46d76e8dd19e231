"""The Python CrossEncoder under varied requests, for comparison with relsum_soak: resident MiB
every 25 requests.  python py_soak.py {bf16|fp32} REQUESTS [on|off]  (off: no trim)."""

import random
import sys
import time

import numpy as np
import torch

from relsum_core.data import load_dataset
from relsum_core.ranker import CrossEncoder, _resident_mib, packaged_minilm_path
from relsum_core.text import attributes_text


def main(dtype_name: str, requests: int, trim: str = "on") -> None:
    catalog, judgments = load_dataset()
    docs = [t for p in catalog.values() for t in (p.title, p.title + " | " + attributes_text(p))]
    queries = sorted({j.query for j in judgments})
    ce = CrossEncoder.from_pretrained(packaged_minilm_path(),
                                      dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float32)
    if trim == "off":
        ce.trim_threshold_mib = None
    rng = random.Random(1234)

    def request():
        query = rng.choice(queries)
        n = int(np.exp(rng.uniform(0, np.log(300)))) if rng.random() < 0.75 else rng.randint(1, 300)
        cands = []
        for _ in range(n):
            words = rng.choice(docs).split()
            cands.append(" ".join(words[:rng.randint(4, 20) if rng.random() < 0.6 else rng.randint(20, 100)]))
        return query, cands

    ce.rank(*request())
    base, start, latency = _resident_mib(), time.time(), []
    print(f"base {base:.0f} MiB", flush=True)
    for i in range(1, requests + 1):
        query, cands = request()
        t = time.perf_counter()
        ce.rank(query, cands)
        latency.append(time.perf_counter() - t)
        if i % 25 == 0:
            rss = _resident_mib()
            print(f"{i} rss {rss:.0f} (+{rss - base:.0f}) t={time.time() - start:.0f}s "
                  f"p50={np.median(latency) * 1e3:.0f}ms", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
