"""native against x86-64-v3 exports of MiniLM: the C++ in-process rank() of one query x 100 candidates.

Usage: python export_targets.py BUILD/relsum_rerank OUT_DIR  (the bindings built with CMake as in the
README; OUT_DIR receives the four exports).  Prints the median and p90 of 20 rank() calls, two runs each.
"""

import re
import subprocess
import sys
from pathlib import Path

import torch

from relsum_core.data import load_dataset
from relsum_core.export import export_ranker
from relsum_core.ranker import CrossEncoder, packaged_minilm_path
from relsum_core.text import attributes_text

binary, out_dir = sys.argv[1], Path(sys.argv[2])
catalog, judgments = load_dataset()
query = judgments[0].query
docs = [f"{p.title} {attributes_text(p)}"[:400].replace("\n", " ").replace("\t", " ")
        for p in list(catalog.values())[:100]]
for dtype in ("float32", "bfloat16"):
    ce = CrossEncoder.from_pretrained(packaged_minilm_path(), device="cpu", max_length=256)
    for target in ("native", "x86-64-v3"):
        out = export_ranker(ce, out_dir / f"minilm-{dtype}-{target}", dtype=getattr(torch, dtype),
                            target=target)
        runs = []
        for _ in range(2):
            done = subprocess.run([binary, str(out), "--rank", "--repeat", "20"],
                                  input="\n".join([query, *docs]) + "\n", capture_output=True, text=True)
            m = re.search(r"median ([\d.]+) ms, p90 ([\d.]+) ms", done.stderr)
            runs.append(m.groups() if m else done.stderr[-300:])
        print(dtype, target, runs, flush=True)
