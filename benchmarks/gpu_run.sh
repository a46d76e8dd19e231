#!/usr/bin/env bash
# One command for a lent H100/H200 (image: torch 2.11, triton 3.6, no network):
#   GPU correctness tests of the Triton kernels, then the GPU benchmarks, results under $OUT
#   (or benchmarks/results/gpu-<date> when OUT is unset).
# Peers that the image lacks travel as wheels in .whl/ (git-ignored), fetched beforehand with
#   pip download --no-deps -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# The repo imports without installing: relsum_core from the root, relsum_kernels through a link.
mkdir -p /tmp/relsum_shim && ln -sfn "$PWD/kernels" /tmp/relsum_shim/relsum_kernels
export PYTHONPATH="$PWD:/tmp/relsum_shim:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -x tests/test_logprob.py 2>&1 | tee "$out/tests.txt"
for suite in "${@:-logprob}"; do
    python3 -m pytest -q "benchmarks/test_bench_${suite}.py" --benchmark-json="$out/${suite}.json" \
        2>&1 | tail -n 5
    python3 benchmarks/summarize.py "$out/${suite}.json" --baseline naive_fp32 --baseline cut_cross_entropy \
        | tee "$out/${suite}.md"
done
