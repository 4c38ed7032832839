"""Tests of dsv3_lab.parallel and dsv3_lab.ep_moe: gloo on localhost, bounded timeouts.

Every launch has a timeout, so a broken worker fails the test instead of hanging it. The
expert-parallel checks share one launch.
"""

import contextlib
import copy
import multiprocessing
import sys
import time

import pytest
import torch

from dsv3_lab.config import ModelArgs
from dsv3_lab.ep_moe import EPMoE, ep_worker, routed_sum
from dsv3_lab.moe import MoE
from dsv3_lab.parallel import (
    crashing_worker,
    failing_worker,
    hanging_worker,
    launch,
    node_traffic,
    process_context,
)

WORLD = 4


@contextlib.contextmanager
def float64_default():
    """Build models as the notebooks and workers do: float64 default dtype (gate bias float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_case(seed, ranks_per_node, modes, **overrides):
    torch.manual_seed(seed)
    args = ModelArgs.tiny(dim=128, **overrides)
    with float64_default():
        moe = MoE(args)
    with torch.no_grad():
        moe.gate.bias.copy_(0.05 * torch.randn(args.n_routed_experts))  # exercise the bias
    x = torch.randn(48, args.dim, dtype=torch.float64)  # [N, dim], 12 tokens per rank
    case = {"args": args.to_dict(), "state": moe.state_dict(), "x": x,
            "ranks_per_node": ranks_per_node, "modes": modes}
    return moe, args, x, case


@pytest.fixture(scope="module")
def ep_run():
    cases = [make_case(0, 1, ("float64", "float32", "fp8_dispatch", "bf16_combine", "fp8_bf16")),
             # 2 virtual nodes of 2 ranks; groups = nodes, a token may reach 1 of them
             make_case(1, 2, ("float64",), n_expert_groups=2, n_limited_groups=1)]
    ranks = launch(ep_worker, WORLD, [c[3] for c in cases], timeout=120)
    return cases, ranks


def gathered(ranks, case, mode):
    return torch.cat([r[case]["y"][mode] for r in ranks])  # rank chunks in order: [N, dim]


def test_broken_worker_raises_not_hangs():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="fails on purpose"):
        launch(failing_worker, 2, 1, timeout=60)
    assert time.monotonic() - start < 60


def test_dying_worker_raises_not_hangs():
    with pytest.raises(RuntimeError, match="rank 1 (exited with|died with exit) code 3"):
        launch(crashing_worker, 2, 1, timeout=60)


def test_workers_start_from_a_fork_server_where_there_is_one():
    """Fresh interpreters either way (never a fork of the caller); forkserver imports torch once
    per caller instead of once per worker."""
    expected = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    assert process_context().get_start_method() == expected
    if sys.platform == "linux":
        assert expected == "forkserver"


def test_hanging_worker_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        launch(hanging_worker, 2, 600.0, timeout=2)
    assert time.monotonic() - start < 30


def test_launch_rejects_local_function():
    def local(rank, world_size):
        return rank

    with pytest.raises(TypeError, match="module-level"):
        launch(local, 2)
    with pytest.raises(ValueError):
        launch(failing_worker, 0)


def test_workers_one_thread_float64(ep_run):
    _, ranks = ep_run
    assert all(r[0]["stats"]["threads"] == 1 for r in ranks)
    assert all(r[0]["stats"]["dtype"] == "torch.float64" for r in ranks)


def test_ep_equals_single_process_float64(ep_run):
    cases, ranks = ep_run
    moe, _, x, _ = cases[0]
    with torch.no_grad():
        ref = moe(x)
    chosen = torch.cat([r[0]["indices"]["float64"] for r in ranks])
    assert torch.equal(chosen, moe.gate.last_indices)  # the same experts, token by token
    # same summation order; only matrix products over other row counts round differently
    assert (gathered(ranks, 0, "float64") - ref).abs().max() < 1e-12


def test_ep_equals_single_process_float32(ep_run):
    cases, ranks = ep_run
    moe, _, x, _ = cases[0]
    ref32 = copy.deepcopy(moe).float()
    with torch.no_grad():
        ref = ref32(x.float())
    chosen = torch.cat([r[0]["indices"]["float32"] for r in ranks])
    assert torch.equal(chosen, ref32.gate.last_indices)
    y = gathered(ranks, 0, "float32")
    assert y.dtype == torch.float32 and (y - ref).abs().max() < 1e-5


def test_ep_low_precision_communication_bounded(ep_run):
    cases, ranks = ep_run
    moe, _, x, _ = cases[0]
    with torch.no_grad():
        ref = moe(x)
    routed = ref - moe.shared_experts(x)  # only the routed part travels
    errs = {m: ((gathered(ranks, 0, m) - ref).norm() / routed.norm()).item()
            for m in ("fp8_dispatch", "bf16_combine", "fp8_bf16")}
    assert 0 < errs["bf16_combine"] < 2 ** -8  # BF16 keeps 8 significant bits
    assert 0 < errs["fp8_dispatch"] < 0.1  # E4M3: 4 significant bits, relative step 2^-3
    assert errs["bf16_combine"] < errs["fp8_dispatch"] < errs["fp8_bf16"] < 0.1


def test_ep_virtual_nodes_traffic(ep_run):
    cases, ranks = ep_run
    moe, args, x, _ = cases[1]
    with torch.no_grad():
        ref = moe(x)
        _, indices = moe.gate(x)
    assert (gathered(ranks, 1, "float64") - ref).abs().max() < 1e-12
    home = torch.arange(len(x)) // (len(x) // WORLD) // 2  # rank chunk -> node of 2 ranks
    t = node_traffic(indices, home, args.n_routed_experts, 2)
    assert (t["nodes"] == 1).all()  # n_limited_groups = 1: every token reaches one node
    stats = [r[1]["stats"] for r in ranks]
    assert sum(s["experts_remote"] for s in stats) == int(t["experts_remote"].sum())
    assert sum(s["nodes_remote"] for s in stats) == int(t["nodes_remote"].sum())
    # what the all-to-all really sent off-node equals the analytic count of remote experts
    assert all(s["sent_off_node"] == s["experts_remote"] for s in stats)
    assert sum(sum(s["send_counts"]) for s in stats) == len(x) * args.n_activated_experts


def test_node_traffic_by_hand():
    indices = torch.tensor([[0, 1, 4, 5], [0, 2, 6, 7], [4, 5, 6, 7]])  # 8 experts, 2 nodes
    home = torch.tensor([0, 1, 0])
    t = node_traffic(indices, home, 8, 2)
    assert t["experts_remote"].tolist() == [2, 2, 4]
    assert t["nodes_remote"].tolist() == [1, 1, 1]
    assert t["nodes"].tolist() == [2, 2, 1]
    with pytest.raises(ValueError):
        node_traffic(indices, home[:2], 8, 2)


def test_shared_expert_as_routed_expert_identical():
    torch.manual_seed(2)
    args = ModelArgs.tiny()
    with float64_default():
        moe = MoE(args)
    x = torch.randn(40, args.dim, dtype=torch.float64)
    with torch.no_grad():
        ref = moe(x)
        w, i = moe.gate(x)
        experts = list(moe.experts) + [moe.shared_experts]  # shared = expert E
        w9 = torch.cat([w, torch.ones(len(x), 1)], 1)  # weight 1
        i9 = torch.cat([i, torch.full((len(x), 1), args.n_routed_experts)], 1)
        assert torch.equal(routed_sum(experts, x, w9, i9), ref)


def test_epmoe_bad_input():
    args = ModelArgs.tiny()
    with pytest.raises(ValueError):
        EPMoE(args, 0, 3)  # 16 experts over 3 ranks
    with pytest.raises(ValueError):
        EPMoE(args, 0, 4, fp8_dispatch=True)  # dim 64 is not a multiple of the 1x128 tile
    with pytest.raises(ValueError):
        EPMoE(args, 4, 4)
