"""Tests of dsv3_lab.eplb: DeepSeek's published example, invariants, optimality, policies."""

import itertools

import pytest
import torch

from dsv3_lab.eplb import (
    gpu_loads,
    identity_placement,
    imbalance,
    pack,
    rebalance_experts,
    replicate,
)

# The worked example of DeepSeek's EPLB README (repo deepseek-ai/EPLB, commit d52c72d): two MoE
# layers of 12 experts in 4 groups, 16 replicas on 2 nodes of 4 GPUs (hierarchical policy).
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def check_plan(weight, plan, num_replicas, num_gpus, groups=None, nodes=None):
    phy2log, log2phy, logcnt = plan
    layers, n = weight.shape
    assert phy2log.shape == (layers, num_replicas) and logcnt.shape == (layers, n)
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == num_replicas).all()
    for layer in range(layers):
        # the maps invert each other: log2phy lists exactly the slots holding each expert
        assert torch.equal(torch.bincount(phy2log[layer], minlength=n), logcnt[layer])
        for e in range(n):
            slots = log2phy[layer, e]
            slots = slots[slots >= 0]
            assert len(slots) == logcnt[layer, e]
            assert (phy2log[layer, slots] == e).all()
            assert (log2phy[layer, e, logcnt[layer, e]:] == -1).all()
    if groups is not None:  # hierarchical: every replica of a group's experts on one node
        per_node = num_replicas // nodes
        node_of_slot = torch.arange(num_replicas) // per_node
        group_of_slot = phy2log // (n // groups)  # [L, R]
        for layer in range(layers):
            for g in range(groups):
                assert len(node_of_slot[group_of_slot[layer] == g].unique()) == 1
    loads = gpu_loads(weight, phy2log, logcnt, num_gpus)
    assert torch.allclose(loads.sum(-1), weight.double().sum(-1))  # no load lost


def test_readme_example_golden():
    plan = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(plan[0], README_PHY2LOG)
    check_plan(README_WEIGHT, plan, 16, 8, groups=4, nodes=2)


def test_readme_example_balances():
    phy2log, _, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    before = imbalance(gpu_loads(README_WEIGHT, *identity_placement(2, 12), 4))  # 3 per GPU
    after = imbalance(gpu_loads(README_WEIGHT, phy2log, logcnt, 8))  # 2 replicas per GPU
    assert (after < before).all() and (after < 1.25).all()  # measured 1.21, 1.24


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(8, 4, 2, 4, 12), (16, 4, 2, 4, 24), (16, 8, 4, 8, 32),
                                   (12, 6, 3, 6, 18)])
def test_hierarchical_invariants(seed, shape):
    n, groups, nodes, gpus, replicas = shape
    weight = torch.randint(0, 100, (3, n), generator=torch.Generator().manual_seed(seed))
    plan = rebalance_experts(weight, replicas, groups, nodes, gpus)
    check_plan(weight, plan, replicas, gpus, groups=groups, nodes=nodes)


@pytest.mark.parametrize("seed", range(5))
def test_global_policy_when_groups_do_not_divide_nodes(seed):
    # 17 experts (16 routed + the shared one), 1 group, 3 nodes: 1 % 3 != 0 -> global policy
    weight = torch.randint(1, 100, (2, 17), generator=torch.Generator().manual_seed(seed))
    weight[:, -1] = weight[:, :-1].sum(-1) // 4  # the shared expert: every token
    plan = rebalance_experts(weight, 24, 1, 3, 24)
    check_plan(weight, plan, 24, 24)
    # one expert per GPU: the plan is exactly replicate() (global: no group or node constraint)
    assert torch.equal(plan[2], replicate(weight, 24)[2])
    assert (plan[2][:, -1] >= 2).all()  # the heaviest, shared, expert is replicated


def test_global_policy_ignores_groups():
    weight = torch.tensor([[10, 1, 1, 1, 1, 1, 1, 50]])  # heavy experts in different groups
    hier = rebalance_experts(weight, 12, 2, 2, 4)  # groups 2 % nodes 2 == 0: hierarchical
    glob = rebalance_experts(weight, 12, 1, 2, 4)  # 1 group on 2 nodes: global
    check_plan(weight, hier, 12, 4, groups=2, nodes=2)
    check_plan(weight, glob, 12, 4)
    # the hierarchical plan must keep expert 7's copies on its group's node; global need not
    assert imbalance(gpu_loads(weight, glob[0], glob[2], 4)) < \
        imbalance(gpu_loads(weight, hier[0], hier[2], 4))


def brute_force_min_max(w: list[float], total: int) -> float:
    """min over replica counts c >= 1 with sum c = total of max_e w_e / c_e."""
    best = float("inf")
    for counts in itertools.product(range(1, total - len(w) + 2), repeat=len(w)):
        if sum(counts) == total:
            best = min(best, max(x / c for x, c in zip(w, counts, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_replication_is_min_max_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 5, (1,), generator=g))
    extra = int(torch.randint(1, 5, (1,), generator=g))
    weight = torch.randint(1, 60, (1, n), generator=g)
    _, rank, logcnt = replicate(weight, n + extra)
    greedy = (weight.double() / logcnt).max().item()
    assert greedy == pytest.approx(brute_force_min_max(weight[0].tolist(), n + extra))
    assert rank.max() == logcnt.max() - 1


def test_pack_exact_counts_and_balance():
    weight = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2]])
    idx, rank = pack(weight, 2)
    assert torch.equal(torch.bincount(idx[0]), torch.tensor([4, 4]))
    loads = torch.zeros(2).index_add(0, idx[0], weight[0])
    assert loads.tolist() == [22.0, 22.0]  # LPT with equal counts finds the perfect split here
    assert sorted(rank[0][idx[0] == 0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [
    dict(weight=torch.ones(12), num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8),
    dict(weight=torch.ones(2, 12), num_replicas=10, num_groups=4, num_nodes=2, num_gpus=8),
    dict(weight=torch.ones(2, 12), num_replicas=16, num_groups=5, num_nodes=2, num_gpus=8),
    dict(weight=torch.ones(2, 12), num_replicas=16, num_groups=4, num_nodes=3, num_gpus=8),
    dict(weight=-torch.ones(2, 12), num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8),
    dict(weight=torch.ones(2, 12), num_replicas=16.0, num_groups=4, num_nodes=2, num_gpus=8),
])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        rebalance_experts(**bad)
