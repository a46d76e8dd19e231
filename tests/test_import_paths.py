"""Running from a checkout's root puts its ``kernels/`` folder on sys.path as ``kernels``."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_at_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # ``-c`` puts the working directory first on sys.path, as ``python -m`` does
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_bert_and_relsum_kernels_import_from_the_checkout_root():
    code = ("import kernels, relsum_kernels\n"
            "from transformers import BertForSequenceClassification\n"
            "print(kernels.__file__)\n"
            "print(relsum_kernels.varlen_attention.__module__)\n")
    res = _run_at_root(code)
    assert res.returncode == 0, res.stderr
    kernels_file, attention_module = res.stdout.split()
    assert attention_module == "relsum_kernels.varlen_attention"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # nothing to shadow: the folder itself loads
        assert Path(kernels_file).resolve().parent == ROOT / "kernels"
    else:  # Hugging Face's package answers to its own name
        assert not Path(kernels_file).resolve().is_relative_to(ROOT)


def test_interpreter_version_guard(monkeypatch):
    """The suite stops at the start, naming the fix, where triton's interpreter cannot run the
    kernels (triton 3.6 with numpy 2.4), instead of failing deep inside every kernel test."""
    import numpy
    import triton

    from conftest import interpreter_mismatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    assert "needs numpy < 2.4" in interpreter_mismatch()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert interpreter_mismatch() is None
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    monkeypatch.setattr(triton, "__version__", "3.7.1")
    assert interpreter_mismatch() is None
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels (a GPU) are not affected
    assert interpreter_mismatch() is None
