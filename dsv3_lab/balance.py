"""Load balancing for DeepSeekMoE: the auxiliary-loss-free bias rule, balance losses, MaxVio.

Bias rule (V3 §2.1.2, LF Algorithm 1). Each routed expert i has a bias b_i that is added to its
affinity s_{i,t} only to *choose* the top-K experts (dsv3_lab.moe.Gate). After every training
step, with c_i the number of tokens routed to expert i over the whole batch and c̄ = mean_i c_i:

    b_i ← b_i + γ · sign(c̄ − c_i)            overloaded experts go down, underloaded go up

b is a float32 buffer: it is not a Parameter, so no gradient reaches it and the optimizer never
sees it; the gate weights never see it either (the mixing weights g use the unbiased s).
The update comes *after* the step, from loads already seen: LF §3 adjusts the bias from the
previous batches only, because using the load of the current sequence to route it would break
the causal constraint of language modelling (future tokens would leak into the routing).
V3 uses γ = 0.001, and γ = 0 for its last 500B tokens (V3 §4.2).

Complementary sequence-wise balance loss (V3 Eq. 17-20), for one sequence of T tokens, N_r
routed experts of which K_r are chosen per token:

    f_i      = N_r / (K_r T) · Σ_t 1(expert i is in token t's top-K)                  (Eq. 18)
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t}             (normalised over all routed experts)  (Eq. 19)
    P_i      = (1/T) Σ_t s'_{i,t}                                                     (Eq. 20)
    L_Bal    = α Σ_i f_i P_i                                                           (Eq. 17)

f carries no gradient (it counts); the gradient reaches the gate through P. With perfect balance
f_i = 1 and P_i = 1/N_r, so Σ_i f_i P_i = 1. Here the loss is averaged over the sequences of a
batch. DeepSeek-V2's "expert-level balance loss" (V2 §2.2.3, Eq. 23-25; α_1 = 0.003, V2 §3.1.2)
is this same per-sequence loss ("T denotes the number of tokens in a sequence") with softmax
scores, for which the normalisation of Eq. 19 changes nothing; LF Eq. 2 too is per sequence.

Batch-wise auxiliary loss (V3 §4.5.3, the report's control experiment): the same formula with
T = all tokens of the batch, so only the batch is balanced, not each sequence, as the bias rule
does. `batch_balance_loss`, kind="batch" ("expert" is kept as an alias, the name used before).
A model-level loss sums the per-layer losses of every MoE layer.

Metric (LF §4.1): MaxVio = (max_i c_i − c̄) / c̄, over one training batch (MaxVio_batch) or a
held-out set (MaxVio_global), averaged over the MoE layers. 0 means perfectly balanced;
MaxVio = 1 means the busiest expert carries twice its fair share.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lab.moe import Gate, MoE
from dsv3_lab.train import loss_precision


def _moe_layers(model: nn.Module) -> list[MoE]:
    layers = model.moe_layers() if hasattr(model, "moe_layers") else [
        m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers")
    return list(layers)


# ----------------------------------------------------------------------------- metric
def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i − mean load) / mean load along the last dim: [..., E] -> [...]."""
    if not isinstance(load, torch.Tensor) or load.dim() < 1 or load.shape[-1] < 1:
        raise ValueError(f"max_violation: expected a load tensor [..., E], got {load!r}")
    load = load.double()  # counts can be integers
    mean = load.mean(dim=-1)  # [...]
    if (mean <= 0).any():
        raise ValueError("max_violation: the load has no tokens (mean load 0)")
    return (load.max(dim=-1).values - mean) / mean  # [...]


def layer_loads(model: nn.Module) -> torch.Tensor:
    """The `last_load` of every MoE layer of `model` after a forward: LongTensor [L, E]."""
    loads = [moe.last_load for moe in _moe_layers(model)]
    if any(load is None for load in loads):
        raise ValueError("layer_loads: run a forward pass first (an MoE layer has no last_load)")
    return torch.stack(loads)  # [L, E]


def sequence_loads(model: nn.Module, batch_size: int) -> torch.Tensor:
    """Per-sequence load of the latest forward of [B, S] tokens: LongTensor [B, L, E].

    Summing over the B sequences gives `layer_loads(model)`; MaxVio over groups of sequences
    shows how the balance of a batch depends on its size.
    """
    loads = []
    for moe in _moe_layers(model):
        indices = moe.gate.last_indices  # [B·S, K], batch-major
        if indices is None or indices.shape[0] % batch_size:
            raise ValueError(f"sequence_loads: the latest forward does not split into "
                             f"{batch_size} sequences")
        chosen = F.one_hot(indices.view(batch_size, -1), moe.n_routed_experts)  # [B, S·K, E]
        loads.append(chosen.sum(dim=1))  # [B, E]
    return torch.stack(loads, dim=1)  # [B, L, E]


@torch.no_grad()
def collect_load(model: nn.Module, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Tokens routed to each expert of each MoE layer over `batches` [B, S+1]: [L, E].

    Runs model(batch[:, :-1]) in eval mode (restored afterwards), like the evaluation loss.
    """
    was_training = model.training
    model.eval()
    total = None
    try:
        for batch in batches:
            model(batch[:, :-1])  # [B, S, V]; only the routing is kept
            load = layer_loads(model)  # [L, E]
            total = load.clone() if total is None else total + load
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("collect_load: batches is empty")
    return total  # [L, E]


def maxvio_global(model: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """MaxVio of the load over a held-out set, averaged over the MoE layers."""
    return float(max_violation(collect_load(model, batches)).mean())


# ----------------------------------------------------------------------------- bias rule
@torch.no_grad()
def update_bias(gate: Gate, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """b_i ← b_i + γ·sign(mean(load) − load_i), in place; returns the step added to b [E].

    `load` [E] is the token count of each expert over the whole batch of the step.
    Experts exactly at the mean (sign 0) keep their bias.
    """
    if not isinstance(gate, Gate):
        raise TypeError(f"update_bias: expected a dsv3_lab.moe.Gate, got {type(gate).__name__}")
    if load.shape != gate.bias.shape:
        raise ValueError(f"update_bias: expected load of shape {tuple(gate.bias.shape)} "
                         f"(one count per routed expert), got {tuple(load.shape)}")
    if gamma < 0:
        raise ValueError(f"update_bias: gamma must be >= 0, got {gamma}")
    load = load.to(torch.float32)  # [E]
    step = gamma * torch.sign(load.mean() - load)  # [E]: + underloaded, − overloaded
    gate.bias.add_(step.to(gate.bias.device))
    return step


class BalanceHook:
    """`after_step` for dsv3_lab.train.train: records MaxVio_batch and applies the bias rule.

    After every step it reads each MoE layer's `last_load` (the step's whole batch), stores
    metrics["maxvio_batch"] (mean over layers) and, if gamma > 0, updates every gate's bias.
    gamma = 0 only measures (the no-balancing and auxiliary-loss runs). `bias_history` keeps
    the biases [L, E] after every step.
    """

    def __init__(self, gamma: float = 0.0):
        if gamma < 0:
            raise ValueError(f"BalanceHook: gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.bias_history: list[torch.Tensor] = []

    def __call__(self, step: int, model: nn.Module, metrics: dict) -> None:
        loads = layer_loads(model)  # [L, E]
        metrics["maxvio_batch"] = float(max_violation(loads).mean())
        layers = _moe_layers(model)
        if self.gamma > 0:
            for moe, load in zip(layers, loads, strict=True):
                update_bias(moe.gate, load, self.gamma)
        self.bias_history.append(torch.stack([moe.gate.bias.detach().clone() for moe in layers]))


# ----------------------------------------------------------------------------- losses
def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor,
                          alpha: float = 1.0) -> torch.Tensor:
    """α Σ_i f_i P_i (Eq. 17-20) per sequence, averaged over sequences: a scalar.

    scores [B, S, E] are the unbiased affinities s (with gradient), indices [B, S, K] the chosen
    experts. For the batch-wise loss (V3 §4.5.3) pass [1, B·S, ...] or use `batch_balance_loss`.
    """
    if scores.dim() != 3 or indices.dim() != 3 or scores.shape[:2] != indices.shape[:2]:
        raise ValueError(f"sequence_balance_loss: expected scores [B, S, E] and indices "
                         f"[B, S, K], got {tuple(scores.shape)} and {tuple(indices.shape)}")
    n_seq, seq_len, n_experts = scores.shape
    k = indices.shape[-1]
    chosen = F.one_hot(indices, n_experts).sum(dim=2)  # [B, S, E]: 1 where t routed to i
    f = chosen.sum(dim=1).to(scores.dtype) * n_experts / (k * seq_len)  # f_i [B, E]
    normalised = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t} [B, S, E]
    p = normalised.mean(dim=1)  # P_i [B, E]
    return alpha * (f * p).sum(dim=-1).mean()  # scalar


def batch_balance_loss(scores: torch.Tensor, indices: torch.Tensor,
                       alpha: float = 1.0) -> torch.Tensor:
    """The batch-wise auxiliary loss (V3 §4.5.3): Eq. 17-20 with T = all N tokens of a batch.

    scores [N, E], indices [N, K] (or [B, S, ...], flattened): f and P over the whole batch.
    """
    scores = scores.reshape(1, -1, scores.shape[-1])  # [1, N, E]
    indices = indices.reshape(1, -1, indices.shape[-1])  # [1, N, K]
    return sequence_balance_loss(scores, indices, alpha)


#: The former name of `batch_balance_loss` (it is not V2's expert-level loss, which is per
#: sequence); kept so existing code keeps working.
expert_balance_loss = batch_balance_loss

KINDS = ("sequence", "batch")
_ALIASES = {"expert": "batch"}


def _check_kind(kind: str, where: str) -> str:
    """The canonical balance-loss scope for `kind` ('expert' means 'batch'), or a ValueError."""
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be 'sequence' (V3 Eq. 17-20) or 'batch' "
                         f"(V3 §4.5.3; alias 'expert'), got {kind!r}")
    return kind


def model_balance_loss(model: nn.Module, batch_size: int, kind: str = "sequence",
                       alpha: float = 1.0) -> torch.Tensor:
    """Σ over MoE layers of the balance loss of the latest forward (tokens in batch-major order).

    kind "sequence" (V3 Eq. 17-20, per sequence of the batch) or "batch" (V3 §4.5.3, the whole
    batch; "expert" is an alias).
    """
    kind = _check_kind(kind, "model_balance_loss")
    total = 0.0
    for moe in _moe_layers(model):
        scores, indices = moe.gate.last_scores, moe.gate.last_indices  # [N, E], [N, K]
        if scores is None:
            raise ValueError("model_balance_loss: run a forward pass first")
        if kind == "batch":
            total = total + batch_balance_loss(scores, indices, alpha)
        else:
            n = scores.shape[0]
            if n % batch_size:
                raise ValueError(f"model_balance_loss: {n} tokens do not split into "
                                 f"{batch_size} sequences")
            total = total + sequence_balance_loss(
                scores.view(batch_size, n // batch_size, -1),  # [B, S, E]
                indices.view(batch_size, n // batch_size, -1), alpha)  # [B, S, K]
    return total


class BalancedLoss:
    """`loss_fn` for dsv3_lab.train.train: next-token cross-entropy + α · balance loss.

    kind "sequence" balances every sequence (V3 Eq. 17-20), "batch" only the whole batch
    (V3 §4.5.3's batch-wise auxiliary loss).

    Returns (loss, {"lm_loss": ..., "balance_loss": ...}); "balance_loss" is the unscaled
    Σ_layers Σ_i f_i P_i (L per layer at perfect balance), so runs with different α compare.
    """

    def __init__(self, alpha: float, kind: str = "sequence"):
        if alpha < 0:
            raise ValueError(f"BalancedLoss: alpha must be >= 0, got {alpha}")
        self.alpha, self.kind = alpha, _check_kind(kind, "BalancedLoss")

    def __call__(self, model: nn.Module, batch: torch.Tensor):
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, S], [B, S]
        logits = model(inputs)  # [B, S, V]
        lm = F.cross_entropy(loss_precision(logits).flatten(0, 1), targets.flatten())  # scalar
        bal = model_balance_loss(model, inputs.shape[0], self.kind)  # scalar, α = 1
        loss = lm + self.alpha * bal
        return loss, {"lm_loss": float(lm.detach()), "balance_loss": float(bal.detach())}
