"""One-call notebook set-up: seeds, thread count, figure style, versions to print."""

from __future__ import annotations

import os
import platform
import random
import warnings

import numpy as np
import torch

from dsv3_lab.plot import use_style


def setup_notebook(seed: int = 0, threads: int = 2) -> dict[str, str]:
    """Seed python/numpy/torch, fix the thread count and the figure style.

    The thread count is fixed because float sums (and so the printed digits) can depend on it.
    Returns the versions of python, torch and numpy, to print in the (output-ignored) set-up cell.
    """
    if threads < 1:
        raise ValueError(f"setup_notebook: threads must be >= 1, got {threads}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
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
