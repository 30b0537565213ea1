"""The Tracker's interface as no-ops, without importing MLflow.

Ranks other than 0, and every rank when ``tracking.enabled=false``, log nothing; giving them
this object instead of an inactive ``sslstream.orchestration.tracking.tracker.Tracker`` keeps MLflow (a ~2 s
import pulling SQLAlchemy, Flask and OpenTelemetry) out of those processes altogether: each
DDP worker starts faster, and an untracked run needs no MLflow installed (GPU boxes that only
train, benchmark machines). ``tests/orchestration/test_tracking_null.py`` holds it to the
Tracker's public methods, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from sslstream.orchestration.errors import RegistrationError

__all__ = ["NullTracker"]


class NullTracker:
    """Accepts every Tracker call and does nothing; model logging raises like an inactive
    Tracker does, since an encoder that was not registered must not look like success."""

    active = False
    resumed = False
    enabled = False
    run_id: str | None = None
    shown_uri = "(tracking disabled)"

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def start(self, run_name: str, resolved_config: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    dropped_metrics = 0

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        return None

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        return None

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        return None

    def log_config(self, yaml_text: str, name: str = "config.yaml") -> None:
        return None

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        return None

    def log_training_plots(self, loss_key: str = "train/loss",
                           knn_key: str | None = None) -> None:
        return None

    def log_embedding_projection(self, embeddings: Any, labels: Any, step: int | None = None,
                                 max_points: int = 5000, class_names: Any = None) -> None:
        return None

    def log_encoder(self, backbone: Any, spec: Any, name: str = "encoder") -> NoReturn:
        self._refuse("log the encoder")

    def register_encoder(self, model_uri: str, metrics: Mapping[str, float], *,
                         feature_dim: int, tags: Mapping[str, Any] | None = None,
                         evaluated: bool = True) -> NoReturn:
        self._refuse("register the encoder")

    @staticmethod
    def _refuse(what: str) -> NoReturn:
        raise RegistrationError(f"cannot {what}: tracking is disabled (tracking.enabled is "
                                "false or this is not rank 0)")
