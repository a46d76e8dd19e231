import pytest
import torch

from relsum_core import precision
from relsum_core.precision import resolve_precision


def test_precision_choices(monkeypatch):
    assert resolve_precision("fp32", "cuda") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    assert resolve_precision("auto", "cuda") == torch.bfloat16
    assert resolve_precision("auto", "cuda", auto_on_cuda=False) == torch.float32
    for native in (True, False):  # auto on CPU: bf16 only where the CPU multiplies bf16 natively
        monkeypatch.setattr(precision, "cpu_has_bf16_dot", lambda native=native: native)
        for device in ("cpu", None):
            assert resolve_precision("auto", device) == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_cli_choices_match():
    from relsum_core.cli import PRECISION_CHOICES, SPLIT_CHOICES, TARGET_CHOICES
    from relsum_core.evaluate import SPLITS
    from relsum_core.export import TARGETS

    assert PRECISION_CHOICES == precision.PRECISIONS
    assert SPLIT_CHOICES == SPLITS and TARGET_CHOICES == TARGETS


def test_resolve_device_checks_the_name_and_cuda_up_front():
    from relsum_core.precision import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            resolve_device("cuda")


def test_device_scope_selects_the_models_cuda_device():
    import contextlib

    assert isinstance(precision.device_scope(torch.device("cpu")), contextlib.nullcontext)
    scope = precision.device_scope(torch.device("cuda", 1))  # built only: entering needs the GPU
    assert isinstance(scope, torch.cuda.device) and scope.idx == 1


def test_claim_device_fills_the_index_and_makes_it_current(monkeypatch):
    """A bare "cuda" (what resolve_device gives) must become cuda:<current> before set_device, which
    refuses it."""
    current, made = [3], []

    def set_device(dev):
        if not isinstance(dev, int) and dev.index is None:  # as torch.cuda.set_device does
            raise ValueError("Expected a torch.device with a specified index or an integer")
        made.append(dev)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert precision.claim_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert precision.claim_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert made == [torch.device("cuda", 3), torch.device("cuda", 1)]
    assert precision.claim_device(torch.device("cpu")) == torch.device("cpu") and len(made) == 2


# kills P01 (both extensions required), P02 (a torch without the probes counted as bf16), P03 (AMX only)
def test_cpu_has_bf16_dot_takes_either_extension(monkeypatch):
    for avx512_bf16, amx in ((True, False), (False, True), (True, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert precision.cpu_has_bf16_dot() == (avx512_bf16 or amx)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert precision.cpu_has_bf16_dot() is False


# kills P04 (None always the CPU), P05 (a non-string device a TypeError), P06 / P07 (an index past the
# GPUs accepted)
def test_resolve_device_with_cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert precision.resolve_device(None) == torch.device("cuda")
    assert precision.resolve_device("cuda:1") == torch.device("cuda", 1)
    for bad in ("cuda:2", "cuda:3"):
        with pytest.raises(ValueError, match="only 2 CUDA device"):
            precision.resolve_device(bad)
    with pytest.raises(ValueError, match="unknown device 3.5"):
        precision.resolve_device(3.5)
