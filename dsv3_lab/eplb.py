"""Expert-parallel load balancer: redundant experts placed on nodes and GPUs (V3 §3.4).

DeepSeek-V3 serves its MoE layers with expert parallelism (EP32 for prefill, EP320 for decode,
V3 §3.4.1-3.4.2). A GPU's step lasts as long as its busiest expert, so the heaviest *logical*
experts get extra *physical* copies (32 redundant experts in prefill) and the copies are packed
onto GPUs so that every GPU carries about the same load. This module is our own implementation
of the two policies of DeepSeek's EPLB (repo deepseek-ai/EPLB, README.md and eplb.py at commit
d52c72d) with the same interface:

    rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus)
        -> phy2log [L, R]           logical expert held by each physical slot (slot s lives on
                                    GPU s // (R / num_gpus); GPUs num_gpus / num_nodes per node)
           log2phy [L, E, C_max]    the physical slots of each logical expert, -1 padded
           logcnt  [L, E]           replicas per logical expert (>= 1, sums to R)

Three building blocks, with w_e the load of expert e (tokens routed to it):

    replicate(w, R):   start with one copy each; R − E times give one more copy to
                       argmax_e w_e / c_e                    (greedy; minimises max_e w_e / c_e)
    pack(w, P):        put n items into P packs of exactly n / P items each: heaviest item
                       first, each into the lightest pack that still has room (greedy LPT)
    hierarchical:      (1) pack the expert groups onto nodes by group load (a group stays on
                       one node: group-limited routing then bounds cross-node traffic);
                       (2) replicate inside each node; (3) pack the node's replicas onto its
                       GPUs by load per replica, w_e / c_e
    global:            the same with one group and one node: used when num_groups is not a
                       multiple of num_nodes (decode: one expert per GPU)

A token routed to expert e is served by one of its c_e copies; with an even split each copy
carries w_e / c_e, which is the load `gpu_loads` reports per GPU. Ties are broken by the lower
index everywhere (stable sort, first minimum, first maximum).
"""

from __future__ import annotations

import torch


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"eplb: expected a load tensor weight [layers, experts], got {got}")
    if weight.is_complex() or (weight < 0).any():
        raise ValueError("eplb: loads must be real and >= 0")
    return weight.detach().to(torch.float64).cpu()


def pack(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced packing of n items [L, n] into num_packs packs of n / num_packs items each.

    Returns (pack_index [L, n], rank_in_pack [L, n]): the pack of each item and its position
    inside the pack (0 = the first item placed there, the heaviest).
    """
    weight = _check_weight(weight)
    layers, n = weight.shape
    if not isinstance(num_packs, int) or num_packs < 1 or n % num_packs:
        raise ValueError(f"pack: {n} items do not split evenly into num_packs={num_packs!r}")
    capacity = n // num_packs
    pack_index = torch.empty(layers, n, dtype=torch.int64)
    rank_in_pack = torch.empty(layers, n, dtype=torch.int64)
    for layer in range(layers):
        load, items = [0.0] * num_packs, [0] * num_packs
        order = weight[layer].argsort(descending=True, stable=True).tolist()  # heaviest first
        for item in order:
            open_packs = [p for p in range(num_packs) if items[p] < capacity]
            p = min(open_packs, key=lambda q: load[q])  # lightest pack with room (first on ties)
            pack_index[layer, item], rank_in_pack[layer, item] = p, items[p]
            load[p] += weight[layer, item].item()
            items[p] += 1
    return pack_index, rank_in_pack


def replicate(weight: torch.Tensor,
              num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give E logical experts [L, E] num_phy >= E copies, minimising max_e w_e / c_e.

    Returns (phy2log [L, num_phy], rank [L, num_phy], logcnt [L, E]): slots 0..E-1 hold one copy
    of each expert in order, the redundant slots follow in the order they were added; rank is
    the replica number of the slot (0 for the original copy).
    """
    weight = _check_weight(weight)
    layers, n = weight.shape
    if not isinstance(num_phy, int) or num_phy < n:
        raise ValueError(f"replicate: need num_phy >= {n} experts, got {num_phy!r}")
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(layers, 1)  # [L, R]
    rank = torch.zeros(layers, num_phy, dtype=torch.int64)
    logcnt = torch.ones(layers, n, dtype=torch.int64)
    rows = torch.arange(layers)
    for slot in range(n, num_phy):
        heaviest = (weight / logcnt).argmax(dim=-1)  # [L]: largest load per copy (first on ties)
        phy2log[:, slot] = heaviest
        rank[:, slot] = logcnt[rows, heaviest]
        logcnt[rows, heaviest] += 1
    return phy2log, rank, logcnt


def _hierarchical(weight, num_phy, num_groups, num_nodes, num_gpus):
    """(phy2log, phyrank, logcnt), each [L, ·]: groups -> nodes, replicate, replicas -> GPUs."""
    layers, n = weight.shape
    group_size, per_node = n // num_groups, n // num_nodes  # experts per group, per node
    phy_per_node, phy_per_gpu = num_phy // num_nodes, num_phy // num_gpus
    gpus_per_node = num_gpus // num_nodes
    # (1) groups onto nodes; node_experts[l, m] = logical expert at node-major position m
    group_pack, group_rank = pack(weight.view(layers, num_groups, group_size).sum(-1), num_nodes)
    first = (group_pack * (num_groups // num_nodes) + group_rank) * group_size  # [L, G]
    position = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(1)  # [L, E] log -> m
    node_experts = position.argsort(dim=-1)  # [L, E] m -> log (the inverse permutation)
    phy2log = torch.empty(layers, num_phy, dtype=torch.int64)
    phyrank = torch.empty(layers, num_phy, dtype=torch.int64)
    logcnt = torch.empty(layers, n, dtype=torch.int64)
    for node in range(num_nodes):
        local = node_experts[:, node * per_node:(node + 1) * per_node]  # [L, E/nodes] logical ids
        w = weight.gather(1, local)  # [L, E/nodes]
        # (2) replicate inside the node
        phy2loc, rank, cnt = replicate(w, phy_per_node)  # [L, R/nodes] x2, [L, E/nodes]
        logcnt.scatter_(1, local, cnt)
        # (3) the node's replicas onto its GPUs, by load per replica
        gpu, slot = pack((w / cnt).gather(1, phy2loc), gpus_per_node)  # [L, R/nodes] each
        where = node * phy_per_node + gpu * phy_per_gpu + slot  # global physical slot
        phy2log.scatter_(1, where, local.gather(1, phy2loc))
        phyrank.scatter_(1, where, rank)
    return phy2log, phyrank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan replicas and placement from per-expert loads [L, E] (EPLB's interface).

    Hierarchical policy when num_groups % num_nodes == 0, else the global policy (one group,
    one node). Returns (phy2log [L, R], log2phy [L, E, C_max] (-1 padded), logcnt [L, E]).
    """
    weight = _check_weight(weight)
    layers, n = weight.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"rebalance_experts: {name} must be a positive int, got {value!r}")
    if n % num_groups:
        raise ValueError(f"rebalance_experts: {n} experts do not split into {num_groups} groups")
    if num_gpus % num_nodes:
        raise ValueError(f"rebalance_experts: num_gpus={num_gpus} must be a multiple of "
                         f"num_nodes={num_nodes}")
    if num_replicas < n or num_replicas % num_gpus:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} must be >= the {n} "
                         f"experts and a multiple of num_gpus={num_gpus}")
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes,
                                                 num_gpus)
    else:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    log2phy = torch.full((layers, n, int(logcnt.max())), -1, dtype=torch.int64)
    for layer in range(layers):
        log2phy[layer, phy2log[layer], phyrank[layer]] = torch.arange(num_replicas)
    return phy2log, log2phy, logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor,
              num_gpus: int) -> torch.Tensor:
    """Load per GPU [L, num_gpus] when each expert's load is split evenly over its copies.

    Without EPLB: phy2log = arange(E) repeated per layer, logcnt = ones (E / num_gpus experts
    per GPU, in order).
    """
    weight = _check_weight(weight)
    if phy2log.shape[0] != weight.shape[0] or phy2log.shape[1] % num_gpus:
        raise ValueError(f"gpu_loads: phy2log {tuple(phy2log.shape)} does not fit weight "
                         f"{tuple(weight.shape)} on {num_gpus} GPUs")
    per_copy = (weight / logcnt).gather(1, phy2log)  # [L, R]
    return per_copy.view(weight.shape[0], num_gpus, -1).sum(-1)  # [L, num_gpus]


def identity_placement(layers: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(phy2log [L, E], logcnt [L, E]): one copy of each expert, in order (no EPLB)."""
    return (torch.arange(experts).repeat(layers, 1),
            torch.ones(layers, experts, dtype=torch.int64))


def imbalance(load: torch.Tensor) -> torch.Tensor:
    """max / mean over the last dimension: [..., n] -> [...] (1 = perfectly balanced)."""
    load = load.to(torch.float64)
    return load.max(dim=-1).values / load.mean(dim=-1)
