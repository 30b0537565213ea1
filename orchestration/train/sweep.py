"""`sslstream train -m`: a sweep, each combination its own run under one parent MLflow run.

    sslstream train -m method=byol,simclr optim.lr=0.5,1.0

runs four trainings in turn, as Hydra's multirun would: the combinations in Hydra's order
(orchestration/schema/overrides.py: `expand_sweep`), every one composed and checked before
the first starts (a typo in the last one fails the sweep at once, exit 2). Each child is a
whole `sslstream train`: its own run_name (the default one plus the swept values, so a rerun
of the sweep resumes each child from its checkpoints), its own MLflow run, tagged with the
parent run (`mlflow.parentRunId`: the MLflow UI nests them) that stands for the sweep. A
child that fails is reported and the others still run; the exit code is 0 only when every
child succeeded (else 1). A signal stops the sweep after the running child kept its state.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, open_dict
from sslstream.orchestration.runtime.interrupt import Interrupted
from sslstream.orchestration.schema import swept_keys

log = logging.getLogger("sslstream.train")

__all__ = ["child_run_name", "run_sweep"]

EXIT_FAILED = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


def child_run_name(base: str, swept: set[str], child: Sequence[str]) -> str:
    """``base`` + the values this child takes for the ``swept`` keys:
    ``byol-synthetic-optim.lr=0.5``."""
    parts = [o.lstrip("+~") for o in child if o.partition("=")[0].lstrip("+~") in swept]
    return "-".join([base, *(_UNSAFE.sub("_", p) for p in parts)]) if parts else base


def run_sweep(sweep: Sequence[str], children: Sequence[Sequence[str]],
              configs: Sequence[DictConfig], train: Callable[[DictConfig], int]) -> int:
    """Run each child config with `train` (returns an exit code), under one parent run."""
    parent = _ParentRun(configs[0], sweep, len(children))
    swept = swept_keys(sweep)
    failed: list[str] = []
    try:
        for i, (child, cfg) in enumerate(zip(children, configs, strict=True), 1):
            what = " ".join(child)
            with open_dict(cfg):
                if not any(o.lstrip("+").startswith("run_name=") for o in child):
                    cfg.run_name = child_run_name(str(cfg.run_name), swept, child)
                cfg.tracking.parent_run_id = parent.run_id
            print(f"sweep {i}/{len(children)}: {what} (run_name={cfg.run_name})", flush=True)
            try:
                rc = train(cfg)
            except (Interrupted, KeyboardInterrupt):
                parent.end("KILLED")
                raise
            except Exception as e:  # reported; the other children still run
                log.exception("sweep child %s failed", what)
                rc, why = EXIT_FAILED, f"{type(e).__name__}: {e}"
            else:
                why = f"exit {rc}"
            if rc != 0:
                failed.append(f"{what} ({why})")
                print(f"sweep {i}/{len(children)}: FAILED: {what} ({why})", file=sys.stderr,
                      flush=True)
    finally:
        parent.end("FAILED" if failed else "FINISHED")
    done = len(children) - len(failed)
    print(f"sweep: {done}/{len(children)} runs succeeded"
          + (f"; parent MLflow run {parent.run_id}" if parent.run_id else ""), flush=True)
    if failed:
        print("sweep: failed: " + "; ".join(failed), file=sys.stderr, flush=True)
        return EXIT_FAILED
    return 0


class _ParentRun:
    """The MLflow run that stands for the sweep (none when tracking is off)."""

    def __init__(self, cfg: DictConfig, sweep: Sequence[str], n: int) -> None:
        self.run_id: str | None = None
        self._tracker = None
        self._closed = False
        if not cfg.tracking.enabled:
            return
        from sslstream.orchestration.tracking.tracker import Tracker, TrackingSettings

        settings = TrackingSettings.from_config(cfg.tracking)
        self._tracker = Tracker(dataclasses.replace(settings, system_metrics=False))
        self.run_id = self._tracker.start(f"sweep {' '.join(sweep)}"[:250],
                                          {"sweep": " ".join(sweep), "runs": n},
                                          tags={"sslstream.sweep": " ".join(sweep)})

    def end(self, status: str) -> None:
        if self._tracker is not None and not self._closed:
            self._tracker.end(status)
            self._closed = True
