"""Several runs on one GPU: launcher=joblib with N jobs, each capped at trainer.cuda_memory_fraction of the device,
and trainer.data_on_device=auto under trainer=gpu. Composition and checks run anywhere; the cap itself and the
training split on the GPU need CUDA (``python -m pytest -m cuda``)."""

from __future__ import annotations

import logging

import pytest
import torch

from softmoe.harness.config import check_config
from softmoe.harness.errors import ConfigError
from softmoe.harness.gpu_share import cap_cuda_memory, memory_share
from softmoe.harness.loop import train

GPU_SWEEP = ["experiment=fashion_converged", "trainer=gpu", "logger=none", "launcher=joblib", "launcher.n_jobs=5",
             "trainer.cuda_memory_fraction=0.19"]


def test_the_gpu_sweep_command_composes_n_jobs_each_with_its_memory_share_and_the_split_on_the_device(compose_run):
    cfg = compose_run(*GPU_SWEEP, hydra_node=True)
    assert cfg.hydra.launcher.n_jobs == 5 and cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.trainer.cuda_memory_fraction == 0.19 and cfg.trainer.data_on_device == "auto"
    assert cfg.trainer.device == "cuda" and cfg.data.name == "fashion_mnist"
    assert compose_run("trainer=default").trainer.data_on_device is False  # the CPU trainer keeps the DataLoader
    if not torch.cuda.is_available():  # validation refuses cuda on a machine without it
        check_config(compose_run(*GPU_SWEEP, "trainer.device=cpu"))


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.cuda_memory_fraction=0", r"trainer.cuda_memory_fraction=0: must be a number in \(0, 1\], or null"),
        ("trainer.cuda_memory_fraction=1.5", r"trainer.cuda_memory_fraction=1.5: must be a number in \(0, 1\]"),
        ("trainer.data_on_device=yes", "trainer.data_on_device=yes: must be auto, true or false"),
    ],
)
def test_bad_values_are_refused_naming_the_key(compose_run, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_run(override))


def test_on_a_cpu_the_memory_share_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="softmoe.harness.gpu_share"):
        cap_cuda_memory(torch.device("cpu"), 0.25)
    assert "trainer.cuda_memory_fraction=0.25: ignored on cpu" in caplog.text
    assert memory_share(torch.device("cpu"), 0.25) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_memory_fraction_caps_this_processs_allocations():
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    try:
        cap_cuda_memory(device, 0.05)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(0.10 * total), dtype=torch.uint8, device=device)  # twice the share
        assert memory_share(device, 0.05) == int(0.05 * total)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_with_a_memory_share_batches_the_training_split_on_the_gpu(compose_run, tmp_path, caplog):
    overrides = ["trainer=gpu", "trainer.cuda_memory_fraction=0.2", "trainer.compile=false", "trainer.max_steps=4",
                 "trainer.eval_batches=1", "trainer.batch_size=64", "data.augment=true", "logger=none",
                 "trainer.progress_bar=false"]
    try:
        with caplog.at_level(logging.INFO, logger="softmoe.harness.data.device_loader"):
            summary = train(compose_run(*overrides), tmp_path)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert summary.steps == 4
    assert "trainer.data_on_device=auto: train / val / test on cuda" in caplog.text
