"""Run a pipeline schedule (dsv3_lab.pipeline) on real processes: torch.distributed, gloo.

Each process is one pipeline rank. It holds its stages (two for DualPipe: stage r for direction 0
and stage PP-1-r for direction 1), runs its list of ops in order and sends activations forward and
gradients backward point to point (tagged isend/recv). For one op it first receives every input,
then computes, then posts its sends: the semantics of the simulator, so a schedule that the
simulator finds deadlock-free cannot hang here (and a bounded timeout turns any hang into an error).

Stages are small MLPs whose linear layers use `DeferredLinear`, an autograd function whose
backward returns the input gradient at once and, when asked, keeps (x, dY) to compute the weight
gradient later:

    Y = X Wᵀ + b         dX = dY W            (BI: needed upstream now)
                         dW = dYᵀ X, db = Σ dY   (W: needed only by the optimizer)

Exactness: a micro-batch's forward and backward run the same ops in the same order here and in
`sequential_reference`, and every parameter accumulates its micro-batch gradients in micro-batch
order (per direction; the two DualPipe copies of a stage are summed at the end), so in float64
with one thread the losses and gradients are bit-equal to the sequential run.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from dsv3_lab.parallel import free_port, process_context
from dsv3_lab.pipeline import make_schedule, n_directions, rank_of, stage_of


class DeferredLinear(torch.autograd.Function):
    """y = x Wᵀ + b whose backward leaves the weight gradient to `store` (a list) when given one."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.bias, ctx.store = bias, store
        return x @ weight.T + bias  # [n, out]

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        params = (weight, ctx.bias)
        if ctx.store is None or not ctx.store.defer:
            weight_grad(params, x, dy)
        else:
            ctx.store.pending.append((params, x, dy))
        return dy @ weight, None, None, None  # dX [n, in]


def weight_grad(params, x: torch.Tensor, dy: torch.Tensor) -> None:
    """The W chunk of one linear layer: accumulate dW = dYᵀ X and db = Σ_n dY into .grad."""
    for p, g in zip(params, (dy.T @ x, dy.sum(0)), strict=True):
        p.grad = g if p.grad is None else p.grad + g


class WeightStore:
    """Deferred weight gradients of one stage. `defer` on: backward only queues them."""

    def __init__(self):
        self.defer, self.pending = False, []


class MLPStage(nn.Module):
    """One pipeline stage: `n_layers` of tanh(DeferredLinear) on [n, dim] activations."""

    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(dim, dim) / dim ** 0.5) for _ in range(n_layers)])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(dim).uniform_(-0.1, 0.1)) for _ in range(n_layers)])
        self.store = WeightStore()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, dim] -> [n, dim]
        for w, b in zip(self.weights, self.biases, strict=True):
            x = torch.tanh(DeferredLinear.apply(x, w, b, self.store))
        return x


def build_stages(pp: int, dim: int, n_layers: int, seed: int) -> list[MLPStage]:
    """The whole model, PP stages, from one seed (every process builds the same weights)."""
    torch.manual_seed(seed)
    return [MLPStage(dim, n_layers) for _ in range(pp)]


def make_data(n_dirs: int, n_micro: int, rows: int, dim: int, seed: int):
    """Inputs and regression targets: data[d][mb] = (x [rows, dim], y [rows, dim])."""
    g = torch.Generator().manual_seed(seed + 1)
    per_dir = n_micro // n_dirs
    return [[(torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g))
             for _ in range(per_dir)] for _ in range(n_dirs)]


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def sequential_reference(pp: int, n_micro: int, n_dirs: int, dim: int = 16, n_layers: int = 2,
                         rows: int = 8, seed: int = 0):
    """One process, micro-batch after micro-batch, stage after stage: losses[d][mb] and the
    gradients of every stage (sum over directions: [stage][param] tensors)."""
    data = make_data(n_dirs, n_micro, rows, dim, seed)
    copies = [build_stages(pp, dim, n_layers, seed) for _ in range(n_dirs)]
    losses = []
    for d in range(n_dirs):
        losses.append([])
        for x, y in data[d]:
            acts = []
            h = x
            for s in range(pp):
                inp = h.detach().requires_grad_(True)
                h = copies[d][s](inp)
                acts.append((inp, h))
            loss = loss_fn(h, y)
            losses[d].append(loss.detach())
            grad = None
            for s in reversed(range(pp)):
                inp, out = acts[s]
                if s == pp - 1:
                    loss.backward()
                else:
                    torch.autograd.backward(out, grad)
                grad = inp.grad
    grads = [[sum(ps) for ps in zip(*[[p.grad for p in c[s].parameters()] for c in copies],
                                    strict=True)] for s in range(pp)]
    return losses, grads


def autograd_reference(pp: int, n_micro: int, n_dirs: int, dim: int = 16, n_layers: int = 2,
                       rows: int = 8, seed: int = 0):
    """The same model as plain nn.Linear + tanh under ordinary autograd, all micro-batches'
    losses summed: an independent check of DeferredLinear (equal up to rounding, not bitwise)."""
    stages = build_stages(pp, dim, n_layers, seed)
    layers = []
    for st in stages:
        for w, b in zip(st.weights, st.biases, strict=True):
            lin = nn.Linear(dim, dim)
            lin.weight.data.copy_(w.data)
            lin.bias.data.copy_(b.data)
            layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers)
    total = sum(loss_fn(model(x), y) for per_dir in make_data(n_dirs, n_micro, rows, dim, seed)
                for x, y in per_dir)
    total.backward()
    grads = [p.grad for p in model.parameters()]  # w0, b0, w1, b1, ... in stage order
    per = 2 * n_layers
    return [[*grads[s * per:(s + 1) * per:2], *grads[s * per + 1:(s + 1) * per:2]]
            for s in range(pp)]


# ----------------------------------------------------------------------------- one rank
def _tag(kind: int, d: int, mb: int) -> int:
    return (2 * d + kind) * 100_000 + mb  # kind 0: activation, 1: gradient


def run_rank(rank: int, pp: int, name: str, n_micro: int, dim: int, n_layers: int, rows: int,
             seed: int) -> dict:
    """Run schedule `name` on this rank (process group already initialised)."""
    import torch.distributed as dist

    schedule = make_schedule(name, pp, n_micro)
    n_dirs = n_directions(schedule)
    data = make_data(n_dirs, n_micro, rows, dim, seed)
    stages = {}  # direction -> this rank's stage for that direction (own copy of the weights)
    for d in range(n_dirs):
        stages[d] = build_stages(pp, dim, n_layers, seed)[stage_of(rank, d, pp)]
    saved, deferred, losses, sends, log = {}, {}, {}, [], []
    dist.barrier()
    for op in schedule[rank]:
        inputs = {}
        for t in op.tasks:  # 1. receive everything this op needs
            s = stage_of(rank, t.dir, pp)
            if t.kind == "F" and s > 0:
                buf = torch.empty(rows, dim)
                dist.recv(buf, src=rank_of(s - 1, t.dir, pp), tag=_tag(0, t.dir, t.mb))
                inputs[t] = buf
            elif t.kind in ("B", "BI") and s < pp - 1:
                buf = torch.empty(rows, dim)
                dist.recv(buf, src=rank_of(s + 1, t.dir, pp), tag=_tag(1, t.dir, t.mb))
                inputs[t] = buf
        t0 = time.perf_counter()
        out_msgs = []
        for t in op.tasks:  # 2. compute
            s, stage = stage_of(rank, t.dir, pp), stages[t.dir]
            if t.kind == "F":
                x = data[t.dir][t.mb][0] if s == 0 else inputs[t]
                x = x.detach().requires_grad_(True)
                out = stage(x)
                if s == pp - 1:
                    loss = loss_fn(out, data[t.dir][t.mb][1])
                    losses[(t.dir, t.mb)] = loss.detach()
                    saved[(t.dir, t.mb)] = (x, loss)
                else:
                    saved[(t.dir, t.mb)] = (x, out)
                    out_msgs.append((out.detach(), rank_of(s + 1, t.dir, pp), _tag(0, t.dir, t.mb)))
            elif t.kind in ("B", "BI"):
                x, out = saved.pop((t.dir, t.mb))
                stage.store.defer, stage.store.pending = t.kind == "BI", []
                if s == pp - 1:
                    out.backward()
                else:
                    torch.autograd.backward(out, inputs[t])
                stage.store.defer = False
                if t.kind == "BI":
                    deferred[(t.dir, t.mb)] = stage.store.pending
                if s > 0:
                    out_msgs.append((x.grad, rank_of(s - 1, t.dir, pp), _tag(1, t.dir, t.mb)))
            else:  # W: the weight gradients this micro-batch's BI left behind
                for params, x, dy in deferred.pop((t.dir, t.mb)):
                    weight_grad(params, x, dy)
        t1 = time.perf_counter()
        for tensor, dst, tag in out_msgs:  # 3. send
            sends.append((dist.isend(tensor, dst=dst, tag=tag), tensor))
        log.append((op, t0, t1))
    for req, _ in sends:
        req.wait()
    dist.barrier()
    if saved or deferred:
        raise RuntimeError(f"rank {rank}: {name} left work undone: {list(saved)} {list(deferred)}")
    grads = {stage_of(rank, d, pp): [p.grad.clone() for p in st.parameters()]
             for d, st in stages.items()}
    return {"losses": losses, "grads": grads, "log": log}


def gather(ranks: list[dict], pp: int):
    """Per-rank results -> (losses[d][mb], grads[stage][param]) laid out like
    `sequential_reference`; a stage's two DualPipe copies are summed in direction order."""
    losses: dict = {}
    for res in ranks:
        losses.update(res["losses"])
    n_dirs = 1 + max(d for d, _ in losses)
    per_dir = len(losses) // n_dirs
    grads = []
    for s in range(pp):
        parts = [ranks[rank_of(s, d, pp)]["grads"][s] for d in range(n_dirs)]
        grads.append([sum(ps) for ps in zip(*parts, strict=True)])
    return [[losses[(d, m)] for m in range(per_dir)] for d in range(n_dirs)], grads


def _warm_up(rank: int, pp: int) -> None:
    """Open every neighbour connection once (gloo opens pairs lazily) so timings exclude it."""
    import torch.distributed as dist

    reqs = [dist.isend(torch.zeros(1), dst=peer, tag=999_999) for peer in (rank - 1, rank + 1)
            if 0 <= peer < pp]
    for peer in (rank - 1, rank + 1):
        if 0 <= peer < pp:
            dist.recv(torch.empty(1), src=peer, tag=999_999)
    for req in reqs:
        req.wait()
    dist.barrier()


def _worker(rank: int, pp: int, port: int, jobs: list, cfg: dict, out_dir: str, timeout: float):
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=pp, timeout=timedelta(seconds=timeout))
        _warm_up(rank, pp)
        for name, n in jobs:  # untimed pass: first calls load kernels and open buffers lazily
            run_rank(rank, pp, name, n, **cfg)
        results = {(name, n): run_rank(rank, pp, name, n, **cfg) for name, n in jobs}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise SystemExit(1) from None


def run_schedules(pp: int, jobs: list[tuple[str, int]], dim: int = 16, n_layers: int = 2,
                  rows: int = 8, seed: int = 0, timeout: float = 60.0) -> dict:
    """Start PP processes once (`dsv3_lab.parallel.process_context`) and run every
    (schedule name, n_micro) job on them.

    Returns {(name, n_micro): [per-rank result]}, each {"losses": {(dir, mb): loss},
    "grads": {stage: [grads]}, "log": [(op, t0, t1)]}. Raises TimeoutError if the processes do
    not finish within `timeout` seconds (a hung schedule), RuntimeError if one fails."""
    if not isinstance(pp, int) or pp < 2:
        raise ValueError(f"run_schedules: pp must be an int >= 2, got {pp!r}")
    for name, n in jobs:
        make_schedule(name, pp, n)  # validates name and sizes before any process starts
    cfg = dict(dim=dim, n_layers=n_layers, rows=rows, seed=seed)
    ctx = process_context()
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, pp, port, jobs, cfg, out_dir, timeout))
                 for r in range(pp)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(5)
            raise TimeoutError(f"run_schedules: pp={pp} processes still running after {timeout} s")
        errors = sorted(Path(out_dir).glob("error*.txt"))
        if errors or any(p.exitcode != 0 for p in procs):
            msg = errors[0].read_text() if errors else "a worker exited with an error"
            raise RuntimeError(f"run_schedules: {msg}")
        per_rank = [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
                    for r in range(pp)]
    return {job: [res[job] for res in per_rank] for job in per_rank[0]}
