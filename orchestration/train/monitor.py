"""Training monitors: what a run reports every `trainer.log_every_steps` steps.

loss (mean over the window), lr, tau (momentum methods), embedding std and effective rank
of the batch's embeddings (collapse shows here first: std -> 0, rank -> 1), images/s over
all ranks, the fraction of wall time spent waiting for data, and the loader's skip
counters. The same numbers go to MLflow (through a callback) and to the console: a tqdm
bar on a terminal, plain log lines otherwise (CI logs, torchrun, nohup).

CUDA runs asynchronously, so the Monitor never reads a device value between report steps
(the loss is summed on the device) and takes its clock readings right after the report's
own sync, which makes images/s over the window exact. Data wait is measured by
`DataWaitClock` on the device's timeline: the time the device sat between the end of the
work queued before the trainer asked for the next batch and the moment that batch was
there. Host time spent in `next(loader)` while the GPU still had queued steps to run is
not waiting (the GPU was busy), which a host-side timer would count.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from sslstream.orchestration.errors import ConfigError

log = logging.getLogger("sslstream.train")


def use_bar(progress: str, is_main: bool) -> bool:
    p = str(progress).lower()
    if not is_main or p == "log":
        return False
    if p == "bar":
        return True
    if p != "auto":
        raise ConfigError(f"trainer.progress must be auto, bar or log, got {progress!r}")
    return sys.stderr.isatty()


class DataWaitClock:
    """How long the device waited for data between steps (see the module docstring).

    Call `fetching()` just before asking the loader for a batch and `ready()` as soon as
    it is there. On CUDA both record events on the current stream: an event executes
    once the work queued before it is done, so the gap between them is device idle (or
    loader work on that stream) and is zero when the batch was there before the device
    finished the previous step. On CPU the same two calls read `time.perf_counter`.
    `collect()` sums the gaps since the last call; on CUDA call it after a sync (the
    Monitor does, at report steps).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.total_s = 0.0
        self._fetch: Any = None
        self._gaps: list[tuple[Any, Any]] = []

    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def fetching(self) -> None:
        self._fetch = self._mark()

    def ready(self) -> None:
        if self._fetch is not None:
            self._gaps.append((self._fetch, self._mark()))
            self._fetch = None

    def collect(self) -> float:
        if self.cuda:
            s = sum(a.elapsed_time(b) for a, b in self._gaps) / 1000.0
        else:
            s = sum(b - a for a, b in self._gaps)
        self._gaps.clear()
        s = max(0.0, float(s))
        self.total_s += s
        return s


class Monitor:
    """Accumulates per-step numbers and emits a metrics dict every `every` steps."""

    def __init__(
        self,
        *,
        every: int,
        total_steps: int,
        start_step: int,
        global_batch: int,
        is_main: bool,
        progress: str = "auto",
        sink: Callable[[dict[str, float], int], None] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.every = max(1, int(every))
        self.total = total_steps
        self.global_batch = global_batch
        self.is_main = is_main
        self.sink = sink
        self.device = device or torch.device("cpu")
        self.clock = DataWaitClock(self.device)
        self._loss_sum: torch.Tensor | float = 0.0
        self._n = 0
        self._t0 = time.perf_counter()
        self._excluded_s = 0.0
        self._greeted = False  # the first-step line was printed (or a report made it moot)
        self._bar = None
        if use_bar(progress, is_main):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def reset_clock(self) -> None:
        """Start the first window now (before the first batch is asked for)."""
        self._sync()
        self.clock.collect()
        self.clock.total_s = 0.0
        self._t0 = time.perf_counter()
        self._excluded_s = 0.0
        self.clock.fetching()

    def exclude(self, seconds: float) -> None:
        """Leave time spent on other work (evaluation) out of the window's rates."""
        self._excluded_s += seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def update(
        self,
        step: int,
        epoch: int,
        loss: torch.Tensor,
        metrics: dict[str, Any],
        lr: float,
        counters: Any = None,
        grad_norm: torch.Tensor | None = None,
    ) -> dict[str, float] | None:
        """Record one finished step (`step` = steps done so far); a dict on report steps.

        Between report steps nothing here reads a device value; `counters` (the loader's
        counters, or a callable returning them) is only read on report steps.
        """
        self._loss_sum = self._loss_sum + loss.detach().float()
        self._n += 1
        if self._bar is not None:
            self._bar.update(1)
        if step % self.every and step != self.total:
            if not self._greeted and self.is_main and self._bar is None:
                self._greeted = True
                # a sign of life before the first report (which may be minutes away); no
                # device value is read here
                print(f"step {step}/{self.total}: first step done in "
                      f"{time.perf_counter() - self._t0:.1f}s; reports every {self.every} "
                      "steps (trainer.log_every_steps)", flush=True)
            return None
        self._greeted = True
        loss_mean = float(self._loss_sum) / self._n  # the window's one device sync
        self._sync()  # then every queued kernel is done: the clock readings are exact
        now = time.perf_counter()
        wait = self.clock.collect()
        dt = max(now - self._t0 - self._excluded_s, 1e-9)
        out: dict[str, float] = {
            "train/loss": loss_mean,
            "train/lr": lr,
            "train/epoch": float(epoch),
            "perf/img_per_s": self._n * self.global_batch / dt,
            "perf/data_wait_frac": min(1.0, max(0.0, wait / dt)),
        }
        if grad_norm is not None:
            out["train/grad_norm"] = float(grad_norm)
        out.update(scalar_metrics(metrics))
        emb = metrics.get("embeddings")
        if isinstance(emb, torch.Tensor) and emb.ndim == 2 and emb.shape[0] > 1:
            from sslstream.models.collapse import effective_rank, embedding_std

            z = emb.detach().float()
            out["train/embedding_std"] = float(embedding_std(z))
            out["train/effective_rank"] = float(effective_rank(z))
        if callable(counters):
            counters = counters()
        for k, v in dict(counters or {}).items():
            if isinstance(v, int | float):
                out[f"data/{k}"] = float(v)
        self._loss_sum, self._n = 0.0, 0
        self._t0, self._excluded_s = now, 0.0  # reporting time counts in the next window
        if self.is_main:
            self.emit(out, step)
        return out

    def finish(self) -> float:
        """Sync and return the run's total data-wait seconds (every window, closed or not)."""
        try:
            self._sync()
            self.clock.collect()
        except Exception as e:  # called while a failure unwinds: never mask the real error
            log.warning("data-wait clock not read: %s", e)
        return self.clock.total_s

    def emit(self, out: dict[str, float], step: int) -> None:
        text = format_line(step, self.total, out)
        if self._bar is not None:
            self._bar.set_postfix_str(_short(out), refresh=False)
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)
        if self.sink is not None:
            self.sink(out, step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Every scalar the method reported (tau, loss parts), as train/<name>."""
    out = {}
    for k, v in metrics.items():
        if k == "embeddings":
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[f"train/{k}"] = float(v.detach().float())
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"train/{k}"] = float(v)
    return out


def _fmt(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}"


def format_line(step: int, total: int, out: dict[str, float]) -> str:
    keys = [
        "train/loss",
        "train/lr",
        "train/tau",
        "train/embedding_std",
        "train/effective_rank",
        "perf/img_per_s",
        "perf/data_wait_frac",
    ]
    parts = [f"step {step}/{total}", f"epoch {int(out.get('train/epoch', 0))}"]
    for k in keys:
        if k in out:
            parts.append(f"{k.split('/', 1)[1]} {_fmt(out[k])}")
    skipped = {k[5:]: int(v) for k, v in out.items() if k.startswith("data/") and "skip" in k and v}
    if skipped:
        parts.append("skipped " + ",".join(f"{k}={v}" for k, v in skipped.items()))
    if out.get("data/cache_corrupt"):  # cache files found damaged, dropped and fetched again
        parts.append(f"cache_corrupt={int(out['data/cache_corrupt'])}")
    return " | ".join(parts)


def _short(out: dict[str, float]) -> str:
    return f"loss={_fmt(out['train/loss'])} img/s={out['perf/img_per_s']:.0f}"
