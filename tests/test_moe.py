"""Tests of dsv3_lab.moe: routing invariants, dispatch agreement, transformers parity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dsv3_lab.config import ModelArgs
from dsv3_lab.moe import MLP, Gate, MoE


def vectors(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@st.composite
def routing_args(draw) -> ModelArgs:
    """A small routing config: any group count, any limit, any k the kept groups can hold."""
    n_groups = draw(st.sampled_from([1, 2, 4, 8]))
    group_size = draw(st.integers(2, 6))
    limit = draw(st.integers(1, n_groups))
    k = draw(st.integers(1, min(8, limit * group_size)))
    return ModelArgs.tiny(n_routed_experts=n_groups * group_size, n_expert_groups=n_groups,
                          n_limited_groups=limit, n_activated_experts=k, dim=16,
                          route_scale=draw(st.sampled_from([1.0, 2.5])))


def make_gate(args: ModelArgs, seed: int, bias_scale: float) -> Gate:
    torch.manual_seed(seed)
    gate = Gate(args)
    with torch.no_grad():
        gate.bias.copy_(vectors(seed + 1, args.n_routed_experts, scale=bias_scale))
    return gate


def reference_route(gate: Gate, x: torch.Tensor) -> list[set[int]]:
    """Token by token, in plain Python: the expert set the V3 rule picks (REFERENCE §4).

    Call it on a float64 gate and input. In float32 two groups' scores can round to the same
    value (seed 6899, n 3 of the negative-bias test tied exactly at -8.616802), and the gate's
    topk and this sort then break the tie differently: a test failure that says nothing.
    """
    scores = torch.sigmoid(x.double() @ gate.weight.double().T)  # s [N, E]
    biased = (scores + gate.bias.double()).tolist()  # s' [N, E]
    size = len(biased[0]) // gate.n_groups
    chosen = []
    for row in biased:
        groups = [sorted(row[g * size:(g + 1) * size], reverse=True) for g in range(gate.n_groups)]
        group_score = [g[0] + g[1] if gate.n_groups > 1 else 0.0 for g in groups]
        kept = sorted(range(gate.n_groups), key=lambda g: -group_score[g])[:gate.topk_groups]
        candidates = [e for g in kept for e in range(g * size, (g + 1) * size)]
        chosen.append(set(sorted(candidates, key=lambda e: -row[e])[:gate.topk]))
    return chosen


# ---------------------------------------------------------------- routing invariants
@settings(max_examples=25, deadline=None)
@given(args=routing_args(), seed=st.integers(0, 2**20), n=st.integers(1, 40),
       bias_scale=st.sampled_from([0.0, 0.05, 1.0]))
def test_routing_invariants(args, seed, n, bias_scale):
    """k distinct experts, inside <= n_limited_groups groups, weights sum to route_scale."""
    torch.set_default_dtype(torch.float64)  # see reference_route (conftest restores float32)
    gate = make_gate(args, seed, bias_scale)
    x = vectors(seed + 2, n, args.dim)
    weights, indices = gate(x)  # [N, k], [N, k]
    k = args.n_activated_experts
    assert weights.shape == indices.shape == (n, k)
    assert all(len(set(row)) == k for row in indices.tolist())  # k distinct experts
    groups = indices // (args.n_routed_experts // args.n_expert_groups)  # [N, k]
    assert all(len(set(row)) <= args.n_limited_groups for row in groups.tolist())
    assert torch.allclose(weights.sum(-1), torch.full((n,), args.route_scale), atol=1e-5)
    assert bool((weights > 0).all())
    assert [set(row) for row in indices.tolist()] == reference_route(gate, x)


@settings(max_examples=25, deadline=None)
@given(args=routing_args(), seed=st.integers(0, 2**20), n=st.integers(1, 40))
def test_bias_chooses_but_never_weighs(args, seed, n):
    """Weights are the unbiased s at the chosen experts, renormalised: whatever the bias."""
    x = vectors(seed + 2, n, args.dim)
    gate = make_gate(args, seed, bias_scale=1.0)
    scores = torch.sigmoid(x @ gate.weight.detach().T)  # s [N, E], no bias anywhere
    weights, indices = gate(x)
    s = scores.gather(1, indices)  # [N, k]
    assert torch.allclose(weights, args.route_scale * s / s.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(gate.last_scores, scores, atol=1e-6)  # last_scores are unbiased
    assert torch.equal(gate.last_indices, indices)


def test_bias_changes_the_choice():
    """A large bias on one expert puts it in every token's top-k; its weight stays unbiased."""
    args = ModelArgs.tiny()
    gate = make_gate(args, 0, bias_scale=0.0)
    x = vectors(1, 64, args.dim)
    _, before = gate(x)
    scores = gate.last_scores.detach()
    target = int(torch.bincount(before.flatten(), minlength=16).argmin())  # least chosen expert
    with torch.no_grad():
        gate.bias[target] = 10.0
    weights, after = gate(x)
    assert not torch.equal(before, after)
    assert bool((after == target).any(-1).all())  # every token now picks it
    s = scores.gather(1, after)
    assert torch.allclose(weights, args.route_scale * s / s.sum(-1, keepdim=True), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**20), n=st.integers(1, 40))
@example(seed=6899, n=3)  # two groups tie exactly in float32 (see reference_route)
def test_negative_bias_dropped_groups_are_minus_infinity(seed, n):
    """All biased scores negative: dropped groups must lose (-inf), not win (0 > s')."""
    torch.set_default_dtype(torch.float64)  # see reference_route (conftest restores float32)
    args = ModelArgs.tiny(n_routed_experts=32, n_expert_groups=8, n_limited_groups=2,
                          n_activated_experts=6)
    gate = make_gate(args, seed, bias_scale=0.1)
    with torch.no_grad():
        gate.bias.sub_(5.0)  # every s' = s + b < 0
    x = vectors(seed + 2, n, args.dim)
    _, indices = gate(x)
    groups = indices // 4  # [N, k]
    assert all(len(set(row)) <= 2 for row in groups.tolist())
    assert [set(row) for row in indices.tolist()] == reference_route(gate, x)


def test_zero_fill_bug_would_be_caught():
    """Sanity check of the test above: filling dropped groups with 0 picks dropped experts."""
    args = ModelArgs.tiny(n_routed_experts=32, n_expert_groups=8, n_limited_groups=2,
                          n_activated_experts=6)
    gate = make_gate(args, 0, bias_scale=0.1)
    with torch.no_grad():
        gate.bias.sub_(5.0)
    x = vectors(2, 16, args.dim)
    biased = torch.sigmoid(x @ gate.weight.detach().T) + gate.bias  # [N, E], all < 0
    grouped = biased.view(16, 8, 4)
    keep = grouped.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # [N, 2]
    dropped = torch.ones(16, 8, dtype=torch.bool).scatter_(1, keep, False)
    buggy = grouped.masked_fill(dropped.unsqueeze(-1), 0.0).flatten(1).topk(6).indices
    assert any(len(set(row)) > 2 for row in (buggy // 4).tolist())


def test_softmax_scores_are_not_renormalised():
    """V2-style softmax: weights = route_scale · softmax at the chosen experts (sum < scale)."""
    args = ModelArgs.tiny(score_func="softmax", route_scale=1.0)
    gate = make_gate(args, 0, bias_scale=0.0)
    x = vectors(1, 32, args.dim)
    weights, indices = gate(x)
    probs = torch.softmax(x @ gate.weight.detach().T, dim=-1)  # [N, E]
    assert torch.allclose(weights, probs.gather(1, indices), atol=1e-6)
    assert bool((weights.sum(-1) < 1.0).all())


def test_bias_is_a_float32_buffer_without_gradient():
    gate = Gate(ModelArgs.tiny())
    assert gate.bias.dtype == torch.float32 and not gate.bias.requires_grad
    assert "bias" in dict(gate.named_buffers()) and "bias" not in dict(gate.named_parameters())
    x = vectors(0, 8, 64)
    weights, _ = gate(x)
    (weights.square().sum() + gate.last_scores.square().sum()).backward()
    assert gate.weight.grad is not None and gate.bias.grad is None


# ---------------------------------------------------------------- dispatch
@settings(max_examples=25, deadline=None)
@given(args=routing_args(), seed=st.integers(0, 2**20), b=st.integers(1, 3),
       s=st.integers(1, 12))
def test_sorted_and_loop_dispatch_agree(args, seed, b, s):
    torch.manual_seed(seed)
    moe = MoE(args, dispatch="sorted")
    loop = MoE(args, dispatch="loop")
    loop.load_state_dict(moe.state_dict())
    with torch.no_grad():
        for m in (moe, loop):
            m.gate.bias.copy_(vectors(seed + 1, args.n_routed_experts, scale=0.5))
    x = vectors(seed + 2, b, s, args.dim, scale=1.0)
    y_sorted, y_loop = moe(x), loop(x)
    assert y_sorted.shape == x.shape
    assert torch.allclose(y_sorted, y_loop, atol=1e-6)
    assert torch.equal(moe.last_load, loop.last_load)
    assert int(moe.last_load.sum()) == b * s * args.n_activated_experts
    counts = torch.bincount(moe.gate.last_indices.flatten(), minlength=args.n_routed_experts)
    assert torch.equal(moe.last_load, counts)


def test_dispatch_gradients_agree():
    args = ModelArgs.tiny()
    torch.manual_seed(0)
    a, b = MoE(args, "sorted"), MoE(args, "loop")
    b.load_state_dict(a.state_dict())
    x = vectors(1, 2, 10, args.dim)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is None:
            assert pb.grad is None, name
        else:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_moe_is_shared_plus_weighted_routed_experts():
    """Eq. 12 written out token by token."""
    args = ModelArgs.tiny()
    torch.manual_seed(0)
    moe = MoE(args)
    x = vectors(1, 5, args.dim)
    y = moe(x.view(1, 5, args.dim)).view(5, args.dim)
    weights, indices = moe.gate(x)
    for t in range(5):
        expected = moe.shared_experts(x[t])
        for w, e in zip(weights[t], indices[t].tolist(), strict=True):
            expected = expected + w * moe.experts[e](x[t])
        assert torch.allclose(y[t], expected, atol=1e-6)


def test_errors():
    args = ModelArgs.tiny()
    with pytest.raises(ValueError, match="dispatch"):
        MoE(args, dispatch="scatter")
    with pytest.raises(ValueError, match="dim=64"):
        Gate(args)(torch.zeros(3, 32))
    with pytest.raises(ValueError, match="dim=64"):
        MoE(args)(torch.zeros(2, 3, 32))


# ---------------------------------------------------------------- transformers parity
def hf_moe_state_dict(moe: MoE) -> dict[str, torch.Tensor]:
    """Our MoE's weights under transformers' names (fused experts, as in dsv3_lab.hf)."""
    sd = {
        "gate.weight": moe.gate.weight,
        "experts.gate_up_proj": torch.stack(
            [torch.cat([e.w1.weight, e.w3.weight]) for e in moe.experts]),  # [E, 2I, dim]
        "experts.down_proj": torch.stack([e.w2.weight for e in moe.experts]),  # [E, dim, I]
        "shared_experts.gate_proj.weight": moe.shared_experts.w1.weight,
        "shared_experts.up_proj.weight": moe.shared_experts.w3.weight,
        "shared_experts.down_proj.weight": moe.shared_experts.w2.weight,
    }
    if moe.gate.bias is not None:  # V3's balancing bias; V2 gates have none
        sd["gate.e_score_correction_bias"] = moe.gate.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def hf_moe(moe: MoE, args: ModelArgs):
    """transformers' DeepseekV3MoE with the same weights."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from dsv3_lab.hf import to_hf_config

    config = to_hf_config(args)
    config._experts_implementation = "eager"
    hf = DeepseekV3MoE(config)
    hf.load_state_dict(hf_moe_state_dict(moe), strict=True)
    return hf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_transformers_deepseek_v3_moe(seed):
    """Same index sets, weights (aligned by index) and outputs, with binding group routing."""
    args = ModelArgs.tiny()  # 16 experts, 4 groups of 4, 2 kept, top-4
    torch.manual_seed(seed)
    moe = MoE(args)
    with torch.no_grad():
        moe.gate.bias.copy_(vectors(seed + 10, 16, scale=0.3))
    assert bool((moe.gate.bias < 0).any()) and bool((moe.gate.bias > 0).any())
    hf = hf_moe(moe, args)
    x = vectors(seed + 20, 4, 16, args.dim)
    with torch.no_grad():
        y, y_hf = moe(x), hf(x)
        _, w_hf, i_hf = hf.gate(x)
    weights, indices = moe.gate(x.view(-1, args.dim))
    order, order_hf = indices.argsort(-1), i_hf.argsort(-1)
    assert torch.equal(indices.gather(1, order), i_hf.gather(1, order_hf))
    assert torch.allclose(weights.gather(1, order), w_hf.gather(1, order_hf), atol=1e-6)
    assert torch.allclose(y, y_hf, atol=1e-5)
    # the group limit binds: without it, some tokens would pick other experts
    free = Gate(ModelArgs.tiny(n_limited_groups=4))
    free.load_state_dict(moe.gate.state_dict())
    _, free_indices = free(x.view(-1, args.dim))
    assert not torch.equal(free_indices.sort(-1).values, indices.sort(-1).values)


def test_mlp_is_swiglu():
    torch.manual_seed(0)
    mlp = MLP(8, 12)
    x = vectors(1, 3, 8)
    a, b = x @ mlp.w1.weight.T, x @ mlp.w3.weight.T
    expected = (a * torch.sigmoid(a) * b) @ mlp.w2.weight.T
    assert torch.allclose(mlp(x), expected, atol=1e-6)


# ---------------------------------------------------------------- V2-style gates, bad input
def test_gate_without_bias_ranks_groups_by_their_best_score():
    """gate_bias=False (DeepSeek-V2): no bias buffer, groups ranked by their best score, and
    the weights are the plain softmax scores times route_scale (no renormalisation)."""
    args = ModelArgs.tiny(score_func="softmax", gate_bias=False, n_limited_groups=1,
                          n_activated_experts=2, route_scale=16.0)
    gate = Gate(args)
    assert gate.bias is None and "bias" not in gate.state_dict()
    x = vectors(0, 500, args.dim)
    weights, idx = gate(x)
    scores = torch.nn.functional.linear(x, gate.weight).softmax(-1)  # [N, E]
    grouped = scores.view(500, args.n_expert_groups, -1)  # [N, G, E/G]
    best = grouped.amax(-1).argmax(-1)  # the kept group [N]
    want = grouped[torch.arange(500), best].topk(2, -1)  # top-2 inside it
    size = args.n_routed_experts // args.n_expert_groups
    assert torch.equal(idx.sort(-1).values, (best[:, None] * size + want.indices).sort(-1).values)
    assert torch.allclose(weights.sort(-1).values, (16.0 * want.values).sort(-1).values)
    top2 = grouped.topk(2, -1).values.sum(-1).argmax(-1)
    assert (top2 != best).float().mean() > 0.05  # the V3 rule would route these elsewhere


@pytest.mark.parametrize("seed", [0, 1])
def test_equal_to_transformers_deepseek_v2_moe(seed):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    from dsv3_lab.hf import to_hf_config

    args = ModelArgs.tiny(score_func="softmax", gate_bias=False, route_scale=16.0,
                          n_shared_experts=2)
    torch.manual_seed(seed)
    moe = MoE(args)
    config = to_hf_config(args)
    assert config.topk_method == "group_limited_greedy"
    config._experts_implementation = "eager"
    hf = DeepseekV2Moe(config)
    hf.load_state_dict(hf_moe_state_dict(moe), strict=True)
    x = vectors(seed + 10, 2, 40, args.dim)
    with torch.no_grad():
        assert (moe(x) - hf(x)).abs().max() < 1e-5


def test_bad_inputs_and_unvalidated_configs():
    args = ModelArgs.tiny()
    gate, moe = Gate(args), MoE(args)
    for bad in (torch.zeros(3, args.dim, dtype=torch.long), torch.zeros(3, args.dim).half()):
        with pytest.raises(TypeError, match=r"Gate: expected a torch.float32 input"):
            gate(bad)
        with pytest.raises(TypeError, match=r"MoE: expected a torch.float32 input"):
            moe(bad.unsqueeze(0))
    with pytest.raises(ValueError, match="MoE: expected at least one token"):
        moe(torch.zeros(0, 5, args.dim))
    with pytest.raises(TypeError, match="Gate: expected a dsv3_lab.config.ModelArgs, got dict"):
        Gate(args.to_dict())
    changed = ModelArgs.tiny()
    changed.n_activated_experts = 99  # edited after validation
    with pytest.raises(ValueError, match="MoE: invalid ModelArgs: ModelArgs.n_activated_experts"):
        MoE(changed)
