"""Machine-independent results: the float64 path end to end, and the same numbers under
emulated machines (ATen's scalar and AVX2 kernels, MKL's AVX2 and conditional-reproducibility
paths), which is what lets the notebooks' stored outputs hold on any CPU."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3_lab.config import ModelArgs
from dsv3_lab.fp8 import FP8Linear, convert_to_fp8
from dsv3_lab.model import Transformer
from dsv3_lab.mtp import MTP, mtp_loss
from dsv3_lab.notebook import setup_notebook
from dsv3_lab.rope import precompute_freqs_cis
from dsv3_lab.train import loss_precision, next_token_loss

RECIPE = Path(__file__).with_name("portable_recipe.py")
# The two emulated machines of .ci/run: between them they change every path of the four single
# machines that `make test-portable` runs the notebooks under (each process costs ~8 s here,
# most of it importing torch).
MACHINES = {
    "unmodified": {},
    "aten-scalar+mkl-cbwr-compatible": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
    "aten-avx2+mkl-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


@pytest.fixture
def float64_default():
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)


def test_setup_notebook_sets_one_thread_and_float64(float64_default):
    torch.set_default_dtype(torch.float32)
    setup_notebook(seed=3)
    assert torch.get_num_threads() == 1 and torch.get_default_dtype() == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        setup_notebook(dtype=torch.float16)
    with pytest.raises(ValueError, match="threads"):
        setup_notebook(threads=0)


def test_rope_tables_follow_the_default_dtype(float64_default):
    args = ModelArgs.tiny()
    assert precompute_freqs_cis(args).dtype == torch.complex128
    table32 = precompute_freqs_cis(args, torch.float32)
    assert table32.dtype == torch.complex64
    torch.testing.assert_close(table32.to(torch.complex128), precompute_freqs_cis(args),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="float32 or float64"):
        precompute_freqs_cis(args, torch.float16)


def test_whole_recipe_stays_float64_end_to_end(float64_default):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny())
    mtp = MTP(model, depth=1)
    names = convert_to_fp8(model, block_size=32)
    assert names and all(isinstance(model.get_submodule(n), FP8Linear) for n in names)
    assert {p.dtype for p in mtp.parameters()} == {torch.float64}
    assert model.freqs_cis.dtype == torch.complex128
    batch = torch.randint(0, 256, (2, 17))
    logits = model(batch[:, :-1])
    assert logits.dtype == torch.float64
    loss, metrics = mtp_loss(mtp, batch)
    assert loss.dtype == torch.float64 and "mtp1_loss" in metrics
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in mtp.parameters())
    assert next_token_loss(model, batch).dtype == torch.float64


def test_loss_precision_keeps_float64_and_lifts_bf16():
    assert loss_precision(torch.zeros(2, dtype=torch.float64)).dtype == torch.float64
    assert loss_precision(torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(TypeError, match="floating-point"):
        loss_precision(torch.zeros(2, dtype=torch.long))


def _run_recipe(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, str(RECIPE), "6"], env=env, capture_output=True,
                         text=True, timeout=240, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    return {"losses": [float(x) for x in ast.literal_eval(lines["losses"])],
            "tokens": ast.literal_eval(lines["tokens"]), "dtype": lines["dtype"]}


def test_full_recipe_gives_the_same_numbers_on_every_emulated_machine():
    """Bias balancing + MTP + FP8 simulation, 6 training steps and a greedy sample, in a fresh
    process per machine: the losses agree to 1e-10 (printed digits: 4) and the tokens exactly."""
    runs = {name: _run_recipe(env) for name, env in MACHINES.items()}
    ref = runs["unmodified"]
    assert ref["dtype"] == "torch.float64 torch.complex128"
    for name, run in runs.items():
        assert run["tokens"] == ref["tokens"], name
        for a, b in zip(run["losses"], ref["losses"], strict=True):
            assert abs(a - b) <= 1e-10 * abs(b), (name, a, b)
