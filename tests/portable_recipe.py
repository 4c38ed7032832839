"""The course's full toy recipe in float64 (bias balancing, MTP, FP8 simulation), run briefly;
prints the per-step losses as exact reprs. tests/test_portable.py runs it under emulated
machines and compares the output. Usage: python tests/portable_recipe.py [steps]"""

import sys

import torch

from dsv3_lab.notebook import setup_notebook

setup_notebook(seed=0)  # one thread, float64

from dsv3_lab.balance import BalanceHook  # noqa: E402
from dsv3_lab.config import ModelArgs  # noqa: E402
from dsv3_lab.data import ToyCorpus  # noqa: E402
from dsv3_lab.fp8 import convert_to_fp8  # noqa: E402
from dsv3_lab.model import Transformer, generate  # noqa: E402
from dsv3_lab.mtp import MTP, mtp_loss  # noqa: E402
from dsv3_lab.train import train  # noqa: E402

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
torch.manual_seed(0)
model = Transformer(ModelArgs.tiny())
mtp = MTP(model, depth=1)
convert_to_fp8(model, block_size=32)
corpus = ToyCorpus(seed=0, n_docs=200)
hook = BalanceHook(gamma=1e-2)  # the bias rule on every MoE gate after each step
result = train(mtp, corpus.batches("train", 8, 32, seed=0), steps, progress=False,
               loss_fn=lambda m, b: mtp_loss(m, b, lam=0.3),
               after_step=lambda step, _, metrics: hook(step, model, metrics))
prompt = torch.tensor([list(b"def ")])
print("losses", [repr(x) for x in result.losses])
print("tokens", generate(model, prompt, 12, temperature=0.0)[0].tolist())
print("dtype", next(model.parameters()).dtype, model.freqs_cis.dtype)
