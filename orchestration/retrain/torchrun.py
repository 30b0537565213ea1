"""Multi-GPU training for `sslstream retrain`: the job stays one process, torchrun is its child.

Why not run `sslstream retrain` itself under torchrun on one node: torchrun reports any
worker failure as its own exit 1, which would erase the exit codes a scheduler acts on. So
the decision, the lease and its heartbeat stay in this process, and only the training runs
as (across nodes, where one process cannot start every rank, the ranks run the job itself:
orchestration/retrain/job.py `_across_nodes`)

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m sslstream.orchestration.retrain.torchrun <train config.yaml> <result.json>

The worker ranks call `sslstream.orchestration.train.loop.train` on the exact config retrain prepared;
rank 0 writes the outcome as JSON into a private temporary folder. The child dies with us
(PR_SET_PDEATHSIG), gets our SIGINT / SIGTERM / SIGUSR1 forwarded (the trainer checkpoints and
stops), and is stopped when the lease is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sslstream.orchestration.retrain.lease import Lease
from sslstream.orchestration.runtime.interrupt import SIGNALS as FORWARDED

# torchrun's agent passes these on to its workers (SIGUSR1, Slurm's notice before the time
# limit, is not among its defaults, and would kill the agent)
AGENT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
CONFIG_NAME = "retrain-train-config.yaml"
RESULT_NAME = "retrain-result.json"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the child when the retrain process dies (even by SIGKILL)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_torchrun(tcfg: DictConfig, lease: Lease, heartbeat_s: float, nproc: int,
                 extra_args: tuple[str, ...] = ()) -> RunOutcome:
    """Train under torchrun while holding `lease`; returns a TrainResult-like namespace.

    Raises RetrainExit with the code for a lost lease, a failed training or registration.
    """
    # a private local folder (0700) for the hand-over files: trainer.output_dir may be an
    # object store, and the config may hold storage options with credentials for the ranks
    work = Path(tempfile.mkdtemp(prefix="sslstream-retrain-"))
    try:
        return _train_in(work, tcfg, lease, heartbeat_s, nproc, extra_args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_in(work: Path, tcfg: DictConfig, lease: Lease, heartbeat_s: float, nproc: int,
              extra_args: tuple[str, ...]) -> RunOutcome:
    from sslstream.orchestration.retrain.exits import EXIT_LEASE_LOST, RetrainExit

    cfg_path, result_path = work / CONFIG_NAME, work / RESULT_NAME
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(OmegaConf.to_yaml(tcfg, resolve=True))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--signals-to-handle={AGENT_SIGNALS}", *extra_args,
           "-m", "sslstream.orchestration.retrain.torchrun", str(cfg_path), str(result_path)]
    lost: list[str] = []
    lease.start_heartbeat(lost.append, heartbeat_s)
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)

    def forward(signum: int, _frame: Any) -> None:
        _signal_group(proc, signum)

    # SIGINT too: the child runs in its own session (a Ctrl-C reaches only us) and must
    # checkpoint rather than be killed by the cleanup below
    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while proc.poll() is None:
            if lost:
                _signal_group(proc, signal.SIGTERM)
                _wait_or_kill(proc, 120)
                raise RetrainExit(EXIT_LEASE_LOST, f"{lost[0]}; training stopped; rerun to "
                                  "resume")
            time.sleep(0.5)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
    outcome = json.loads(result_path.read_text()) if result_path.is_file() else {}
    return outcome_of(proc.returncode, outcome)


@dataclass(frozen=True)
class RunOutcome:
    """Rank 0's outcome of a torchrun training (what retrain reads: job.TrainOutcome)."""

    status: str  # "completed" | "preempted"
    run_id: str | None = None
    stopped_by: str | None = None
    registered_uri: str | None = None
    promoted: bool | None = None


def outcome_of(returncode: int | None, outcome: dict[str, Any]) -> RunOutcome:
    """The outcome for torchrun's exit status and rank 0's result file.

    A preempted run counts as preempted whatever torchrun's status: on SIGTERM the agent
    itself exits non-zero (SignalException) after the ranks checkpointed and stopped.
    """
    from sslstream.orchestration.retrain.exits import (
        EXIT_CONFIG,
        EXIT_REGISTRY,
        EXIT_TRAIN_FAILED,
        RetrainExit,
    )

    if outcome.get("status") == "preempted":
        return RunOutcome(**outcome)
    if outcome.get("error") == "config":
        raise RetrainExit(EXIT_CONFIG, f"config error: {outcome.get('message')}")
    if outcome.get("error") == "registration":
        raise RetrainExit(EXIT_REGISTRY, f"training finished but registration failed: "
                          f"{outcome.get('message')}; rerun to retry")
    if returncode != 0 or not outcome or "error" in outcome:
        why = outcome.get("message") or f"torchrun exited with {returncode}"
        raise RetrainExit(EXIT_TRAIN_FAILED, f"training failed: {why}")
    return RunOutcome(**outcome)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)


def worker(cfg_path: str, result_path: str) -> int:
    """One torchrun rank: train on the prepared config; rank 0 writes the outcome."""
    from sslstream.orchestration.errors import ConfigError, RegistrationError
    from sslstream.orchestration.runtime import distributed as D
    from sslstream.orchestration.runtime.interrupt import Interrupted
    from sslstream.orchestration.train.loop import train

    cfg = OmegaConf.load(cfg_path)
    rank0 = os.environ.get("RANK", "0") == "0"
    outcome: dict[str, Any]
    code = 0
    try:
        res = train(cfg)  # type: ignore[arg-type]
        outcome = {"status": res.status, "run_id": res.run_id, "stopped_by": res.stopped_by,
                   "registered_uri": res.registered_uri, "promoted": res.promoted}
    except Interrupted as e:  # evaluating / registering: the state was kept, run KILLED
        outcome, code = {"status": "preempted", "stopped_by": e.signal_name}, e.exit_code
    except RegistrationError as e:
        outcome, code = {"error": "registration", "message": str(e)}, 6
    except ConfigError as e:
        outcome, code = {"error": "config", "message": str(e)}, 2
    except Exception as e:
        outcome, code = {"error": "train", "message": f"{type(e).__name__}: {e}"}, 5
    if rank0:
        tmp = Path(result_path).with_suffix(".tmp")
        tmp.write_text(json.dumps(outcome), encoding="utf-8")
        os.replace(tmp, result_path)
    D.cleanup()
    return code


if __name__ == "__main__":  # pragma: no cover - launched by torchrun
    sys.exit(worker(sys.argv[1], sys.argv[2]))
