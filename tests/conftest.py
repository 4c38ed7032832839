"""Every test starts from torch's defaults (float32, the machine's thread count) and leaves them
as it found them: a test that switches to float64 (as the notebooks do) must not change what
the next test sees, whatever order pytest-xdist runs the files in."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_defaults():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
