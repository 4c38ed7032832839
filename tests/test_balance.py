"""Tests of dsv3_lab.balance: the bias sign rule, MaxVio, the balance losses, the hooks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_lab.balance import (
    BalancedLoss,
    BalanceHook,
    batch_balance_loss,
    collect_load,
    expert_balance_loss,
    layer_loads,
    max_violation,
    maxvio_global,
    model_balance_loss,
    sequence_balance_loss,
    sequence_loads,
    update_bias,
)
from dsv3_lab.config import ModelArgs
from dsv3_lab.data import ToyCorpus
from dsv3_lab.model import Transformer
from dsv3_lab.moe import Gate
from dsv3_lab.train import param_groups, train


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelArgs.tiny(**overrides))


@pytest.fixture(scope="module")
def corpus():
    return ToyCorpus(seed=0, n_docs=100)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' ops are too small for a second thread; one is faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- MaxVio
def test_max_violation_known_values():
    assert float(max_violation(torch.tensor([4, 4, 4, 4]))) == 0.0
    assert float(max_violation(torch.tensor([8, 0, 0, 0]))) == pytest.approx(3.0)  # all on one
    assert float(max_violation(torch.tensor([6, 2, 4, 4]))) == pytest.approx(0.5)
    rows = max_violation(torch.tensor([[1, 1], [3, 1]]))  # per row: [2] -> [..]
    assert rows.tolist() == pytest.approx([0.0, 0.5])
    with pytest.raises(ValueError, match="no tokens"):
        max_violation(torch.zeros(4))


@settings(deadline=None, max_examples=25)
@given(st.lists(st.integers(0, 1000), min_size=2, max_size=32).filter(lambda v: sum(v) > 0))
def test_max_violation_bounds(counts):
    load = torch.tensor(counts)
    v = float(max_violation(load))
    assert 0.0 <= v <= len(counts) - 1 + 1e-9  # 0 balanced .. E-1 when one expert takes all
    assert float(max_violation(load * 7)) == pytest.approx(v)  # scale-free


# ----------------------------------------------------------------------------- bias rule
def test_update_bias_sign_rule_on_hand_made_loads():
    gate = Gate(ModelArgs.tiny(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1,
                               n_activated_experts=2))
    gate.bias.copy_(torch.tensor([0.5, 0.0, -0.5, 0.1]))
    step = update_bias(gate, torch.tensor([10, 2, 4, 4]), gamma=0.25)  # mean 5
    assert step.tolist() == [-0.25, 0.25, 0.25, 0.25]  # overloaded down, underloaded up
    assert gate.bias.tolist() == pytest.approx([0.25, 0.25, -0.25, 0.35])
    update_bias(gate, torch.tensor([3, 3, 3, 3]), gamma=0.25)  # balanced: nothing moves
    assert gate.bias.tolist() == pytest.approx([0.25, 0.25, -0.25, 0.35])
    assert gate.bias.dtype == torch.float32
    with pytest.raises(ValueError, match="one count per routed expert"):
        update_bias(gate, torch.tensor([1, 2, 3]), gamma=0.1)
    with pytest.raises(ValueError, match="gamma"):
        update_bias(gate, torch.tensor([1, 2, 3, 4]), gamma=-1.0)


def test_bias_balances_a_skewed_gate():
    """Repeating the rule on fixed tokens drives the load of a skewed router to balance."""
    torch.manual_seed(0)
    args = ModelArgs.tiny(n_expert_groups=1, n_limited_groups=1)
    gate = Gate(args)
    with torch.no_grad():
        gate.weight[0] += 0.5  # expert 0 attracts most tokens
    x = torch.randn(512, args.dim) + 1.0  # [N, dim]
    before = max_violation(torch.bincount(gate(x)[1].flatten(), minlength=16))
    for _ in range(300):
        idx = gate(x)[1]
        update_bias(gate, torch.bincount(idx.flatten(), minlength=16), gamma=1e-3)
    after = max_violation(torch.bincount(gate(x)[1].flatten(), minlength=16))
    assert before > 1.0 and after < 0.2
    assert gate.bias[0] < gate.bias[1:].min()  # the favourite was pushed down the most


def test_no_gradient_reaches_the_bias_and_optimizer_never_sees_it(corpus):
    model = tiny_model()
    biases = [moe.gate.bias for moe in model.moe_layers()]
    params = {id(p) for p in model.parameters()}
    in_groups = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    for b in biases:
        assert not b.requires_grad and id(b) not in params and id(b) not in in_groups
        b.normal_(0, 0.1)  # a non-zero bias that changes routing
    batch = corpus.batch("train", 2, 16, torch.Generator().manual_seed(0))
    loss, _ = BalancedLoss(alpha=0.1)(model, batch)  # LM + balance loss, both through the gate
    loss.backward()
    assert all(b.grad is None for b in biases)
    assert all(moe.gate.weight.grad is not None for moe in model.moe_layers())
    # the update moves only the bias, never the gate weights
    weights = [moe.gate.weight.detach().clone() for moe in model.moe_layers()]
    BalanceHook(gamma=0.01)(0, model, {})
    for moe, w, b in zip(model.moe_layers(), weights, biases, strict=True):
        assert torch.equal(moe.gate.weight, w) and moe.gate.bias is b


def test_hook_in_train_updates_bias_from_batch_load(corpus):
    model = tiny_model()
    gamma, steps = 0.01, 5
    hook = BalanceHook(gamma)
    result = train(model, corpus.batches("train", 4, 16), steps=steps, progress=False,
                   after_step=hook)
    assert len(result.metrics["maxvio_batch"]) == steps
    assert len(hook.bias_history) == steps and hook.bias_history[-1].shape == (2, 16)
    assert torch.equal(hook.bias_history[-1][1], model.moe_layers()[1].gate.bias)
    assert all(v >= 0 for v in result.metrics["maxvio_batch"])
    for moe in model.moe_layers():
        b = moe.gate.bias  # every step moves each expert by ±γ or 0
        assert b.abs().max() <= steps * gamma + 1e-6 and b.abs().max() > 0
        ratio = b / gamma
        assert torch.allclose(ratio, ratio.round(), atol=1e-4)
    with pytest.raises(ValueError, match="gamma"):
        BalanceHook(-1.0)


def test_hook_without_gamma_only_measures(corpus):
    model = tiny_model()
    batch = corpus.batch("train", 4, 16, torch.Generator().manual_seed(0))
    model(batch[:, :-1])
    metrics = {}
    BalanceHook(0.0)(0, model, metrics)
    expected = float(max_violation(layer_loads(model)).mean())
    assert metrics["maxvio_batch"] == pytest.approx(expected)
    assert all(float(moe.gate.bias.abs().sum()) == 0 for moe in model.moe_layers())


def test_collect_load_counts_every_token(corpus):
    model = tiny_model()
    batches = corpus.fixed_batches("val", 3, 4, 16, seed=1)
    load = collect_load(model, batches)  # [L, E]
    args = model.args
    assert load.shape == (args.n_layers - args.n_dense_layers, args.n_routed_experts)
    assert (load.sum(dim=1) == 3 * 4 * 16 * args.n_activated_experts).all()
    assert model.training  # mode restored
    assert maxvio_global(model, batches) == pytest.approx(float(max_violation(load).mean()))
    model(batches[0][:, :-1])
    per_seq = sequence_loads(model, 4)  # [B, L, E]
    assert per_seq.shape == (4, *load.shape)
    assert (per_seq.sum(dim=-1) == 16 * args.n_activated_experts).all()
    assert torch.equal(per_seq.sum(dim=0), layer_loads(model))
    with pytest.raises(ValueError, match="sequences"):
        sequence_loads(model, 3)


# ----------------------------------------------------------------------------- losses
def direct_sequence_loss(scores, indices, alpha):
    """Eq. 17-20 written with explicit loops over sequences, experts and tokens."""
    n_seq, seq_len, n_experts = scores.shape
    k = indices.shape[-1]
    total = 0.0
    for b in range(n_seq):
        seq = 0.0
        for i in range(n_experts):
            hits = sum(int(i in indices[b, t].tolist()) for t in range(seq_len))
            f_i = n_experts / (k * seq_len) * hits  # Eq. 18
            p_i = sum(scores[b, t, i] / scores[b, t].sum() for t in range(seq_len)) / seq_len
            seq = seq + f_i * p_i  # Eq. 19-20
        total = total + alpha * seq  # Eq. 17
    return total / n_seq


@settings(deadline=None, max_examples=25)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(2, 6), st.integers(0, 10**6))
def test_sequence_loss_matches_direct_computation(n_seq, seq_len, n_experts, seed):
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, n_experts + 1, (1,), generator=g))
    scores = torch.rand(n_seq, seq_len, n_experts, generator=g, dtype=torch.float64) + 0.01
    indices = torch.rand(n_seq, seq_len, n_experts, generator=g).argsort(-1)[..., :k]
    got = sequence_balance_loss(scores, indices, alpha=0.3)
    assert float(got) == pytest.approx(float(direct_sequence_loss(scores, indices, 0.3)),
                                       rel=1e-9)
    flat = batch_balance_loss(scores.flatten(0, 1), indices.flatten(0, 1), alpha=0.3)
    whole = direct_sequence_loss(scores.reshape(1, -1, n_experts),
                                 indices.reshape(1, -1, k), 0.3)
    assert float(flat) == pytest.approx(float(whole), rel=1e-9)


def test_balanced_routing_gives_one_and_gradient_flows_through_p():
    scores = torch.full((1, 4, 4), 0.5, requires_grad=True)  # equal affinities
    indices = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])  # every expert twice
    loss = sequence_balance_loss(scores, indices).detach()
    assert float(loss) == pytest.approx(1.0)  # Σ f_i P_i = Σ 1 · 1/4
    skewed = torch.tensor([[[0, 1], [0, 1], [0, 1], [0, 1]]])
    assert float(sequence_balance_loss(scores, skewed).detach()) == pytest.approx(1.0)  # P = 1/4
    loss = sequence_balance_loss(scores, skewed)
    loss.backward()
    assert scores.grad[0, 0, 0] > 0 > scores.grad[0, 0, 2]  # push overloaded 0 down, 2 up
    with pytest.raises(ValueError, match=r"\[B, S, E\]"):
        sequence_balance_loss(scores[0], indices[0])


def test_model_loss_splits_sequences_batch_major(corpus):
    with torch.no_grad():  # values only
        model = tiny_model()
        batch = corpus.batch("train", 3, 16, torch.Generator().manual_seed(0))
        model(batch[:, :-1])
        manual = sum(sequence_balance_loss(m.gate.last_scores.view(3, 16, -1),
                                           m.gate.last_indices.view(3, 16, -1))
                     for m in model.moe_layers())
        assert float(model_balance_loss(model, 3)) == pytest.approx(float(manual))
        per_seq = []
        for row in batch:  # each sequence alone gives the same per-sequence terms
            model(row[None, :-1])
            per_seq.append(model_balance_loss(model, 1))
        assert float(manual) == pytest.approx(float(sum(per_seq) / 3), rel=1e-5)
        batch_wise = model_balance_loss(model, 1, kind="batch")
        assert float(batch_wise) == pytest.approx(float(per_seq[-1]))  # one sequence: same scope
        with pytest.raises(ValueError, match="kind"):
            model_balance_loss(model, 1, kind="device")
        with pytest.raises(ValueError, match="sequences"):
            model_balance_loss(model, 5)


def test_balanced_loss_adds_alpha_times_balance(corpus):
    model = tiny_model()
    batch = corpus.batch("train", 2, 16, torch.Generator().manual_seed(0))
    loss, metrics = BalancedLoss(alpha=0.5, kind="sequence")(model, batch)
    loss = loss.detach()
    assert float(loss) == pytest.approx(metrics["lm_loss"] + 0.5 * metrics["balance_loss"],
                                        rel=1e-5)
    n_moe = len(model.moe_layers())
    assert 0.5 * n_moe < metrics["balance_loss"] < 4 * n_moe  # ~1 per layer near balance
    with pytest.raises(ValueError, match="alpha"):
        BalancedLoss(alpha=-1.0)


def test_batch_wise_loss_balances_the_batch_not_each_sequence():
    """V3 §4.5.3: the batch-wise loss sees only the batch's total load; "expert" is its alias."""
    assert expert_balance_loss is batch_balance_loss
    scores = torch.full((2, 4, 4), 0.5, dtype=torch.float64)  # equal affinities: P_i = 1/4
    # sequence 0 uses only experts 0, 1; sequence 1 only 2, 3: each sequence is skewed, the batch
    # is balanced
    indices = torch.tensor([[[0, 1]] * 4, [[2, 3]] * 4])  # [2, 4, 2]
    assert float(batch_balance_loss(scores, indices)) == pytest.approx(1.0)  # balanced batch
    assert float(sequence_balance_loss(scores, indices)) == pytest.approx(1.0)  # P flat: also 1
    scores[0, :, :2], scores[1, :, 2:] = 0.9, 0.9  # each sequence also prefers its experts
    per_seq = float(sequence_balance_loss(scores, indices))
    whole = float(batch_balance_loss(scores, indices))
    assert whole == pytest.approx(1.0) and per_seq > 1.2  # only the sequence-wise loss objects


def test_model_loss_kinds_and_alias(corpus):
    with torch.no_grad():
        model = tiny_model()
        batch = corpus.batch("train", 4, 16, torch.Generator().manual_seed(3))
        model(batch[:, :-1])
        batch_wise = float(model_balance_loss(model, 4, kind="batch"))
        assert float(model_balance_loss(model, 4, kind="expert")) == batch_wise
        assert batch_wise != pytest.approx(float(model_balance_loss(model, 4, kind="sequence")))
    assert BalancedLoss(0.1, kind="expert").kind == "batch"
    with pytest.raises(ValueError, match="'sequence'.*'batch'"):
        BalancedLoss(0.1, kind="device")
