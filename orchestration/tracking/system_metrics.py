"""MLflow's system-metrics monitor (system/* metrics: CPU, memory, GPU) for one run.

Why a wrapper: MLflow's monitor thread ends for good on its first failed call, so after an
outage the Tracker must start a new one that continues the step count (``resume=True``);
and without psutil the monitor cannot run at all, which the run should say (a tag) rather
than fail on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sslstream.tracking")

__all__ = ["SystemMetrics"]


class SystemMetrics:
    """Starts, restarts and stops MLflow's ``SystemMetricsMonitor`` for one run."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.monitor: Any = None  # mlflow's SystemMetricsMonitor while one runs

    def start(self, run_id: str, tracking_uri: str, *, resume: bool,
              note: Callable[[str], None]) -> None:
        """(Re)start the monitor for ``run_id``; ``note`` records why it cannot run."""
        self.stop()
        try:
            import psutil  # noqa: F401  (mlflow's CPU monitor needs it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:
            why = "off: psutil is not installed (pip install psutil to enable)"
            log.info("system metrics %s", why)
            note(why)
            return
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=self.interval_s,
                                            resume_logging=resume, tracking_uri=tracking_uri)
        self.monitor.start()

    def stop(self) -> None:
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            try:
                monitor.finish()
            except Exception as e:  # the monitor's last flush may hit a dead server
                log.debug("system metrics monitor did not stop cleanly: %s", e)
