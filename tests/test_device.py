"""trainer.device=auto picks CUDA, then Apple's GPU (MPS), then the CPU; the MPS path trains in float32.

MPS cannot run here: the choice is tested with the availability checks replaced.
"""

import pytest
import torch

from softmoe.harness.config import ConfigError, resolve_device, check_config


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"),
    (True, False, "cuda"),
    (False, True, "mps"),
    (False, False, "cpu"),
])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["cpu", "mps", "cuda:1"])
def test_an_explicit_device_is_taken_as_given(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(name) == torch.device(name)


@pytest.mark.parametrize("device", ["auto", "mps"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_mps_path_refuses_reduced_precision(monkeypatch, compose_run, device, precision):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    cfg = compose_run(f"trainer.device={device}", f"trainer.precision={precision}", "logger=none")
    with pytest.raises(ConfigError, match=f"trainer.precision={precision}"):
        check_config(cfg)


def test_the_mps_path_accepts_float32(monkeypatch, compose_run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_config(compose_run("trainer.device=mps", "trainer.precision=fp32", "logger=none"))
