"""Training monitors: what a run reports every `trainer.log_every_steps` steps.

loss (mean over the window), lr, tau (momentum methods), embedding std and effective rank
of the batch's embeddings (collapse shows here first: std -> 0, rank -> 1), images/s over
all ranks, the fraction of wall time spent waiting for data, and the loader's skip
counters. The same numbers go to MLflow (through a callback) and to the console: a tqdm
bar on a terminal, plain log lines otherwise (CI logs, torchrun, nohup).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("sslstream.train")


def use_bar(progress: str, is_main: bool) -> bool:
    p = str(progress).lower()
    if not is_main or p == "log":
        return False
    if p == "bar":
        return True
    if p != "auto":
        raise ValueError(f"trainer.progress must be auto, bar or log, got {progress!r}")
    return sys.stderr.isatty()


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
    ) -> None:
        self.every = max(1, int(every))
        self.total = total_steps
        self.global_batch = global_batch
        self.is_main = is_main
        self.sink = sink
        self._loss_sum = 0.0
        self._n = 0
        self._t0 = time.perf_counter()
        self._wait0 = 0.0
        self._bar = None
        if use_bar(progress, is_main):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def reset_clock(self, data_wait_s: float) -> None:
        self._t0 = time.perf_counter()
        self._wait0 = data_wait_s

    def update(
        self,
        step: int,
        epoch: int,
        loss: torch.Tensor,
        metrics: dict[str, Any],
        lr: float,
        data_wait_s: float,
        counters: dict[str, int],
    ) -> dict[str, float] | None:
        """Record one finished step (`step` = steps done so far); a dict on report steps."""
        self._loss_sum += float(loss)
        self._n += 1
        if self._bar is not None:
            self._bar.update(1)
        if step % self.every and step != self.total:
            return None
        now = time.perf_counter()
        dt = max(now - self._t0, 1e-9)
        out: dict[str, float] = {
            "train/loss": self._loss_sum / self._n,
            "train/lr": lr,
            "train/epoch": float(epoch),
            "perf/img_per_s": self._n * self.global_batch / dt,
            "perf/data_wait_frac": min(1.0, max(0.0, (data_wait_s - self._wait0) / dt)),
        }
        out.update(scalar_metrics(metrics))
        emb = metrics.get("embeddings")
        if isinstance(emb, torch.Tensor) and emb.ndim == 2 and emb.shape[0] > 1:
            from models.collapse import effective_rank, embedding_std

            z = emb.detach().float()
            out["train/embedding_std"] = float(embedding_std(z))
            out["train/effective_rank"] = float(effective_rank(z))
        for k, v in counters.items():
            if isinstance(v, int | float):
                out[f"data/{k}"] = float(v)
        self._loss_sum, self._n = 0.0, 0
        self._t0, self._wait0 = now, data_wait_s
        if self.is_main:
            self.emit(out, step)
        return out

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
    return " | ".join(parts)


def _short(out: dict[str, float]) -> str:
    return f"loss={_fmt(out['train/loss'])} img/s={out['perf/img_per_s']:.0f}"
