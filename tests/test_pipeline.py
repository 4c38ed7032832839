"""Pipeline schedules (1F1B, ZB1P, DualPipe): complete, deadlock-free, V3 Table 2 in the
simulator, and the gloo executor bit-equal to a sequential run."""

import itertools

import pytest
import torch

from dsv3_lab.pipeline import (
    SCHEDULES,
    DeadlockError,
    Op,
    OpTimes,
    Task,
    check_complete,
    dualpipe,
    make_schedule,
    one_f_one_b,
    simulate,
    table2_bubble,
)
from dsv3_lab.pipeline_exec import (
    autograd_reference,
    gather,
    run_schedules,
    sequential_reference,
)

SIZES = [(pp, n) for pp in (2, 4, 6, 8) for n in (2 * pp, 2 * pp + 2, 3 * pp + pp % 2 * 3)]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("pp,n", SIZES)
def test_schedules_complete_and_deadlock_free(name, pp, n):
    sched = make_schedule(name, pp, n)
    check_complete(sched)  # one F and one B/BI per (micro-batch, stage, direction); #W == #BI
    res = simulate(sched, OpTimes(F=1, B=2, W=1))
    assert all(len(tl) == len(ops) for tl, ops in zip(res.timelines, sched, strict=True))


def test_check_complete_catches_missing_and_duplicate_work():
    sched = one_f_one_b(4, 8)
    dropped = [ops[:] for ops in sched]
    dropped[2] = [op for op in dropped[2] if op != Op((Task("B", 5),))]
    with pytest.raises(ValueError, match="micro-batch 5"):
        check_complete(dropped)
    doubled = [ops[:] for ops in sched]
    doubled[0].append(Op((Task("F", 0),)))
    with pytest.raises(ValueError):
        check_complete(doubled)
    w_without_bi = [ops[:] for ops in sched]
    w_without_bi[1].append(Op((Task("W", 0),)))
    with pytest.raises(ValueError, match="before its BI|split"):
        check_complete(w_without_bi)


def test_simulator_detects_deadlock():
    sched = one_f_one_b(2, 4)
    sched[1] = [Op((Task("B", 0),))] + [op for op in sched[1] if op != Op((Task("B", 0),))]
    with pytest.raises(DeadlockError):
        simulate(sched)


def _times():
    """Op times with F = B - W (backward for input as long as the forward) and W <= F; F&B
    anywhere from full overlap (max(F, B)) to none (F + B)."""
    for F, W in itertools.product((1, 2, 3), (0, 1, 2, 3)):
        if W <= F:
            B = F + W
            for FB in (max(F, B), (max(F, B) + F + B) / 2, F + B):
                yield OpTimes(F=F, B=B, W=W, FB=FB)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe"])
@pytest.mark.parametrize("pp", [2, 4, 6, 8, 16])
def test_table2_bubble_exact_when_F_equals_B_minus_W(name, pp):
    for n, t in itertools.product((2 * pp, 2 * pp + 2, 3 * pp + pp % 2 * 3), _times()):
        res = simulate(make_schedule(name, pp, n), t)
        assert max(res.bubble) == pytest.approx(table2_bubble(name, pp, t), abs=1e-9), (n, t)
        if name != "dualpipe" or t.fb == t.F + t.B:  # equal on every rank
            assert min(res.bubble) == pytest.approx(max(res.bubble), abs=1e-9)


def test_table2_bubble_not_exact_when_F_differs_from_B_minus_W():
    t = OpTimes(F=1.0, B=2.5, W=0.5)  # BI = 2 > F
    res = simulate(dualpipe(8, 24), t)
    assert max(res.bubble) < table2_bubble("dualpipe", 8, t) - 0.5


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_peak_activations_pp_vs_pp_plus_one(pp):
    n = 3 * pp
    for name, expected in (("1f1b", pp), ("zb1p", pp), ("dualpipe", pp + 1)):
        peaks = simulate(make_schedule(name, pp, n), OpTimes()).peak_activations
        assert max(peaks) == expected, name
    assert simulate(make_schedule("gpipe", pp, n)).peak_activations[0] == n


def test_bad_input():
    with pytest.raises(ValueError, match="pp even"):
        dualpipe(3, 12)
    with pytest.raises(ValueError, match="n_micro >= 2\\*pp"):
        dualpipe(4, 6)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("interleaved", 4, 8)
    with pytest.raises(ValueError, match="W"):
        OpTimes(F=1, B=1, W=2)
    with pytest.raises(TypeError):
        simulate("1f1b")
    with pytest.raises(ValueError, match="pp must be"):
        run_schedules(1, [("1f1b", 4)])


@pytest.mark.parametrize("pp,n", [(4, 8), (2, 4)])
def test_executor_bit_equal_to_sequential(pp, n):
    torch.set_default_dtype(torch.float64)
    jobs = [("1f1b", n), ("zb1p", n), ("dualpipe", n)]
    results = run_schedules(pp, jobs, timeout=90)
    for name, _ in jobs:
        ranks = results[(name, n)]
        n_dirs = 2 if name == "dualpipe" else 1
        losses, grads = gather(ranks, pp)
        ref_losses, ref_grads = sequential_reference(pp, n, n_dirs)
        assert all(torch.equal(a, b) for la, lb in zip(losses, ref_losses, strict=True)
                   for a, b in zip(la, lb, strict=True)), name
        assert all(torch.equal(a, b) for ga, gb in zip(grads, ref_grads, strict=True)
                   for a, b in zip(ga, gb, strict=True)), name
        auto = autograd_reference(pp, n, n_dirs)
        assert max((a - b).abs().max().item() for ga, gb in zip(grads, auto, strict=True)
                   for a, b in zip(ga, gb, strict=True)) < 1e-12
        # every op of the schedule ran, in order, exactly once
        sched = make_schedule(name, pp, n)
        assert [[op for op, _, _ in r["log"]] for r in ranks] == sched


def test_executor_timeout_raises_instead_of_hanging():
    with pytest.raises(TimeoutError, match="still running"):
        run_schedules(2, [("1f1b", 4)], timeout=0.3)  # too short even to start the processes
