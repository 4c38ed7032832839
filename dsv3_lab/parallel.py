"""torch.distributed on one machine: launch W gloo processes, virtual nodes, cross-node traffic.

Launch. `launch(worker, world_size, *args)` starts W processes on localhost (gloo backend, bound
to 127.0.0.1 / the loopback interface, a free port), runs `worker(rank, world_size, *args)` in
each, and returns the W results in rank order. Every worker starts with one thread and float64
as the default dtype (the same numbers on every CPU, see dsv3_lab.notebook). The processes come
from `process_context()`: forked from a clean server process where the platform has one, else
spawned; either way they are fresh interpreters, not copies of the caller, so the worker must
be a module-level function of an importable module (it is pickled by name): a function defined
in a notebook cannot be sent. A worker that raises makes `launch` raise RuntimeError
with the worker's traceback; one that hangs or dies makes it raise after `timeout` seconds
instead of blocking: a broken worker fails, it never hangs the caller.

Virtual nodes (V3 §3.2.2). W ranks form W / ranks_per_node nodes; rank r is on node
r // ranks_per_node and owns experts [r·E/W, (r+1)·E/W). With expert groups = nodes, the gate's
group limit (n_limited_groups = M) is node-limited routing: a token reaches at most M nodes.
For a token on node h routed to experts with nodes n_1..n_K, what crosses node boundaries:

    copies without deduplication = #{k : n_k ≠ h}            one copy per remote expert
    copies with deduplication    = #{distinct n_k ≠ h}       one copy per remote node (IB), then
                                                             forwarded inside the node (NVLink)

With deduplication a token costs at most M IB copies whatever K is; V3 bounds the NVLink side
instead: IB 50 GB/s vs NVLink 160 GB/s gives 3.2 experts per node, 13 in all (4 nodes × 3.2)
at no extra IB cost (V3 §3.2.2).
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

INIT_TIMEOUT_S = 60  # torch.distributed's own timeout for rendezvous and collectives


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_context():
    """How worker processes start: "forkserver" where the platform has it (Linux, macOS), else
    "spawn" (Windows).

    Both start each worker from a fresh interpreter, never from a copy of the caller (a fork of a
    process that already runs threads can deadlock). A spawned worker imports torch itself: 4
    workers took ~6 s to start, and ~12 s of CPU. The fork server is started once per calling
    process, at its first launch, imports torch and this module there, and forks every worker
    from it: later launches start 4 workers in ~0.1 s.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dsv3_lab.parallel"])  # used when the server starts
    return ctx


def _entry(rank: int, world_size: int, port: int, worker: Callable, args: tuple, results) -> None:
    """Body of every worker process: set up, init gloo, run the worker, report back."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=INIT_TIMEOUT_S))
        try:
            out = worker(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: tensors travel by value (not as shared memory that dies with us)
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def _failures(worker: Callable, failed: dict, results, procs, grace: float = 2.0) -> str:
    """Every rank's traceback that arrives within `grace` seconds of the first, and the ranks
    that died without one (exit code)."""
    world_size = len(procs)
    end = time.monotonic() + grace
    while len(failed) < world_size and time.monotonic() < end:
        try:
            rank, ok, payload = results.get(timeout=0.1)
        except queue_module.Empty:
            continue
        if not ok:
            failed[rank] = payload
    died = [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(procs)
            if r not in failed and p.exitcode not in (None, 0)]
    text = "\n".join(f"--- rank {r}:\n{failed[r]}" for r in sorted(failed))
    return (f"launch: {worker.__name__} failed on rank(s) {sorted(failed)}"
            f"{'; ' + ', '.join(died) if died else ''}:\n{text}")


def launch(worker: Callable, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run worker(rank, world_size, *args) in world_size gloo processes; results by rank.

    Raises RuntimeError if a worker raises or dies, TimeoutError after `timeout` seconds.
    """
    if not callable(worker) or "<locals>" in getattr(worker, "__qualname__", "<locals>") \
            or getattr(worker, "__module__", "__main__") == "__main__":
        raise TypeError(f"launch: worker must be a module-level function of an importable "
                        f"module (it is pickled by name), got {worker!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"launch: world_size must be a positive int, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"launch: timeout must be > 0 seconds, got {timeout!r}")
    ctx = process_context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, worker, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:  # read before joining: a full pipe blocks the child
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in outputs]
                if dead:
                    raise RuntimeError(f"launch: rank {dead[0]} died with exit code "
                                       f"{procs[dead[0]].exitcode} before reporting") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"launch: {worker.__name__} did not finish within "
                                       f"{timeout} s ({len(outputs)} of {world_size} ranks "
                                       f"reported)") from None
                continue
            if not ok:  # the others may fail as a consequence: collect them briefly
                raise RuntimeError(_failures(worker, {rank: payload}, results, procs))
            outputs[rank] = pickle.loads(payload)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    return [outputs[r] for r in range(world_size)]


# ---------------------------------------------------------------------------- test workers
def failing_worker(rank: int, world_size: int, bad_rank: int = 1) -> None:
    """Raises on rank `bad_rank`; the others wait in a collective that can never finish."""
    if rank == bad_rank:
        raise ValueError(f"failing_worker: rank {rank} fails on purpose")
    dist.barrier()


def crashing_worker(rank: int, world_size: int, bad_rank: int = 1) -> None:
    """Rank `bad_rank` dies without a word (os._exit), as a segfault or an OOM kill would."""
    if rank == bad_rank:
        os._exit(3)
    dist.barrier()


def hanging_worker(rank: int, world_size: int, seconds: float = 600.0) -> None:
    """Sleeps far past any reasonable timeout (tests that launch raises instead of hanging)."""
    time.sleep(seconds)


# ---------------------------------------------------------------------------- virtual nodes
def check_topology(world_size: int, ranks_per_node: int, n_experts: int) -> None:
    """W ranks in whole nodes, E experts in whole shares per rank, else ValueError."""
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"world_size={world_size} ranks do not form whole nodes of "
                         f"ranks_per_node={ranks_per_node}")
    if n_experts % world_size:
        raise ValueError(f"n_routed_experts={n_experts} experts do not split evenly over "
                         f"world_size={world_size} ranks")


def expert_node(indices: torch.Tensor, n_experts: int, n_nodes: int) -> torch.Tensor:
    """Node hosting each chosen expert: experts split in order into n_nodes equal blocks."""
    if n_experts % n_nodes:
        raise ValueError(f"expert_node: {n_experts} experts do not split over {n_nodes} nodes")
    return torch.div(indices, n_experts // n_nodes, rounding_mode="floor")


def node_traffic(indices: torch.Tensor, home_node: torch.Tensor, n_experts: int,
                 n_nodes: int) -> dict[str, torch.Tensor]:
    """Copies of each token [N] that cross node boundaries, and NVLink forwards after IB.

    indices [N, K] chosen experts; home_node [N] the node each token lives on. Returns per-token
    counts: "experts_remote" (no deduplication), "nodes_remote" (one copy per remote node, the
    IB traffic with deduplication) and "nodes" (distinct nodes reached, the home node included).
    With deduplication each IB arrival is forwarded over NVLink to the experts it serves there:
    experts_remote / nodes_remote of them on average.
    """
    if indices.dim() != 2 or home_node.shape != indices.shape[:1]:
        raise ValueError(f"node_traffic: expected indices [N, K] and home_node [N], got "
                         f"{tuple(indices.shape)} and {tuple(home_node.shape)}")
    node = expert_node(indices, n_experts, n_nodes)  # [N, K]
    reached = torch.zeros(indices.shape[0], n_nodes, dtype=torch.bool)
    reached.scatter_(1, node, True)  # [N, nodes]
    remote = node != home_node[:, None]  # [N, K]
    home = torch.nn.functional.one_hot(home_node, n_nodes).bool()  # [N, nodes]
    return {"experts_remote": remote.sum(-1), "nodes_remote": (reached & ~home).sum(-1),
            "nodes": reached.sum(-1)}
