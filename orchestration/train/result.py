"""What a training run returns: its status, where it stopped, its evaluation and its
registry outcome. The loop builds it, the run log fills in the registry outcome, and the CLI
and retrain read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslstream.orchestration.evaluate.run import EvalResult


@dataclass
class TrainResult:
    status: str  # "completed" | "preempted" (stopped by a signal after a checkpoint)
    step: int
    total_steps: int
    epoch: int
    run_dir: Path
    run_id: str | None = None
    eval: EvalResult | None = None
    model_uri: str | None = None
    registered_uri: str | None = None
    promoted: bool | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    promotion_reason: str | None = None
    method: Any = field(default=None, repr=False)  # the trained Method (unwrapped)
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" when preempted
    tracking_uri: str | None = None  # the MLflow store of run_id (credentials masked)
