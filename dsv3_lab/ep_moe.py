"""Expert-parallel DeepSeekMoE: dispatch with all-to-all, run local experts, combine back.

W ranks, E = n_routed_experts, rank r owns the routed experts [r·E/W, (r+1)·E/W) and a full
copy of the gate and of the shared experts; each rank holds its own tokens x_r [n, dim]. With
K = n_activated_experts, one forward on rank r (V3 §3.2.2, "dispatch" and "combine"):

    (g, i) = Gate(x_r)                           [n, K] weights and expert ids, as dsv3_lab.moe
    sort the n·K (token, expert) pairs by expert id (stable): pairs for rank d are contiguous
    counts   c_{r→d} = #pairs with i // (E/W) = d          all_to_all_single of [W] counts first
    dispatch x, i and g of the pairs                       all_to_all_single, uneven splits
    experts  y_p = g_p · FFN_{i_p}(x_p) for every received pair p, each expert once on its rows
    combine  send y_p back (the reverse all_to_all)        out[t] = Σ_k y_{t,k}
    output   out + shared_experts(x_r)                      shared experts stay local

Same order as MoE.forward_sorted: an expert sees its rows in global token order (ranks hold
consecutive token chunks; received rows are ordered by source rank, then token) and each token's
K outputs are added in expert order. The routing is therefore identical token by token, and the
output equal up to the last bits of matrix products whose row count differs (the gate and the
shared expert see n = N/W rows here, N there; BLAS may block them differently): a few ulps,
asserted with a tight bound (1e-12 in float64).

Low-precision communication (V3 §3.3.3): the dispatched activations are quantised to E4M3 in
1×128 tiles with power-of-two scales (s = 2^ceil(log2(amax / 448))), so the receiving rank can
feed them to an FP8 up-projection; the combined outputs travel in BF16. gloo moves them as raw
bytes (uint8 views); the expert itself computes in the model's dtype here, so the error printed
is the error of the communication formats alone.

Decode (V3 §3.4.2) treats the shared expert as one more routed expert chosen by every token with
weight 1: `routed_sum(experts + [shared], x, [g | 1], [i | E])` equals MoE(x).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from dsv3_lab.config import ModelArgs
from dsv3_lab.fp8 import E4M3, act_dequant, act_quant
from dsv3_lab.moe import MLP, Expert, Gate, MoE
from dsv3_lab.parallel import check_topology, launch, node_traffic


def routed_sum(experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
    """Σ_k weights[t, k] · experts[indices[t, k]](x[t]) with sorted dispatch: [N, dim]."""
    if indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(f"routed_sum: expected x [N, dim], weights and indices [N, K], got "
                         f"{tuple(x.shape)}, {tuple(weights.shape)}, {tuple(indices.shape)}")
    k = indices.shape[1]
    order = indices.flatten().argsort(stable=True)  # [N·K] pairs grouped by expert
    token = order // k  # [N·K]
    counts = torch.bincount(indices.flatten(), minlength=len(experts)).tolist()  # [E]
    chunks = x.index_select(0, token).split(counts)
    out = torch.cat([e(c) for e, c in zip(experts, chunks, strict=True)])  # [N·K, dim]
    out = out * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add(0, token, out)  # [N, dim]


def _exchange(send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """all_to_all_single with uneven splits along dim 0; FP8/BF16 travel as raw bytes."""
    raw = send.dtype in (E4M3, torch.bfloat16)
    payload = send.contiguous().view(torch.uint8) if raw else send.contiguous()
    width = payload.shape[1:]  # bytes per row for raw tensors
    recv = payload.new_empty((sum(recv_counts), *width))
    dist.all_to_all_single(recv, payload, output_split_sizes=recv_counts,
                           input_split_sizes=send_counts)
    return recv.view(send.dtype) if raw else recv


class EPMoE(nn.Module):
    """The routed experts of one rank, plus the gate and the shared experts (full copies)."""

    def __init__(self, args: ModelArgs, rank: int, world_size: int, ranks_per_node: int = 1,
                 fp8_dispatch: bool = False, bf16_combine: bool = False, block_size: int = 128):
        super().__init__()
        check_topology(world_size, ranks_per_node, args.n_routed_experts)
        if not 0 <= rank < world_size:
            raise ValueError(f"EPMoE: rank must be in [0, {world_size}), got {rank}")
        if fp8_dispatch and args.dim % block_size:
            raise ValueError(f"EPMoE: FP8 dispatch needs dim={args.dim} to be a multiple of the "
                             f"1x{block_size} tile")
        self.dim, self.rank, self.world_size = args.dim, rank, world_size
        self.ranks_per_node, self.n_routed_experts = ranks_per_node, args.n_routed_experts
        self.n_local = args.n_routed_experts // world_size  # E/W experts per rank
        self.fp8_dispatch, self.bf16_combine = fp8_dispatch, bf16_combine
        self.block_size = block_size
        self.gate = Gate(args)
        self.experts = nn.ModuleList(Expert(args.dim, args.moe_inter_dim)
                                     for _ in range(self.n_local))
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim)
        self.last_stats: dict | None = None
        self.last_indices: torch.Tensor | None = None  # experts chosen for the local tokens

    @classmethod
    def from_moe(cls, moe: MoE, args: ModelArgs, rank: int, world_size: int, **kwargs) -> EPMoE:
        """This rank's share of a single-process MoE (same weights, same gate bias)."""
        ep = cls(args, rank, world_size, **kwargs)
        ep.gate.load_state_dict(moe.gate.state_dict())
        ep.shared_experts.load_state_dict(moe.shared_experts.state_dict())
        for j, expert in enumerate(ep.experts):
            expert.load_state_dict(moe.experts[rank * ep.n_local + j].state_dict())
        return ep.to(next(moe.parameters()).dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"EPMoE: expected local tokens [n, dim={self.dim}], "
                             f"got {tuple(x.shape)}")
        weights, indices = self.gate(x)  # [n, K] each
        self.last_indices = indices
        k, W = indices.shape[1], self.world_size
        order = indices.flatten().argsort(stable=True)  # [n·K], grouped by expert, so by rank
        token, expert = order // k, indices.flatten()[order]  # [n·K] each
        send = torch.bincount(expert // self.n_local, minlength=W)  # c_{r->d} [W]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)  # counts first: each rank learns what it receives
        send_counts, recv_counts = send.tolist(), recv.tolist()

        # dispatch: activations (optionally FP8 + scales), local expert ids, weights
        rows = x.index_select(0, token)  # [n·K, dim]
        if self.fp8_dispatch:
            q, s = act_quant(rows, self.block_size, scale_fmt="ue8m0")  # E4M3, pow-2 scales
            rows_in = act_dequant(_exchange(q, send_counts, recv_counts),
                                  _exchange(s, send_counts, recv_counts), self.block_size)
            rows_in = rows_in.to(x.dtype)  # exactly the FP8 values, in the compute dtype
        else:
            rows_in = _exchange(rows, send_counts, recv_counts)  # [m, dim]
        local = _exchange(expert % self.n_local, send_counts, recv_counts)  # [m] id on its rank
        gate_w = _exchange(weights.flatten()[order], send_counts, recv_counts)  # [m]

        # run each local expert once on its rows (source rank, then token order)
        out = routed_sum(list(self.experts), rows_in, gate_w[:, None], local[:, None])  # [m, dim]
        if self.bf16_combine:
            out = out.to(torch.bfloat16)
        back = _exchange(out, recv_counts, send_counts).to(x.dtype)  # combine [n·K, dim]
        y = torch.zeros_like(x).index_add(0, token, back)  # Σ_k g·FFN per token [n, dim]

        home = torch.full((x.shape[0],), self.rank // self.ranks_per_node, dtype=torch.int64)
        n_nodes = W // self.ranks_per_node
        traffic = node_traffic(indices, home, self.n_routed_experts, n_nodes)
        dest_node = torch.arange(W) // self.ranks_per_node
        self.last_stats = {"send_counts": send_counts, "recv_counts": recv_counts,
                           "sent_off_node": int(send[dest_node != home[0]].sum()) if len(x) else 0,
                           **{name: int(v.sum()) for name, v in traffic.items()}}
        return y + self.shared_experts(x)


# ------------------------------------------------------------------------------- the worker
MODES = {  # name: (compute dtype, FP8 dispatch, BF16 combine)
    "float64": (torch.float64, False, False), "float32": (torch.float32, False, False),
    "fp8_dispatch": (torch.float64, True, False), "bf16_combine": (torch.float64, False, True),
    "fp8_bf16": (torch.float64, True, True)}


def ep_worker(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """For each case {args, state, x, ranks_per_node, modes}: this rank's EP output per mode.

    args: a ModelArgs field dict; state: a MoE state_dict; x [N, dim] all tokens (rank r takes
    chunk r of W); modes: names from MODES. Returns, per case, {"y": {mode: y_r [N/W, dim]},
    "indices": {mode: chosen experts [N/W, K]}, "stats": traffic statistics of the first mode,
    with this process's thread count and default dtype}.
    """
    results = []
    for case in cases:
        args = ModelArgs(**case["args"])
        moe = MoE(args)
        moe.load_state_dict(case["state"])
        x = case["x"]
        if x.shape[0] % world_size:
            raise ValueError(f"ep_worker: {x.shape[0]} tokens do not split over {world_size} ranks")
        x_r = x.chunk(world_size)[rank]  # [N/W, dim] this rank's tokens
        out, chosen, stats = {}, {}, None
        for mode in case.get("modes", ("float64",)):
            if mode not in MODES:
                raise ValueError(f"ep_worker: mode must be one of {sorted(MODES)}, got {mode!r}")
            dtype, fp8, bf16 = MODES[mode]
            source = copy.deepcopy(moe).to(dtype) if dtype != torch.float64 else moe
            ep = EPMoE.from_moe(source, args, rank, world_size,
                                ranks_per_node=case.get("ranks_per_node", 1),
                                fp8_dispatch=fp8, bf16_combine=bf16)
            with torch.no_grad():
                out[mode] = ep(x_r.to(dtype))
            chosen[mode] = ep.last_indices
            stats = stats or dict(ep.last_stats, threads=torch.get_num_threads(),
                                  dtype=str(torch.get_default_dtype()))
        results.append({"y": out, "indices": chosen, "stats": stats})
    return results


def run_expert_parallel(moe: MoE, args: ModelArgs, x: torch.Tensor, world_size: int,
                        ranks_per_node: int = 1, modes=("float64",), timeout: float = 120.0):
    """Launch ep_worker on W gloo processes: ({mode: y [N, dim]}, {mode: indices [N, K]},
    per-rank stats)."""
    case = {"args": args.to_dict(), "state": moe.state_dict(), "x": x,
            "ranks_per_node": ranks_per_node, "modes": tuple(modes)}
    ranks = launch(ep_worker, world_size, [case], timeout=timeout)
    ys = {m: torch.cat([r[0]["y"][m] for r in ranks]) for m in modes}
    chosen = {m: torch.cat([r[0]["indices"][m] for r in ranks]) for m in modes}
    return ys, chosen, [r[0]["stats"] for r in ranks]
