"""Offline compilation of the real (non-interpreted) Triton kernels to sm_90 cubins with triton's
bundled ptxas, so a CPU-only CI still catches what only the GPU compiler rejects (dot shapes,
dtypes, layouts).  The script runs in a subprocess because TRITON_INTERPRET is fixed per process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

PRELUDE = textwrap.dedent(r"""
    import importlib
    import os
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    def compile_sm90(fn, sig, consts, num_warps=4, num_stages=3, aligned=(), spill_ok=0):  # launch defaults
        # aligned: arguments a real launch specialises as multiples of 16 (pointers from torch's
        # allocator, strides and sizes such as 384): without that ptxas sees scalar loads.
        sig = {**sig, **{k: "constexpr" for k in consts}}
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        k = compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=num_warps, num_stages=num_stages))
        assert len(k.asm["cubin"]) > 0
        # Register spills go to local memory and cost far more than they look: none allowed.
        ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
        os.unlink(f.name)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", report)]
        assert spills and max(spills) <= spill_ok, f"{fn.__name__} {consts}: {report}"
        print("compiled", fn.__name__, consts)
""")

needs_offline_compiler = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CUDA tests compile and run the kernels for real")


def compile_offline(script: str) -> str:
    """Run PRELUDE + script without the interpreter; return its stdout (skip if no ptxas)."""
    try:
        import triton.backends.nvidia as nv
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no offline CUDA compiler in this triton install: {e}")
    if not os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout
