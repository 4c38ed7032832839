"""DeepSeekMoE: shared + fine-grained routed experts, group-limited routing (V3 Eq. 12-16).

For a token u_t [dim] with N_r routed experts e_i (centroids = rows of gate.weight):

    s_{i,t}  = sigmoid(u_tᵀ e_i)            affinity (V3; V2 used softmax)            (Eq. 15)
    s'_{i,t} = s_{i,t} + b_i                 bias b: chooses experts, never weighs them
    group score  = sum of the top-2 s' in each of n_expert_groups groups
                   (gates without a bias, gate_bias=False: the best s of each group)
    keep the top n_limited_groups groups, set s' of the others to -inf (node-limited routing)
    top-K    = the n_activated_experts largest s'                                    (Eq. 14)
    g_{i,t}  = s_{i,t} / Σ_{j in top-K} s_{j,t} · route_scale   (unbiased, renormalised; Eq. 13)
    h'_t     = u_t + Σ_shared FFN_s(u_t) + Σ_{i in top-K} g_{i,t} FFN_i(u_t)        (Eq. 12)

(The residual u_t is added by the Block.) Every FFN is SwiGLU: w2(silu(w1 x) ⊙ w3 x).
With score_func="softmax" (V2) the top-K weights are not renormalised. No capacity limit and no
token dropping: every token reaches exactly n_activated_experts experts.

As in the official Gate, the group ranking follows the bias: a gate with the balancing bias
(V3, gate_bias=True) ranks groups by the sum of their top-2 biased scores; a gate without one
(DeepSeek-V2, gate_bias=False; transformers' "group_limited_greedy") ranks them by their best
score. So score_func="softmax", gate_bias=False is V2's router exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3_lab.config import ModelArgs, check_args

DISPATCHES = ("sorted", "loop")


def _check_dtype(x: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """A floating-point x of the module's dtype, or a TypeError saying what was expected."""
    if x.dtype != dtype:
        raise TypeError(f"{where}: expected a {dtype} input (the module's dtype), got {x.dtype}; "
                        f"convert the input, or the module with .to(dtype)")


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) ⊙ w3 x); dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate projection
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down projection
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # [..., inter_dim] -> [..., dim]


class Expert(MLP):
    """One routed expert: the same SwiGLU as MLP, width moe_inter_dim.

    A separate class as in the official code, where dense MLPs are tensor-parallel and experts
    are not (they are spread over devices by expert parallelism instead).
    """


class Gate(nn.Module):
    """Router: (weights [N, k], indices [N, k]) for tokens x [N, dim]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        check_args(args, "Gate")
        self.dim = args.dim
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        # b_i: float32, updated by the load-balancing rule (dsv3_lab.balance), never by gradients;
        # None for gates without a bias (DeepSeek-V2), which then rank groups by their best score
        bias = torch.zeros(args.n_routed_experts, dtype=torch.float32) if args.gate_bias else None
        self.register_buffer("bias", bias)
        self.last_scores: torch.Tensor | None = None  # s [N, E] of the latest forward
        self.last_indices: torch.Tensor | None = None  # chosen experts [N, k]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Gate: expected x of shape [tokens, dim={self.dim}], "
                             f"got {tuple(x.shape)}")
        _check_dtype(x, self.weight.dtype, "Gate")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        logits = F.linear(x.to(work), self.weight.to(work))  # [N, E]
        if self.score_func == "softmax":
            scores = logits.softmax(dim=-1)  # [N, E]
        else:
            scores = logits.sigmoid()  # s_{i,t} [N, E]
        biased = scores.detach()  # s' [N, E], selection only
        if self.bias is not None:
            biased = biased + self.bias.to(work)
        if self.n_groups > 1:
            grouped = biased.view(x.shape[0], self.n_groups, -1)  # [N, G, E/G]
            if self.bias is None:  # V2: a group's best score
                group_scores = grouped.amax(dim=-1)  # [N, G]
            else:  # V3: sum of the group's top-2 biased scores
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            keep = group_scores.topk(self.topk_groups, dim=-1).indices  # [N, topk_groups]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = biased.topk(self.topk, dim=-1).indices  # [N, k]
        weights = scores.gather(1, indices)  # unbiased s at the chosen experts [N, k]
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.route_scale
        self.last_scores, self.last_indices = scores, indices
        return weights.type_as(x), indices


class MoE(nn.Module):
    """Shared experts plus routed experts; dispatch "sorted" (default) or "loop" (reference)."""

    def __init__(self, args: ModelArgs, dispatch: str = "sorted"):
        super().__init__()
        check_args(args, "MoE")
        if dispatch not in DISPATCHES:
            raise ValueError(f"MoE: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.dim = args.dim
        self.n_routed_experts = args.n_routed_experts
        self.n_activated_experts = args.n_activated_experts
        self.dispatch = dispatch
        self.gate = Gate(args)
        self.experts = nn.ModuleList(
            Expert(args.dim, args.moe_inter_dim) for _ in range(args.n_routed_experts))
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim)
        self.last_load: torch.Tensor | None = None  # tokens per expert in the latest forward [E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE: expected last dimension dim={self.dim}, got {tuple(x.shape)}")
        _check_dtype(x, self.shared_experts.w1.weight.dtype, "MoE")
        if x.numel() == 0:
            raise ValueError(f"MoE: expected at least one token, got x of shape {tuple(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.dim)  # [N, dim]
        weights, indices = self.gate(x)  # [N, k], [N, k]
        counts = torch.bincount(indices.flatten(), minlength=self.n_routed_experts)  # [E]
        self.last_load = counts.detach()
        if self.dispatch == "sorted":
            y = self.forward_sorted(x, weights, indices, counts)
        else:
            y = self.forward_loop(x, weights, indices, counts)
        y = y + self.shared_experts(x)  # [N, dim]
        return y.view(shape)

    def forward_loop(self, x, weights, indices, counts) -> torch.Tensor:
        """Reference: for each expert, find its tokens, run it, add the weighted output."""
        y = torch.zeros_like(x)  # [N, dim]
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            token, slot = torch.where(indices == i)  # tokens routed to expert i, and which of k
            out = expert(x.index_select(0, token)) * weights[token, slot, None]  # [n_i, dim]
            y = y.index_add(0, token, out)
        return y

    def forward_sorted(self, x, weights, indices, counts) -> torch.Tensor:
        """Sort the N·k (token, expert) pairs by expert; run each expert once on its slice."""
        k = indices.shape[1]
        order = indices.flatten().argsort(stable=True)  # [N·k], grouped by expert id
        token = order // k  # token of each sorted pair [N·k]
        # index_select, not x[token]: its backward is a deterministic index_add, while advanced
        # indexing accumulates gradients in a thread-dependent order on CPU
        chunks = x.index_select(0, token).split(counts.tolist())  # one [n_i, dim] slice per expert
        out = torch.cat([expert(c) for expert, c in zip(self.experts, chunks, strict=True)])
        out = out * weights.flatten()[order, None]  # g_{i,t} · FFN_i(u_t)  [N·k, dim]
        return torch.zeros_like(x).index_add(0, token, out)  # sum back per token [N, dim]
