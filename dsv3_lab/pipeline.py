"""Pipeline-parallel schedules (GPipe, 1F1B, ZB1P, DualPipe) and a discrete-event simulator.

A model is cut into PP stages, one per rank; a batch into micro-batches. Each micro-batch runs a
forward chunk F on every stage in order, then a backward chunk on every stage in reverse order.
Zero-bubble schedules split the backward into B_in (gradient w.r.t. the stage input, needed by
the previous stage at once) and W (gradient w.r.t. the weights, needed only by the optimizer):

    B = B_in + W        (V3 §3.2.1: "backward for input" and "backward for weights")

DualPipe (V3 §3.2.1, Figure 5) feeds micro-batches from both ends: direction 0 runs stages
0..PP-1 on ranks 0..PP-1, direction 1 runs them on ranks PP-1..0, so rank r holds stage r and
stage PP-1-r (two copies of the parameters). In its steady state each rank runs a forward chunk
of one direction *overlapped* with a backward chunk of the other (one F&B op), which is where the
all-to-all and point-to-point traffic hide behind computation.

Bubble per rank (V3 Table 2; DeepSeek's DualPipe README), F forward, B full backward, W weight
part, F&B an overlapped forward+backward pair:

    1F1B      (PP - 1)(F + B)              parameters 1x   activations PP
    ZB1P      (PP - 1)(F + B - 2W)         parameters 1x   activations PP
    DualPipe  (PP/2 - 1)(F&B + B - 3W)     parameters 2x   activations PP + 1

A schedule here is a list per rank of `Op`s, each a tuple of one or two `Task`s (two = an
overlapped F&B). `simulate` runs the ops of each rank in order, each starting when the rank is
free and its inputs have arrived, and returns the timelines, the idle time ("bubble") of each rank
and the peak number of micro-batch activations held by each rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

KINDS = ("F", "B", "BI", "W")  # forward, full backward, backward for input, backward for weights


class Task(NamedTuple):
    """One chunk of work: `kind` in KINDS for micro-batch `mb` of direction `dir` (0 or 1)."""
    kind: str
    mb: int
    dir: int = 0


class Op(NamedTuple):
    """What one rank does in one slot: one Task, or two mutually overlapped ones (F&B)."""
    tasks: tuple[Task, ...]

    @property
    def label(self) -> str:
        return "&".join(t.kind for t in self.tasks)


def stage_of(rank: int, direction: int, pp: int) -> int:
    """The stage `rank` runs for micro-batches of `direction` (0: stages 0..PP-1, 1: reversed)."""
    return rank if direction == 0 else pp - 1 - rank


def rank_of(stage: int, direction: int, pp: int) -> int:
    return stage if direction == 0 else pp - 1 - stage


def _check(pp: int, n_micro: int, name: str) -> None:
    for what, v in (("pp", pp), ("n_micro", n_micro)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: {what} must be an int >= 1, got {v!r}")


def _one(kind: str, mb: int, d: int = 0) -> Op:
    return Op((Task(kind, mb, d),))


# ----------------------------------------------------------------------------- schedules
def gpipe(pp: int, n_micro: int) -> list[list[Op]]:
    """All forwards, then all backwards (GPipe): bubble (PP-1)(F+B), activations n_micro."""
    _check(pp, n_micro, "gpipe")
    return [[_one("F", i) for i in range(n_micro)] + [_one("B", i) for i in range(n_micro)]
            for _ in range(pp)]


def one_f_one_b(pp: int, n_micro: int) -> list[list[Op]]:
    """1F1B: rank r runs PP-1-r warm-up forwards, then alternates F and B, then drains the Bs."""
    _check(pp, n_micro, "one_f_one_b")
    sched = []
    for r in range(pp):
        warm = min(pp - 1 - r, n_micro)
        ops = [_one("F", i) for i in range(warm)]
        for i in range(n_micro - warm):
            ops += [_one("F", warm + i), _one("B", i)]
        ops += [_one("B", i) for i in range(n_micro - warm, n_micro)]
        sched.append(ops)
    return sched


def zb1p(pp: int, n_micro: int) -> list[list[Op]]:
    """ZB1P (ZB-H1 of Qi et al. 2023): 1F1B order with the backward split into BI and W.

    BI goes upstream at once, so the gradient wave moves at BI per stage instead of B. Rank r
    keeps r weight chunks W pending (the last rank PP-1 of them), to run in its drain phase,
    where 1F1B leaves it waiting for gradients: forwards not yet backwarded plus pending Ws stay
    PP - r + r = PP per rank, the in-flight count of 1F1B's first rank.
    """
    _check(pp, n_micro, "zb1p")
    sched = []
    for r in range(pp):
        warm = min(pp - 1 - r, n_micro)
        ops = [_one("F", i) for i in range(warm)]
        pending: list[int] = []  # micro-batches whose W is still owed, oldest first
        for i in range(n_micro - warm):
            ops += [_one("F", warm + i), _one("BI", i)]
            pending.append(i)
            if len(pending) > r:
                ops.append(_one("W", pending.pop(0)))
        for i in range(n_micro - warm, n_micro):  # drain: one pending W after each BI
            pending.append(i)
            ops += [_one("BI", i), _one("W", pending.pop(0))]
        ops += [_one("W", i) for i in pending]
        sched.append(ops)
    return sched


def dualpipe(pp: int, n_micro: int) -> list[list[Op]]:
    """DualPipe (V3 §3.2.1, Figure 5): n_micro micro-batches, half fed from each end.

    Needs PP even and n_micro even with n_micro >= 2 PP. Written from the report's Figure 5 and the
    phase structure of DeepSeek's public DualPipe: on each rank, "near" is the direction whose
    stage on this rank is in the first half of the pipe, "far" the other one. With h = min(r,
    PP-1-r) and H = PP/2, a rank runs eight phases:
      1. 2(H-h-1) forwards of near          5. (H-h-1) x [far B, F&B(far F, near B)]
      2. (h+1) x [near F, far F]            6. (h+1) x [far B, near B] (the later half split BI+W)
      3. (H-h-1) x [far BI, W, far F]       7. (H-h-1) x [W, near BI]
      4. (n/2-PP+h+1) x [F&B(near F, far B), F&B(far F, near B)]    8. the remaining (h+1) Ws
    The two middle ranks run the first near-F / far-B pair of phase 4 unoverlapped.
    """
    _check(pp, n_micro, "dualpipe")
    if pp % 2 or n_micro % 2 or n_micro < 2 * pp:
        raise ValueError(f"dualpipe: needs pp even and n_micro even with n_micro >= 2*pp, got "
                         f"pp={pp}, n_micro={n_micro}")
    half, per_dir = pp // 2, n_micro // 2
    sched = []
    for r in range(pp):
        h = min(r, pp - 1 - r)
        near, far = (0, 1) if r < half else (1, 0)
        ops: list[Op] = []
        counts = _Counters()
        task, w = counts.task, counts.weight

        for _ in range(2 * (half - h - 1)):  # phase 1
            ops.append(Op((task("F", near),)))
        for _ in range(h + 1):  # phase 2
            ops += [Op((task("F", near),)), Op((task("F", far),))]
        for _ in range(half - h - 1):  # phase 3
            ops += [Op((task("BI", far),)), w(), Op((task("F", far),))]
        for i in range(per_dir - pp + h + 1):  # phase 4 (main)
            if i == 0 and h == half - 1:
                ops += [Op((task("F", near),)), Op((task("B", far),))]
            else:
                ops.append(Op((task("F", near), task("B", far))))
            ops.append(Op((task("F", far), task("B", near))))
        for _ in range(half - h - 1):  # phase 5
            ops.append(Op((task("B", far),)))
            ops.append(Op((task("F", far), task("B", near))))
        split = False
        for i in range(h + 1):  # phase 6: the second half of these backwards is split
            if i == (h + 1) // 2 and h % 2 == 1:
                split = True
            ops.append(Op((task("BI" if split else "B", far),)))
            if i == (h + 1) // 2 and h % 2 == 0:
                split = True
            ops.append(Op((task("BI" if split else "B", near),)))
        for _ in range(half - h - 1):  # phase 7
            ops += [w(), Op((task("BI", near),))]
        while counts.pending:  # phase 8
            ops.append(w())
        sched.append(ops)
    return sched


class _Counters:
    """Next micro-batch per direction for forwards and for backwards, and the FIFO of split
    backwards whose W is still owed (DualPipe keeps one such queue per rank)."""

    def __init__(self):
        self.next = {"F": [0, 0], "G": [0, 0]}
        self.pending: list[Task] = []

    def task(self, kind: str, d: int) -> Task:
        key = "F" if kind == "F" else "G"
        t = Task(kind, self.next[key][d], d)
        self.next[key][d] += 1
        if kind == "BI":
            self.pending.append(t)
        return t

    def weight(self) -> Op:
        t = self.pending.pop(0)
        return _one("W", t.mb, t.dir)


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe}


def make_schedule(name: str, pp: int, n_micro: int) -> list[list[Op]]:
    if name not in SCHEDULES:
        raise ValueError(f"make_schedule: unknown schedule {name!r}, expected one of "
                         f"{sorted(SCHEDULES)}")
    return SCHEDULES[name](pp, n_micro)


def check_complete(schedule: list[list[Op]]) -> None:
    """Raise ValueError unless every (micro-batch, stage, direction) has exactly one F and one
    backward (B or BI), every BI exactly one later W on the same rank, and no W lacks its BI."""
    pp, seen = len(schedule), {}
    for r, ops in enumerate(schedule):
        split = set()
        for op in ops:
            for t in op.tasks:
                if t.kind not in KINDS:
                    raise ValueError(f"check_complete: unknown kind {t.kind!r} on rank {r}")
                key = ("F" if t.kind == "F" else "W" if t.kind == "W" else "G",
                       t.mb, t.dir, stage_of(r, t.dir, pp))
                seen[key] = seen.get(key, 0) + 1
                if t.kind == "BI":
                    split.add((t.mb, t.dir))
                elif t.kind == "W" and (t.mb, t.dir) not in split:
                    raise ValueError(f"check_complete: rank {r} runs W{t.mb} before its BI")
    n_dirs = n_directions(schedule)
    mbs = {k[1] for k in seen}
    for d in range(n_dirs):
        for m in mbs:
            for s in range(pp):
                for kind in ("F", "G"):
                    if seen.get((kind, m, d, s), 0) != 1:
                        raise ValueError(f"check_complete: {kind} of micro-batch {m}, direction "
                                         f"{d}, stage {s} runs {seen.get((kind, m, d, s), 0)}x")
    n_bi = sum(t.kind == "BI" for ops in schedule for op in ops for t in op.tasks)
    n_w = sum(t.kind == "W" for ops in schedule for op in ops for t in op.tasks)
    if n_bi != n_w or any(v != 1 for k, v in seen.items() if k[0] == "W"):
        raise ValueError(f"check_complete: {n_bi} split backwards but {n_w} W chunks")


def n_directions(schedule: list[list[Op]]) -> int:
    return 1 + max(t.dir for ops in schedule for op in ops for t in op.tasks)


# ----------------------------------------------------------------------------- simulator
@dataclass(frozen=True)
class OpTimes:
    """Durations of one chunk: F forward, B full backward, W its weight part, FB an overlapped
    F&B pair (default F + B: overlap hides communication, not compute). BI = B - W."""
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None

    def __post_init__(self):
        for k in ("F", "B", "W"):
            if not isinstance(getattr(self, k), (int, float)) or getattr(self, k) < 0:
                raise ValueError(f"OpTimes: {k} must be a number >= 0, got {getattr(self, k)!r}")
        if self.W > self.B:
            raise ValueError(f"OpTimes: W (weight part of the backward) must be <= B, got "
                             f"W={self.W}, B={self.B}")

    @property
    def BI(self) -> float:
        return self.B - self.W

    @property
    def fb(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of(self, op: Op) -> float:
        if len(op.tasks) == 2:
            return self.fb
        return {"F": self.F, "B": self.B, "BI": self.BI, "W": self.W}[op.tasks[0].kind]


@dataclass
class SimResult:
    """Per rank: timeline [(start, end, op)], busy time, bubble = makespan - busy, peak number of
    micro-batch activations held (a forward adds one, its B or BI frees it)."""
    timelines: list[list[tuple[float, float, Op]]]
    makespan: float
    busy: list[float] = field(default_factory=list)
    bubble: list[float] = field(default_factory=list)
    peak_activations: list[int] = field(default_factory=list)


class DeadlockError(RuntimeError):
    pass


def _deps(task: Task, rank: int, pp: int) -> list[tuple[tuple, int]]:
    """(event key, rank it happens on) that must finish before `task` on `rank` may start.
    Event keys: ("F"|"G"|"W", mb, dir, stage); "G" = input gradient ready (after B or BI)."""
    s = stage_of(rank, task.dir, pp)
    m, d = task.mb, task.dir
    if task.kind == "F":
        return [] if s == 0 else [(("F", m, d, s - 1), rank_of(s - 1, d, pp))]
    if task.kind in ("B", "BI"):
        deps = [(("F", m, d, s), rank)]
        if s < pp - 1:
            deps.append((("G", m, d, s + 1), rank_of(s + 1, d, pp)))
        return deps
    return [(("G", m, d, s), rank)]  # W needs the split backward of the same chunk


def _events(task: Task, rank: int, pp: int) -> list[tuple]:
    s = stage_of(rank, task.dir, pp)
    key = {"F": ["F"], "B": ["G", "W"], "BI": ["G"], "W": ["W"]}[task.kind]
    return [(k, task.mb, task.dir, s) for k in key]


def simulate(schedule: list[list[Op]], times: OpTimes | None = None,
             comm: float = 0.0) -> SimResult:
    """Run every rank's ops in order; an op starts when its rank is free and every input has
    arrived (`comm` added to each dependency that crosses ranks). Raises DeadlockError when no
    rank can start its next op, ValueError when a chunk runs twice."""
    times = times or OpTimes()
    if not isinstance(schedule, list) or not schedule or not all(isinstance(o, list)
                                                                 for o in schedule):
        raise TypeError("simulate: expected a schedule: a non-empty list (one per rank) of "
                        "lists of Op")
    if comm < 0:
        raise ValueError(f"simulate: comm must be >= 0, got {comm}")
    pp = len(schedule)
    done: dict[tuple, float] = {}  # event key -> finish time
    pos, free = [0] * pp, [0.0] * pp
    timelines: list[list] = [[] for _ in range(pp)]
    total = sum(len(ops) for ops in schedule)
    while sum(pos) < total:
        progressed = False
        for r in range(pp):
            while pos[r] < len(schedule[r]):
                op = schedule[r][pos[r]]
                deps = [d for t in op.tasks for d in _deps(t, r, pp)]
                if any(key not in done for key, _ in deps):
                    break
                start = max([free[r]] + [done[k] + (comm if src != r else 0.0)
                                          for k, src in deps])
                end = start + times.of(op)
                for t in op.tasks:
                    for key in _events(t, r, pp):
                        if key in done:
                            raise ValueError(f"simulate: rank {r} runs {key} twice")
                        done[key] = end
                timelines[r].append((start, end, op))
                free[r], pos[r], progressed = end, pos[r] + 1, True
        if not progressed:
            stuck = {r: schedule[r][pos[r]] for r in range(pp) if pos[r] < len(schedule[r])}
            raise DeadlockError(f"simulate: deadlock, next ops waiting forever: {stuck}")
    makespan = max(free)
    res = SimResult(timelines, makespan)
    for r in range(pp):
        busy = sum(e - s for s, e, _ in timelines[r])
        held = peak = 0
        for _, _, op in timelines[r]:
            for t in op.tasks:  # in an F&B the forward starts first, so both are held at once
                held += {"F": 1, "B": -1, "BI": -1, "W": 0}[t.kind]
                peak = max(peak, held)
        res.busy.append(busy)
        res.bubble.append(makespan - busy)
        res.peak_activations.append(peak)
    return res


def table2_bubble(name: str, pp: int, times: OpTimes) -> float:
    """The bubble formula of V3 Table 2 for schedule `name` ("1f1b", "zb1p", "dualpipe")."""
    F, B, W, FB = times.F, times.B, times.W, times.fb
    formulas = {"gpipe": (pp - 1) * (F + B), "1f1b": (pp - 1) * (F + B),
                "zb1p": (pp - 1) * (F + B - 2 * W), "dualpipe": (pp / 2 - 1) * (FB + B - 3 * W)}
    if name not in formulas:
        raise ValueError(f"table2_bubble: unknown schedule {name!r}, expected one of "
                         f"{sorted(formulas)}")
    return formulas[name]
