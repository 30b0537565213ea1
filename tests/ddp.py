"""Run a function on a few real torch.distributed (gloo, CPU) processes, for tests.

Why a helper: every DDP-exactness test needs the same fiddly scaffolding -- a free port on
127.0.0.1, a bounded wait, a barrier before ``destroy_process_group()`` (without it gloo
sometimes aborts with "terminate called without an active exception": 5 of 24 torchrun
runs, 0 of 24 with the barrier; see ``sslstream.orchestration.runtime.distributed.cleanup``), rank 0
leaving the group last and no rank running the interpreter's teardown (see ``_exit``), and
the child's traceback surfaced in the parent instead of a bare non-zero exit code.

Usage (``fn`` must be a module-level, importable function: it is pickled into spawned
processes)::

    def _body(rank: int, world_size: int, x: torch.Tensor) -> torch.Tensor:
        ...                         # torch.distributed is initialised here (gloo)
        return result               # anything torch.save can write

    results = run_ddp(_body, x, world_size=2)   # [result of rank 0, result of rank 1]

A spawn costs a few seconds (each process imports torch), so put several checks in one ``fn``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DDPError", "free_port", "run_ddp"]

_GRACE_S = 10.0  # how long the other ranks may take to notice that one rank failed


class DDPError(RuntimeError):
    """A rank raised, died, or the group did not finish within the timeout."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_ifname() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    for candidate in ("lo", "lo0"):
        if candidate in names:
            return candidate
    return None


def _worker(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Keep gloo's own connections on the loopback interface (only 127.0.0.1 traffic in tests).
    ifname = _loopback_ifname()
    if ifname is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args, **kwargs)
            torch.save(result, out / f"result-{rank}.pt")
            dist.barrier()  # gloo may abort in destroy without it (see the docstring)
        except BaseException:
            dist.destroy_process_group()
            raise
        _leave_last_on_rank0(rank, world_size, out, timeout)
    except BaseException:  # noqa: BLE001 - report anything, including KeyboardInterrupt
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        _exit(1)
    _exit(0)


def _leave_last_on_rank0(rank: int, world_size: int, out: Path, timeout: float) -> None:
    """Destroy the group with rank 0 (the TCPStore's host) last: the other ranks leave
    first and say so in a file, then rank 0 (bounded wait), so no rank tears down after the
    store's host is gone. Why: a 3-rank test's rank 1 aborted once in a full suite run
    ("terminate called without an active exception", exit -6; not reproduced in 35 runs of
    that test alone, under load 4-6) with its work done: teardown is the suspect (not
    proven), so the order of leaving is made fixed."""
    if rank != 0:
        dist.destroy_process_group()
        (out / f"left-{rank}").touch()
        return
    deadline = time.monotonic() + min(timeout, 30.0)
    while time.monotonic() < deadline and not all(
            (out / f"left-{r}").exists() for r in range(1, world_size)):
        time.sleep(0.01)
    dist.destroy_process_group()


def _exit(code: int) -> None:
    """Leave without the interpreter's teardown, after what multiprocessing's own exit does
    (join or stop this rank's child processes, flush): the C++ destructors that run at
    interpreter exit (gloo's threads) are the other teardown step that can abort a rank
    after its result is safely on disk."""
    import multiprocessing.util
    import sys

    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ddp(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo processes.

    Returns the per-rank results, index = rank (moved through ``torch.save`` files, so tensors
    come back as ordinary CPU tensors). Raises :class:`DDPError` carrying each failing rank's
    traceback when a rank raises, dies without a result (e.g. gloo abort), or the group runs
    past ``timeout`` seconds (the processes are then terminated).
    """
    if world_size < 1:
        raise ValueError(f"run_ddp: world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="sslstream-ddp-") as tmp:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, tmp, timeout, fn, args, kwargs),
                name=f"ddp-rank{rank}",
                # not daemonic: a rank may start its own workers (the loader's reader
                # processes); the finally below terminates the ranks whatever happens
                daemon=False,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        first_failure: float | None = None
        try:
            # Poll rather than join in order: when one rank fails, the others are usually stuck
            # in a collective, so give them a short grace period instead of the whole timeout.
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
                    first_failure = time.monotonic()
                if first_failure is not None and time.monotonic() - first_failure > _GRACE_S:
                    break
                time.sleep(0.05)
        finally:
            alive = [p for p in procs if p.is_alive()]
            for p in alive:
                p.terminate()
            for p in alive:
                p.join(5.0)
                if p.is_alive():
                    p.kill()
                    p.join(5.0)

        out = Path(tmp)
        problems: list[str] = []
        for rank, p in enumerate(procs):
            err = out / f"error-{rank}.txt"
            if err.exists():
                problems.append(f"--- rank {rank} raised:\n{err.read_text()}")
            elif p in alive:
                why = "another rank failed" if first_failure is not None else f"{timeout:.0f} s"
                problems.append(f"--- rank {rank} was terminated ({why})")
            elif p.exitcode != 0:
                problems.append(f"--- rank {rank} exited with code {p.exitcode}")
            elif not (out / f"result-{rank}.pt").exists():
                problems.append(f"--- rank {rank} exited without writing a result")
        if problems:
            name = getattr(fn, "__qualname__", repr(fn))
            raise DDPError(
                f"run_ddp({name}, world_size={world_size}) failed:\n" + "\n".join(problems)
            )
        return [
            torch.load(out / f"result-{rank}.pt", weights_only=False) for rank in range(world_size)
        ]
