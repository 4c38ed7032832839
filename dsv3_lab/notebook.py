"""One-call notebook set-up: seeds, thread count, figure style, versions to print."""

from __future__ import annotations

import os
import platform
import random
import warnings

import numpy as np
import torch

from dsv3_lab.plot import use_style


def setup_notebook(seed: int = 0, threads: int = 1,
                   dtype: torch.dtype = torch.float64) -> dict[str, str]:
    """Seed python/numpy/torch, fix the thread count, the default dtype and the figure style.

    Portability: stored outputs must be the same on every CPU. float32 kernels (softmax, exp,
    matmul, the vectorised float32 randn) give different last bits on different CPUs (ATen's
    AVX2/AVX-512/scalar paths, MKL's code paths), and a training run amplifies them into the
    printed digits. In float64 those differences stay ~1e-16 and round away, and float64 randn
    and every uniform_ draw the same numbers everywhere. So models built after this call are
    float64 (dtype), and one thread keeps every sum in one order.
    Returns the versions of python, torch and numpy, to print in the (output-ignored) set-up cell.
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"setup_notebook: threads must be an int >= 1, got {threads!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"setup_notebook: dtype must be torch.float32 or torch.float64, "
                         f"got {dtype!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_printoptions(precision=4, sci_mode=False)
    use_style()
    # Keep notebook output stable: no per-run warning text from libraries imported later
    # (transformers' config advice, tqdm's "IProgress not found" when ipywidgets is absent).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message="IProgress not found")
    warnings.filterwarnings("ignore", category=UserWarning, module="matplotlib")
    warnings.filterwarnings("ignore", category=FutureWarning)
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}
