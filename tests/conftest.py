"""Every test starts from torch's defaults (float32, the session's thread count) and leaves them
as it found them: a test that switches to float64 (as the notebooks do) must not change what
the next test sees, whatever order pytest-xdist runs the files in.

Under pytest-xdist the workers share the cores: each worker's torch gets its share of them (one
thread per worker on a 2-core machine with `-n 2`). With the machine's full thread count in
every worker, OpenMP threads spin while the other worker (and a notebook's forked seed workers)
hold the cores: a 1 s test took a minute.
"""

import os

import pytest
import torch


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // workers))


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
