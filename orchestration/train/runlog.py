"""The trainer's side of MLflow: one Tracker on rank 0, a NullTracker (no MLflow import)
elsewhere and when tracking is off, and the final
log -> register -> promote sequence.

The loop (orchestration/train/loop.py) calls it to open or resume the run, log metrics, and
finish. The Tracker (orchestration/tracking/tracker.py) degrades when the server is
unreachable (metrics are dropped with one warning); only `finish` may raise, with
`RegistrationError`, because an encoder that was not registered must not look like success.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from sslstream.orchestration.runtime.distributed import DistEnv
from sslstream.orchestration.runtime.runstore import RunStore
from sslstream.orchestration.tracking.null import NullTracker
from torch import nn

if TYPE_CHECKING:
    from sslstream.orchestration.train.result import TrainResult

log = logging.getLogger("sslstream.train")
REGISTERED_MARKER = "registered.json"  # also read by orchestration.train.loop


class RunLog:
    """MLflow run of one training job (continued across resumes via the checkpoint's run id)."""

    def __init__(self, cfg: DictConfig, env: DistEnv, run_id: str | None = None,
                 store: RunStore | None = None) -> None:
        self.cfg = cfg
        self.env = env
        self.store = store  # the run folder, where the registered marker goes
        self.tracker: Any
        if env.is_main and cfg.tracking.enabled:
            from sslstream.orchestration.tracking.tracker import Tracker

            self.tracker = Tracker.from_config(cfg.tracking, active=True)
        else:  # no MLflow import at all on ranks > 0 or when tracking is off
            self.tracker = NullTracker()
        resolved = OmegaConf.to_container(cfg, resolve=True)
        tags = {
            "method": cfg.method.name,
            "backbone": cfg.backbone.name,
            "data": cfg.data.name,
            "world_size": env.world_size,
            "sslstream.run_name": cfg.run_name,
        }
        if cfg.tracking.parent_run_id:  # a sweep's child (orchestration/train/sweep.py)
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        self.run_id = self.tracker.start(str(cfg.run_name), resolved, tags=tags, run_id=run_id) or run_id
        if env.is_main and not self.tracker.resumed:
            self.tracker.log_config(OmegaConf.to_yaml(cfg, resolve=True))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued, never waits on MLflow (orchestration/tracking/sender.py)."""
        dropped = self.tracker.dropped_metrics
        if dropped:
            metrics = {**metrics, "perf/metrics_dropped": float(dropped)}
        self.tracker.log_metrics(metrics, step=step)

    def fail(self, reason: str) -> None:
        self.tracker.set_tags({"sslstream.failure": reason})
        self.tracker.end("FAILED")

    def pause(self, reason: str = "") -> None:
        """Stopped by a signal: KILLED (not FAILED), so the resumed job continues the run."""
        if reason:
            self.tracker.set_tags({"sslstream.stopped": reason})
        self.tracker.end("KILLED")

    def _class_names(self) -> list[str] | None:
        """The test split's class names from its manifest (best effort: None when absent)."""
        if not self.tracker.active or not self.cfg.tracking.plots:
            return None
        try:
            from sslstream.pipelines.shards.manifest import resolve_shards

            data = self.cfg.data
            return resolve_shards(data.test, dict(data.storage_options))[1]
        except Exception as e:  # a plot legend is not worth failing a run for
            log.debug("no class names for the PCA legend: %s", e)
            return None

    def finish(self, method: nn.Module, result: TrainResult, eval_features: Any = None) -> None:
        """Rank 0: log the encoder, register it (alias challenger), promote by the rule.

        Fills result.model_uri / registered_uri / promoted. Raises RegistrationError (from
        the tracking module) when logging or registration fails; the caller's final
        checkpoint stays on disk.
        """
        if not self.env.is_main:
            return
        if self.tracker.active:
            result.tracking_uri = self.tracker.shown_uri
        self.tracker.log_training_plots()
        if eval_features is not None:
            z, y = eval_features
            self.tracker.log_embedding_projection(z.cpu(), y.cpu(), step=result.step,
                                                  class_names=self._class_names())
        if not self.tracker.active:
            log.warning("tracking.enabled=false: the encoder is not logged or registered")
            return
        evaluated = result.eval is not None
        if not evaluated and not self.tracker.settings.registry.register_unevaluated:
            log.warning("eval.at_end=false and tracking.registry.register_unevaluated=false: "
                        "the encoder is not registered")
            self.tracker.end("FINISHED")
            return
        if not evaluated:
            log.warning("eval.at_end=false: the encoder is registered as a challenger tagged "
                        "evaluated=false and is never promoted (promotion needs kNN on a "
                        "labelled split)")
        from sslstream.orchestration.tracking.encoder_model import EncoderSpec
        from sslstream.orchestration.train.evalid import eval_identity
        from sslstream.pipelines.views.recipes import TwoViewRecipe

        recipe = TwoViewRecipe.from_config(self.cfg.augment)
        backbone_cfg = OmegaConf.to_container(self.cfg.backbone, resolve=True)
        spec = EncoderSpec(
            backbone=dict(backbone_cfg),  # type: ignore[arg-type]
            feature_dim=int(method.feature_dim),
            image_size=int(recipe.size),
            mean=tuple(float(v) for v in recipe.view1.mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in recipe.view1.std),  # type: ignore[arg-type]
        )
        try:
            result.model_uri = self.tracker.log_encoder(method.backbone, spec)
            decision = self.tracker.register_encoder(
                result.model_uri,
                result.metrics,
                feature_dim=int(method.feature_dim),
                tags={
                    "method": self.cfg.method.name,
                    "backbone": self.cfg.backbone.name,
                    "data": self.cfg.data.name,
                    "run_name": self.cfg.run_name,
                    "steps": result.step,
                    # promotion compares like with like only
                    **(eval_identity(self.cfg) if evaluated else {}),
                },
                evaluated=evaluated,
            )
        except Exception:
            self.tracker.end("FAILED")
            raise
        result.registered_uri = decision.uri
        result.promoted = decision.promoted
        result.promotion_reason = decision.reason
        self.tracker.set_tags({"sslstream.registered": decision.uri, "sslstream.promoted": decision.promoted})
        self.tracker.end("FINISHED")
        # a rerun of the same command sees this next to the final checkpoint and does nothing
        marker = {"registered_uri": decision.uri, "promoted": decision.promoted,
                  "reason": decision.reason, "run_id": self.run_id, "step": result.step,
                  "model_uri": result.model_uri, "tracking_uri": result.tracking_uri}
        if self.store is not None:
            try:
                self.store.write_bytes(REGISTERED_MARKER, json.dumps(marker, indent=1).encode())
            except OSError as e:  # registered all the same: a rerun would only register again
                log.warning("could not write %s to %s (%s): rerunning this command would "
                            "register the encoder again", REGISTERED_MARKER, self.store.url, e)
