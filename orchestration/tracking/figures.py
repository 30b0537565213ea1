"""Figures as run artifacts: loss and kNN curves from the run's history, a PCA of embeddings.

A mixin of :class:`~sslstream.orchestration.tracking.tracker.Tracker` that turns the run's
metric history and the final embeddings into image artifacts. It only uses the Tracker's
guarded calls, so a plot can never stop training when MLflow is down. The drawing itself is
in ``plots.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = ["FigureLogging"]


class FigureLogging:
    """``log_figure``, ``log_training_plots``, ``log_embedding_projection`` for a Tracker."""

    # provided by the Tracker
    settings: Any
    run_id: str | None
    _client: Any

    def _ready(self) -> bool:  # pragma: no cover - the Tracker's
        raise NotImplementedError

    def _guarded(self, what: str, fn: Callable[[], T]) -> T | None:  # pragma: no cover
        raise NotImplementedError

    def flush(self, timeout_s: float | None = None) -> bool:  # pragma: no cover
        raise NotImplementedError

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact."""
        if self._ready():
            self._guarded("log_figure", lambda: self._client.log_figure(
                self.run_id, figure, artifact_file))

    def log_training_plots(self, loss_key: str = "train/loss",
                           knn_key: str | None = None) -> None:
        """Loss and kNN-accuracy curves, drawn from the run's metric history on the server
        (so a resumed run's curves include the steps logged before the restart)."""
        self.flush()  # the curves are read back from the server
        if not (self.settings.plots and self._ready()):
            return
        from sslstream.orchestration.tracking.plots import is_curve, plot_curves

        knn_key = knn_key or self.settings.registry.metric
        for key, file, ylabel in ((loss_key, "plots/loss.png", "loss"),
                                  (knn_key, "plots/knn_accuracy.png", "kNN accuracy")):
            hist = self._guarded("metric_history",
                                 lambda k=key: self._client.get_metric_history(self.run_id, k))
            if not hist or not is_curve([m.step for m in hist]):
                continue
            hist = sorted(hist, key=lambda m: (m.step, m.timestamp))
            self.log_figure(plot_curves({key: ([m.step for m in hist], [m.value for m in hist])},
                                        title=key, ylabel=ylabel), file)

    def log_embedding_projection(self, embeddings: torch.Tensor, labels: torch.Tensor,
                                 step: int | None = None, max_points: int = 5000,
                                 class_names: list[str] | None = None) -> None:
        """2-D PCA of (test) embeddings coloured by label (named by `class_names`).

        Written to ``plots/embeddings_pca_<step>.png`` (``plots/embeddings_pca.png`` without a step).
        """
        if not (self.settings.plots and self._ready()):
            return
        from sslstream.orchestration.tracking.plots import pca_2d, plot_projection

        z, y = embeddings[:max_points], labels[:max_points]
        suffix = "" if step is None else f"_{int(step):08d}"
        title = "embeddings, PCA" + ("" if step is None else f" (step {step})")
        self.log_figure(plot_projection(pca_2d(z), y, title=title, class_names=class_names),
                        f"plots/embeddings_pca{suffix}.png")
