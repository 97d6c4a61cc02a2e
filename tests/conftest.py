import os

import pytest
import torch

# deterministic, and fair to a 2-core machine shared by the whole suite
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (modules of tiny ops use it: they are latency-bound, and
    two OpenMP threads on a shared 2-core box only add waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
