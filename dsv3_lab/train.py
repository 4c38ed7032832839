"""A small AdamW training loop with warmup + cosine learning rate and a loss history.

Works with any `nn.Module` whose forward(tokens [B, S]) returns logits [B, S, V]. Batches are
LongTensors [B, S + 1] (see `dsv3_lab.data.ToyCorpus.batches`): inputs batch[:, :-1], targets
batch[:, 1:]. The default loss is next-token cross-entropy (mean over the B·S positions):

    L = -(1 / BS) Σ_{b,t} log softmax(model(x)[b, t])[x[b, t + 1]]

Learning rate at step t (0-based) of T steps, with W warmup steps and floor r = MIN_LR_RATIO:

    lr_t = lr · (t + 1) / W                                         t < W
    lr_t = lr · (r + (1 - r) · ½ (1 + cos(π (t - W) / max(1, T - W - 1))))    t >= W

so the last step runs at r · lr. AdamW decays only parameters with >= 2 dimensions (matrices and
embeddings), not norms' weights or biases. Gradients are clipped to a global norm `grad_clip`.

API
    train(model, batches, steps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), warmup=20,
          grad_clip=1.0, seed=0, loss_fn=None, after_step=None, progress=True, desc="train")
        -> TrainResult(losses, metrics, lrs, seconds, tokens_per_s); .steps_per_s property
    evaluate(model, batches, loss_fn=None) -> float      mean loss over a finite iterable
    next_token_loss(model, batch) -> scalar tensor       the default loss_fn
    loss_precision(logits) -> logits                     float64 stays float64, BF16 -> float32
    lr_at(step, steps, lr, warmup) -> float              the schedule above
    param_groups(model, weight_decay) -> list[dict]      AdamW groups (buffers never included)

Hooks
    loss_fn(model, batch) returns a scalar loss tensor, or (loss, metrics: dict[str, float]);
        the metrics are recorded per step in TrainResult.metrics.
    after_step(step, model, metrics) runs after optimizer.step() (e.g. to update MoE gate
        biases); it may add entries to `metrics`, which are recorded too.
    TrainResult.metrics always holds "grad_norm" (before clipping). Every metric list has one
    value per step; a metric missing at some step is recorded as nan there.

Default lr: on Transformer(ModelArgs.tiny()) (0.33M parameters), batch 16 x 64 bytes of ToyCorpus,
a sweep gave validation loss 1.19 / 0.98 / 0.98 / 1.19 nats after 300 steps at lr 3e-3 / 1e-2 /
2e-2 / 4e-2 (and 2.03 / 1.67 / 1.61 after 100 steps at 3e-3 / 1e-2 / 2e-2), so lr = 1e-2.

Determinism: `train` seeds torch with `seed` before the loop; the same model initialisation and
the same batches give the identical loss history.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

MIN_LR_RATIO = 0.1

LossFn = Callable[[nn.Module, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict]"]
AfterStep = Callable[[int, nn.Module, dict], None]


@dataclass
class TrainResult:
    """What `train` measured: per-step losses, metrics and learning rates, and the speed."""

    losses: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_s: float = 0.0

    @property
    def steps_per_s(self) -> float:
        return len(self.losses) / max(self.seconds, 1e-9)


def check_batch(batch: object) -> torch.Tensor:
    """Raise unless `batch` is a 2-D LongTensor [B, S + 1] with S + 1 >= 2."""
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.long:
        kind = batch.dtype if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise TypeError(f"expected a batch LongTensor [B, S+1], got {kind}")
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"expected a batch of shape [B, S+1] with S+1 >= 2, "
                         f"got {tuple(batch.shape)}")
    return batch


def loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """Logits in the precision losses are computed in: BF16/FP16 go up to float32 (as the
    official code does), float32 and float64 stay as they are. A float64 model must not drop to
    float32 here: float32 softmax/log differ in their last bits between CPUs, and a training
    run amplifies them into the printed digits (see dsv3_lab.notebook.setup_notebook)."""
    if not logits.is_floating_point():
        raise TypeError(f"expected floating-point logits, got {logits.dtype}")
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of model(batch[:, :-1]) against batch[:, 1:], mean over B·S tokens."""
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, S], [B, S]
    logits = model(inputs)  # [B, S, V]
    if logits.dim() != 3 or logits.shape[:2] != inputs.shape:
        raise ValueError(f"model(tokens {tuple(inputs.shape)}) must return logits [B, S, V], "
                         f"got {tuple(logits.shape)}")
    return F.cross_entropy(loss_precision(logits).flatten(0, 1), targets.flatten())  # scalar


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Learning rate of 0-based `step`: linear warmup, then cosine down to MIN_LR_RATIO · lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)  # 0 .. 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)


def _split_loss(out) -> tuple[torch.Tensor, dict]:
    loss, metrics = out if isinstance(out, tuple) else (out, {})
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor or (loss, metrics), got {out!r}")
    if not isinstance(metrics, dict):
        raise TypeError(f"loss_fn's metrics must be a dict, got {type(metrics).__name__}")
    return loss.reshape(()), dict(metrics)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: trainable tensors with >= 2 dims decay, the rest (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _record(store: dict[str, list[float]], metrics: dict, step: int) -> None:
    for name, value in metrics.items():
        store.setdefault(name, [math.nan] * step).append(float(value))
    for values in store.values():  # keep every list one value per step
        if len(values) < step + 1:
            values.append(math.nan)


def train(model: nn.Module, batches: Iterable[torch.Tensor], steps: int, lr: float = 1e-2,
          weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), warmup: int = 20,
          grad_clip: float | None = 1.0, seed: int = 0, loss_fn: LossFn | None = None,
          after_step: AfterStep | None = None, progress: bool = True,
          desc: str = "train") -> TrainResult:
    """Train `model` for `steps` AdamW steps on `batches`; see the module docstring."""
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    loss_fn = loss_fn or next_token_loss
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas,
                                  foreach=True)  # one fused loop over the tensors: ~10% faster
    iterator: Iterator[torch.Tensor] = iter(batches)
    result = TrainResult()
    tokens = 0
    torch.manual_seed(seed)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, file=sys.stderr)
    for step in bar:
        try:
            batch = check_batch(next(iterator)).to(device)  # [B, S+1]
        except StopIteration:
            raise ValueError(f"batches ran out after {step} of {steps} steps") from None
        lr_now = lr_at(step, steps, lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        loss, metrics = _split_loss(loss_fn(model, batch))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        clip = grad_clip if grad_clip else math.inf
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        metrics["grad_norm"] = float(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step, model, metrics)
        result.losses.append(float(loss.detach()))
        result.lrs.append(lr_now)
        _record(result.metrics, metrics, step)
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    bar.close()
    result.seconds = time.perf_counter() - start
    result.tokens_per_s = tokens / max(result.seconds, 1e-9)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor],
             loss_fn: LossFn | None = None) -> float:
    """Mean loss over a finite iterable of batches, in eval mode (the mode is restored)."""
    loss_fn = loss_fn or next_token_loss
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = [float(_split_loss(loss_fn(model, check_batch(b).to(device)))[0])
                  for b in batches]
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("evaluate: batches is empty")
    return sum(losses) / len(losses)
