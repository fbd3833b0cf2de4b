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
