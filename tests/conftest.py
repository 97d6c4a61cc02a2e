import os

import pytest
import torch

# deterministic, and fair to a 2-core machine shared by the whole suite
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
