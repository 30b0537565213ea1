"""torchrun environment and process-group helpers.

The trainer runs the same code under plain `python`, `sslstream train` and `torchrun`:
`init_distributed()` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) and falls back to a single process when they are absent. gloo serves CPU
runs (tests, laptops), NCCL CUDA runs. Every helper is a no-op with one process, so the
trainer never branches on "am I distributed".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from sslstream.orchestration.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the torchrun variables, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def launched_across_nodes() -> bool:
    """Started by a launcher that spans several nodes: more ranks in the job (WORLD_SIZE)
    than on this node (LOCAL_WORLD_SIZE, which torchrun sets; taken as WORLD_SIZE when
    absent, i.e. one node)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cpu'/'cuda' explicit."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if spec == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"trainer.device must be auto, cpu or cuda, got {spec!r}")


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the torchrun process group when launched by torchrun; otherwise one process.

    NCCL needs one CUDA device per process, selected before the group is created;
    gloo works everywhere (and is what the CPU tests use).
    """
    if dist.is_available() and dist.is_initialized():  # a caller (tests, a launcher) made it
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = resolve_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistEnv(rank, world, local, dev)
    env = torchrun_env()
    if env is None or env[1] == 1:
        rank, world, local = (0, 1, 0) if env is None else env
        dev = resolve_device(device, local)
        if dev.type == "cuda":  # the current device is what DALI / un-indexed .cuda() use
            torch.cuda.set_device(dev)
        return DistEnv(rank, world, local, dev)
    rank, world, local = env
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank, world, local, dev)


def process_group() -> dist.ProcessGroup | None:
    """The default group when one exists (passed to the method's gathered objectives)."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group. A barrier first: gloo with autograd gathers aborted in
    5 of 24 torchrun runs when ranks destroyed the group at different times ("terminate
    called without an active exception"); with the barrier, 0 of 24."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_max(value: float, device: torch.device) -> float:
    """Max of a scalar over ranks (e.g. 'did any rank see SIGTERM / a NaN')."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a (N_r, ...) tensor from every rank along dim 0, ranks in order.

    Ranks may hold different N_r (evaluation sees every sample exactly once, with no
    padding), so the sizes are exchanged first and the rows padded for all_gather.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    cap = max(counts)
    padded = x.new_zeros((cap, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)], dim=0)


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BN running statistics, ...) of `module` from rank `src`.

    DDP syncs buffers at the start of each forward, so after the last step every rank
    still holds the statistics of its own last batch (per-rank BN: CPU/gloo, MoCo's
    shuffle-BN). Evaluations and the final state must use rank 0's, which the checkpoint
    holds.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=src)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a small picklable python object from `src` to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class MissingCheckpointError(FileNotFoundError):
    """A rank lacks the checkpoint rank 0 chose to resume from."""


def fail_together(error: BaseException | None, env: DistEnv) -> None:
    """Raise on every rank when any rank failed a check before training: a rank with its own
    error raises it, the others a UserError naming the first failing rank's message. Then no
    rank waits in a collective for one that stopped."""
    if not env.distributed:
        if error is not None:
            raise error
        return
    found: list = [None] * env.world_size
    dist.all_gather_object(found, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(found) if msg is not None]
    if failed:
        from sslstream.orchestration.errors import UserError

        r, msg = failed[0]
        raise UserError(f"rank {env.rank}: stopping with rank {r}, which failed: {msg}")


def agree_on_checkpoint(store, env: DistEnv):
    """The checkpoint every rank resumes from: the one rank 0 picks, by step, broadcast.

    Why: with a node-local output_dir each rank used to take its own newest file; two nodes
    holding different steps resumed different states and the first collective of mismatched
    steps hung until the NCCL timeout. Now rank 0 decides; every rank checks it can see that
    checkpoint in its own view of the run folder (`store`: its node's folder, or the shared
    store) and all of them fail at once (no collective is left waiting) when one cannot,
    naming the checkpoint and the rank(s) that lack it. On an object store every rank sees
    the same folder, so rank 0's choice is taken as it is."""
    from sslstream.orchestration.runtime import checkpoint as ckpt

    # an object store is one folder for every rank: rank 0 lists it alone
    mine = ckpt.latest_checkpoint(store) if env.is_main or store.local else None
    step = broadcast_object(mine.step if mine is not None else None)
    chosen = ckpt.Checkpoint(store, int(step)) if step is not None else None
    if not env.distributed or not store.local:
        return chosen
    import socket

    have = chosen is not None and any(c.step == chosen.step for c in ckpt.list_checkpoints(store))
    flags: list = [None] * env.world_size
    dist.all_gather_object(flags, (env.rank, socket.gethostname(), have,
                                   mine.name if mine is not None else None))
    if chosen is None:  # rank 0 starts from scratch: so must everyone
        holders = [(r, host, own) for r, host, _, own in flags if own is not None]
        if holders:
            who = ", ".join(f"rank {r} on {host} holds {own}" for r, host, own in holders)
            raise MissingCheckpointError(
                f"rank {env.rank}: rank 0 finds no checkpoint under {store.url} but {who}; "
                "refusing to start over on some nodes and resume on others (copy the "
                "checkpoints to rank 0's node, or use a new run_name)")
        return None
    missing = [(r, host) for r, host, ok, _ in flags if not ok]
    if missing:
        who = ", ".join(f"rank {r} on {host}" for r, host in missing)
        if not have:
            raise MissingCheckpointError(
                f"rank {env.rank}: rank 0 resumes from {chosen.name}, but {chosen.url} does not "
                f"exist on this node ({socket.gethostname()}); a node-local trainer.output_dir "
                "must hold the run's checkpoints on every node (copy them, or use shared "
                "storage: trainer.output_dir=s3://... or gs://...)")
        raise MissingCheckpointError(
            f"rank {env.rank}: not resuming: {who} lack(s) {chosen.name} (rank 0's choice "
            f"under {store.url}); every rank stops instead of hanging in a collective")
    if mine is not None and mine.step != chosen.step:
        import logging

        logging.getLogger("sslstream.train").warning(
            "rank %d: resuming from rank 0's %s, not this node's newest %s", env.rank,
            chosen.name, mine.name)
    return chosen


def loader_threads(setting: int | str | None, gpu: bool | None = None) -> int:
    """Loader threads per rank for `trainer.loader_threads` (an int, or `auto`).

    `auto` comes from orchestration/runtime/resources.py: the CPUs this process may use
    (affinity mask and cgroup quota, never `os.cpu_count()`), shared between the node's
    local ranks and sized together with the reader processes and torch's threads.
    """
    if setting is not None and str(setting) != "auto":
        return int(setting)
    from sslstream.orchestration.runtime.resources import local_ranks, plan_resources, usable_cpus

    gpu = torch.cuda.is_available() if gpu is None else gpu
    return plan_resources(cpus=usable_cpus(), local_ranks=local_ranks(), gpu=gpu).loader_threads
