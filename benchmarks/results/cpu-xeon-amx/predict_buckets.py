"""CrossEncoder.predict in bf16 on CPU: exact batch shapes against bucket shapes (time and memory).

Usage: python predict_buckets.py [PAIRS]  (default 4000).  Each layout runs in its own process, so
its resident-memory growth is its own: real MiniLM weights, ESCI product texts cut to 40-600
characters, batches of 32 pairs.  Prints one JSON line per layout.
"""

import json
import random
import subprocess
import sys
import time

if len(sys.argv) > 2:  # a child: one layout
    import numpy as np
    import torch

    from relsum_core.data import load_dataset
    from relsum_core.ranker import CrossEncoder, packaged_minilm_path
    from relsum_core.text import attributes_text

    n, layout = int(sys.argv[1]), sys.argv[2]

    def rss_mib() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    ce = CrossEncoder.from_pretrained(packaged_minilm_path(), device="cpu", dtype=torch.bfloat16)
    ce.use_buckets = layout == "bucket"
    catalog, judgments = load_dataset()
    rng = random.Random(0)
    docs = [f"{p.title} {attributes_text(p)}"[: rng.randint(40, 600)] for p in list(catalog.values())[:n]]
    pairs = [(judgments[i % len(judgments)].query, d) for i, d in enumerate(docs)]
    ce.predict(pairs[:64], batch_size=32)  # warm-up
    before, t0 = rss_mib(), time.perf_counter()
    scores = ce.predict(pairs, batch_size=32)
    print(json.dumps({"layout": layout, "pairs": len(pairs), "seconds": round(time.perf_counter() - t0, 2),
                      "rss_before_mib": round(before), "rss_after_mib": round(rss_mib()),
                      "score_checksum": float(np.round(scores.astype(np.float64).sum(), 3))}))
else:
    n = sys.argv[1] if len(sys.argv) > 1 else "4000"
    for layout in ("bucket", "exact", "bucket", "exact"):
        cmd = [sys.executable, __file__, n, layout]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)
