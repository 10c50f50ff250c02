import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module's tests: tiny models run many very small ops, and OpenMP threads only add
    contention to them (seconds per test on a busy 2-core machine instead of milliseconds). Restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
