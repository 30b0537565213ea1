"""torchrun, exiting with its workers' exit code: what a scheduler acts on.

    python -m sslstream.orchestration.runtime.launch [torchrun options] -m sslstream train ...

torchrun (`torch.distributed.run`) turns every worker failure into its own exit 1, and a
signal it handled into a traceback and exit 1. But a batch system decides by the code:
Slurm requeues a job that stopped on its time-limit notice (`sslstream train` exits 138
after SIGUSR1, docs/cluster.md), a Kubernetes podFailurePolicy fails a job at once on a
configuration error (exit 2) and retries a preempted one. This module runs the same agent
with the same options (`torch.distributed.run.parse_args` / `run`) and exits with:

* 0 when every worker did;
* the code of the first worker that failed (torch's root cause: the earliest failure),
  128 + n for a worker killed by signal n;
* 128 + n when the agent itself received signal n: it passed n on to the workers, which
  checkpoint and exit 128 + n themselves (orchestration/runtime/interrupt.py).

SIGUSR1 is added to the signals the agent passes on unless `--signals-to-handle` is given:
torchrun's default set lacks it, and an agent that does not handle SIGUSR1 dies of it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["HANDLED_SIGNALS", "exit_code", "main", "with_signals"]

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def with_signals(argv: Sequence[str]) -> list[str]:
    """`argv` with `--signals-to-handle=HANDLED_SIGNALS` before the entry point, unless the
    caller chose (torchrun accepts `--signals-to-handle` and `--signals_to_handle`)."""
    args = list(argv)
    if any(a.split("=", 1)[0] in ("--signals-to-handle", "--signals_to_handle") for a in args):
        return args
    return [f"--signals-to-handle={HANDLED_SIGNALS}", *args]


def exit_code(returncode: int) -> int:
    """A worker's return code as a process exit status (killed by signal n: 128 + n)."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(with_signals(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except SignalException as e:
        print(f"sslstream launch: stopped by {e.sigval.name}; the workers were asked to "
              "checkpoint and stop", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = exit_code(int(failure.exitcode))
        print(f"sslstream launch: rank {rank} exited with {code} (first failure of "
              f"{len(e.failures)})", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
