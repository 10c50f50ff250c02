import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist the cores are shared out between the workers: each worker's torch, and the processes its tests
# start, get their share of threads instead of all of them (OpenMP threads of two workers contending for the same
# cores slow both down many times over).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))


def pytest_configure(config):
    config.addinivalue_line("markers", "long(seconds): takes about that long on an idle 2-core machine; started "
                                       "first, the longest first (see below)")


def _expected_seconds(item) -> float:
    marker = item.get_closest_marker("long")
    return marker.args[0] if marker is not None else 0.0


def pytest_collection_modifyitems(items):
    # Longest first: `make test` runs the suite on every core (pytest-xdist), and a long test started last keeps one
    # worker busy after the others have finished. Started first, the other workers take the short tests meanwhile.
    items.sort(key=_expected_seconds, reverse=True)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module's tests: tiny models run many very small ops, and OpenMP threads only add
    contention to them (seconds per test on a busy 2-core machine instead of milliseconds). Restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
