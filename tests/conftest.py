import os
import sys

import pytest
import torch

# tests/ holds shared helpers (reference implementations, fixtures)
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@pytest.fixture(scope="session")
def compose_run():
    """compose_run(*overrides): the config `python -m softmoe.train <overrides>` would run (nothing runs)."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides, hydra_node=False):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=hydra_node)

    return _compose
