#!/usr/bin/env bash
# One command for a lent H100/H200 (image: torch 2.11, triton 3.6, no network):
#   GPU correctness tests of the Triton kernels, then the GPU benchmarks, results under $OUT
#   (or benchmarks/results/gpu-<date> when OUT is unset).
# Peers that the image lacks travel as wheels in .whl/ (git-ignored), fetched beforehand with
#   pip download --no-deps -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5
# and MiniLM's tokenizer (the benchmarks' texts; its 90 MB weights are not needed) in .minilm/:
#   mkdir -p .minilm && cp "$(python -c 'from relsum_core.ranker import packaged_minilm_path as p; print(p())')"/\
#       {config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .minilm/
# Carry .whl and .minilm with the call (both are git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
[ -d .minilm ] && export RELSUM_MINILM="$PWD/.minilm"
# The repo imports without installing: relsum_core from the root, relsum_kernels through a link.
mkdir -p /tmp/relsum_shim && ln -sfn "$PWD/kernels" /tmp/relsum_shim/relsum_kernels
export PYTHONPATH="$PWD:/tmp/relsum_shim:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q tests/test_logprob.py tests/test_varlen_attention.py tests/test_encoder_epilogues.py \
    tests/test_encoder.py tests/test_ranker.py 2>&1 | tee "$out/tests.txt" | tail -n 15
# suite -> the variants its ratio columns divide by
declare -A baselines=(
    [logprob]="naive_fp32 cut_cross_entropy"
    [ranker]="hf_sdpa_sorted peer_varlen_attn_compile"
    [encoder_kernels]="sdpa_padded torch_varlen_attn"
)
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(logprob ranker encoder_kernels)
for suite in "${suites[@]}"; do
    python3 -m pytest -q "benchmarks/test_bench_${suite}.py" -k "not cpu" --benchmark-json="$out/${suite}.json" \
        2>&1 | tail -n 3
    args=()
    for b in ${baselines[$suite]}; do args+=(--baseline "$b"); done
    python3 benchmarks/summarize.py "$out/${suite}.json" "${args[@]}" | tee "$out/${suite}.md"
done
