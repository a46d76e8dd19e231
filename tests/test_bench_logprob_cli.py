"""`relsum bench-logprob` argument checks: each bad argument is a one-line error before any benchmarking."""

import re

import pytest
import torch

from relsum_core import bench_logprob
from relsum_core.cli import main


@pytest.fixture
def no_benchmark(monkeypatch):
    """The checks must fire before ``run``: fail loudly if it is reached."""

    def run(*a, **k):
        raise AssertionError("the benchmark ran before the arguments were checked")

    monkeypatch.setattr(bench_logprob, "run", run)


@pytest.mark.parametrize("arg, value", [("repeats", 0), ("n", 0), ("d", -1), ("v", 0)])
def test_counts_must_be_positive(no_benchmark, arg, value):
    with pytest.raises(ValueError, match=f"{arg} must be >= 1, got {value}"):
        bench_logprob.main(**{"n": 8, "d": 4, "v": 16, "repeats": 1, arg: value})


def test_out_that_is_a_directory_is_refused_up_front(no_benchmark, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is a directory")):
        bench_logprob.main(n=8, d=4, v=16, repeats=1, out=str(tmp_path))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        bench_logprob.main(n=8, d=4, v=16, repeats=1, out=str(afile / "bench.json"))


def test_unknown_or_absent_device_is_a_clear_error(no_benchmark):
    with pytest.raises(ValueError, match="device 'tpu'; use cpu, cuda"):
        bench_logprob.main(n=8, d=4, v=16, repeats=1, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            bench_logprob.main(n=8, d=4, v=16, repeats=1, device="cuda")


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--device", "tpu"], ["--out", "."]])
def test_cli_exits_2_with_one_line(no_benchmark, capsys, args):
    with pytest.raises(SystemExit) as e:
        main(["bench-logprob", "--n", "8", "--d", "4", "--v", "16", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "ValueError" in err and "Traceback" not in err


def test_small_run_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    assert bench_logprob.main(n=8, d=4, v=16, repeats=1, out=str(out), device="cpu", with_compile=False) == 0
    assert out.is_file() and "naive_fp32" in out.read_text()
