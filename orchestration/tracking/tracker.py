"""MLflow tracking for one training run, which never stops training when MLflow is down.

API (rank 0 creates a real Tracker; other ranks pass ``active=False`` and get no-ops)::

    tracker = Tracker.from_config(cfg.tracking)            # TrackingSettings or a mapping
    run_id = tracker.start(run_name, resolved_cfg_dict, tags={"method": "byol"},
                           run_id=run_id_from_checkpoint)   # None: new run; else continue it
    tracker.log_config(OmegaConf.to_yaml(cfg))              # artifact config/config.yaml
    tracker.log_metrics({"train/loss": 0.9}, step=100)      # every N steps
    tracker.log_artifact(path)  /  tracker.log_artifacts(folder, "checkpoints")
    tracker.log_training_plots()                            # plots/loss.png, plots/knn.png
    tracker.log_embedding_projection(z_test, y_test, step)  # plots/embeddings_pca.png
    model_uri = tracker.log_encoder(backbone, spec)         # pyfunc, models:/m-<id>
    decision = tracker.register_encoder(model_uri, eval_metrics, tags={...})
    tracker.end("FINISHED")                                 # or "FAILED" / "KILLED"

Where: ``$MLFLOW_TRACKING_URI`` wins, then ``tracking.uri``, then ``sqlite:///<cwd>/mlflow.db``
with artifacts in ``<cwd>/mlruns/<experiment>``. Params are the flattened resolved config
(``optim.lr``, ...), values cut to ``max_param_length`` characters.

Metrics never wait on MLflow: ``log_metrics`` puts them on a bounded queue that one
background thread sends (orchestration/tracking/sender.py); a full queue drops and counts
(``dropped_metrics``). ``flush()`` waits for the queue (bounded); ``end`` and the plots do.

When the server is unreachable (at start or later), the Tracker logs ONE warning
("MLflow at <uri> unreachable: ... training continues without tracking"), drops every
call until the next reconnect attempt (``reconnect_after_s``; nothing is buffered), and
resumes logging to the same run once a probe succeeds. ``log_encoder`` and
``register_encoder`` are the exception: they raise ``RegistrationError`` instead, so the
caller knows the encoder was not registered and keeps its checkpoint.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sslstream.orchestration.errors import RegistrationError
from sslstream.orchestration.tracking import mlflow_env
from sslstream.orchestration.tracking.encoder_model import EncoderSpec
from sslstream.orchestration.tracking.figures import FigureLogging
from sslstream.orchestration.tracking.registry import (
    PromotionDecision,
    log_encoder,
    register_encoder,
)
from sslstream.orchestration.tracking.sender import BackgroundSender
from sslstream.orchestration.tracking.settings import (
    KEY_BAD,
    MAX_KEY,
    TrackingSettings,
    flatten_params,
    mask_yaml,
)
from sslstream.orchestration.tracking.system_metrics import SystemMetrics
from sslstream.pipelines.shards.masking import mask, mask_exception

__all__ = ["Tracker", "TrackingSettings", "flatten_params", "RegistrationError"]

log = logging.getLogger("sslstream.tracking")
T = TypeVar("T")
_BATCH = 100                        # MLflow's limit of params/tags per log_batch call


class Tracker(FigureLogging):
    """One MLflow run; every method is safe to call when tracking is off or unreachable."""

    def __init__(self, settings: TrackingSettings | Mapping[str, Any] | None = None, *,
                 active: bool = True) -> None:
        self.settings = TrackingSettings.from_config(settings)
        self.active = active and self.settings.enabled
        self.uri = mlflow_env.resolve_tracking_uri(self.settings.uri)
        self.run_id: str | None = None
        self.resumed = False
        self._client: MlflowClient | None = None
        self._start_args: tuple[str, dict[str, Any], dict[str, str], str | None] | None = None
        self._down_reason: str | None = None     # set while unreachable
        self._retry_at = 0.0
        self._call_warnings: set[str] = set()
        self._params_logged = False
        self._data: dict[str, str] = {}  # data_manifest_hash / data_shards version tags
        # one MLflow conversation at a time: the metrics thread and the caller's calls
        self._io = threading.RLock()
        self._sender = BackgroundSender(self._send_metrics, self.settings.metrics_queue)
        self._system = SystemMetrics(self.settings.system_metrics_interval_s)
        if self.active and mlflow_env.is_http(self.uri):
            s = self.settings
            mlflow_env.apply_http_limits(s.http.max_retries, s.http.timeout_s,
                                         s.http.backoff_factor)

    @classmethod
    def from_config(cls, cfg: Any, *, active: bool = True) -> Tracker:
        return cls(TrackingSettings.from_config(cfg), active=active)

    # -- state ------------------------------------------------------------------------------
    @property
    def shown_uri(self) -> str:
        """The tracking URI for messages: credentials masked as `***@` (they were moved to
        MLflow's auth variables; the mark tells a reader that the store needs them)."""
        return mlflow_env.shown_uri(self.uri)

    @property
    def enabled(self) -> bool:
        """True while a run is open and the server answered the last call."""
        return self.active and self.run_id is not None and self._down_reason is None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    # -- run lifecycle ----------------------------------------------------------------------
    def start(self, run_name: str, resolved_config: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str | None:
        """Open (or, with ``run_id``, continue) the run; returns its id, None if untracked."""
        if not self.active:
            return None
        data = (resolved_config or {}).get("data")
        # listed now, when the stream has just resolved its shards (a prefix may grow later)
        self._data = self._data_tags(data if isinstance(data, Mapping) else {})
        self._start_args = (run_name, dict(mask(dict(resolved_config or {}))),
                            {str(k): mask(str(v)) for k, v in (tags or {}).items()}, run_id)
        if (why := mlflow_env.probe(self.uri, self.settings.probe_timeout_s)) is not None:
            self._go_down(why)
            return None
        self._guarded("start", self._open_run)
        return self.run_id

    def _open_run(self) -> None:
        assert self._start_args is not None
        run_name, config, tags, run_id = self._start_args
        client = MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment_id(client)
        run = None
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s not found at %s; starting a new run", run_id, self.shown_uri)
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            self.resumed = True
        else:
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        self._client, self.run_id = client, run.info.run_id
        self._params_logged = False
        self._log_params(config, existing=run.data.params if self.resumed else {})
        self._params_logged = True
        if self.resumed and tags:
            self._batch(tags=[RunTag(k, v) for k, v in tags.items()])
        self._start_system_metrics(resume=self.resumed)
        log.info("MLflow run %s (%s) at %s%s", self.run_id, run_name, self.shown_uri,
                 " resumed" if self.resumed else "")

    def _experiment_id(self, client: MlflowClient) -> str:
        name = self.settings.experiment
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = self.settings.artifact_location or mlflow_env.local_artifact_location(
            self.uri, name)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # created meanwhile by another process
            if (exp := client.get_experiment_by_name(name)) is None:
                raise
            log.debug("experiment %s appeared concurrently: %s", name, e)
            return exp.experiment_id

    def _log_params(self, config: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        params = flatten_params(config, self.settings.max_param_length)
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:  # MLflow params are immutable: keep the first value, say so
            log.info("resumed run keeps its original params for changed keys: %s",
                     ", ".join(changed[:20]))
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), _BATCH):
            self._batch(params=todo[i : i + _BATCH])

    def _resend_params(self) -> None:
        assert self._client is not None and self._start_args is not None
        existing = self._client.get_run(self.run_id).data.params
        self._log_params(self._start_args[1], existing=existing)
        self._params_logged = True

    def _start_system_metrics(self, resume: bool) -> None:
        """MLflow's monitor thread (system/* metrics); ``resume`` continues its step count.

        The monitor thread ends for good on its first failed call (an outage), so the
        Tracker restarts it when the server is back (see ``_ready``).
        """
        if self.settings.system_metrics and self.run_id is not None:
            self._system.start(self.run_id, self.uri, resume=resume, note=lambda why: self._batch(
                tags=[RunTag("sslstream.system_metrics", why)]))

    @property
    def dropped_metrics(self) -> int:
        """Metric batches dropped because the background queue was full (or not sent at end)."""
        return self._sender.dropped

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait (bounded by ``metrics_flush_s``) until the queued metrics were sent."""
        t = self.settings.metrics_flush_s if timeout_s is None else timeout_s
        return self._sender.flush(t)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (FINISHED, FAILED or KILLED); a KILLED run can be resumed later."""
        self._sender.close(self.settings.metrics_flush_s)
        self._system.stop()
        if self._ready():
            self._guarded("end", lambda: self._client.set_terminated(self.run_id, status))
        self._start_args = None  # no reconnect after the end

    # -- logging ----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._ready():
            clean = mask(dict(params))
            self._guarded("log_params", lambda: self._log_params(clean, existing={}))

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Queue scalar metrics at ``step`` for one request (non-finite values are kept);
        returns at once: a background thread sends them (see the module docstring)."""
        if not self.active or self._start_args is None:
            return
        now = int(time.time() * 1000)
        batch = [Metric(KEY_BAD.sub("_", str(k))[:MAX_KEY], _scalar(v), now, int(step))
                 for k, v in metrics.items()]
        if self.settings.metrics_queue <= 0:  # synchronous (tracking.metrics_queue=0)
            self._send_metrics(batch)
        else:
            self._sender.put(batch)

    def _send_metrics(self, batch: list[Metric]) -> None:
        with self._io:
            if self._ready():
                self._guarded("log_metrics", lambda: self._batch(metrics=batch))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self._ready():
            batch = [RunTag(str(k), mask(str(v))) for k, v in tags.items()]
            self._guarded("set_tags", lambda: self._batch(tags=batch))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self._ready():
            self._guarded("log_artifact", lambda: self._client.log_artifact(
                self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: str, artifact_path: str | None = None) -> None:
        if self._ready():
            self._guarded("log_artifacts", lambda: self._client.log_artifacts(
                self.run_id, str(folder), artifact_path))

    def log_config(self, yaml_text: str, name: str = "config.yaml") -> None:
        """The resolved config as an artifact ``config/<name>`` (what reproduces the run),
        with credentials masked (pipelines/shards/masking.py)."""
        yaml_text = mask_yaml(yaml_text)
        if self._ready():
            self._guarded("log_config", lambda: self._client.log_text(
                self.run_id, yaml_text, f"config/{name}"))

    # -- model ------------------------------------------------------------------------------
    def log_encoder(self, backbone: torch.nn.Module, spec: EncoderSpec,
                    name: str = "encoder") -> str:
        """Log the backbone as a pyfunc (see registry.log_encoder); returns ``models:/m-<id>``."""
        self._require("log the encoder")
        return log_encoder(self.uri, self.run_id, backbone, spec, name=name)

    def register_encoder(self, model_uri: str, metrics: Mapping[str, float], *,
                         feature_dim: int, tags: Mapping[str, Any] | None = None,
                         evaluated: bool = True) -> PromotionDecision:
        """Register + alias challenger + promote to champion by the rule in registry.py
        (``evaluated=False``: an unlabelled run's encoder, registered, never promoted)."""
        self._require(f"register model {self.settings.registry.name!r}")
        version_tags = dict(self._data)
        version_tags.update({str(k): mask(str(v)) for k, v in (tags or {}).items()})
        return register_encoder(self.uri, model_uri, self.settings.registry,
                                metrics={k: _scalar(v) for k, v in metrics.items()},
                                feature_dim=feature_dim, run_id=self.run_id,
                                tags=version_tags, evaluated=evaluated)

    @staticmethod
    def _data_tags(data: Mapping[str, Any]) -> dict[str, str]:
        """``data_manifest_hash`` / ``data_shards`` of ``data.train`` (best effort: a listing
        failure leaves them out with a warning, registration goes on)."""
        from sslstream.pipelines.shards.snapshot import data_tags

        if not data.get("train"):
            return {}
        try:
            return data_tags(data["train"], dict(data.get("storage_options") or {}))
        except Exception as e:  # storage errors name the URL; registration must go on
            log.warning("data_manifest_hash left out: listing data.train failed: %s", _short(e))
            return {}

    def _require(self, what: str) -> None:
        if not self.active:
            raise RegistrationError(f"cannot {what}: tracking is disabled (tracking.enabled "
                                    "is false or this is not rank 0)")
        if not self._ready():
            raise RegistrationError(f"cannot {what}: MLflow at {self.shown_uri} is unreachable "
                                    f"({self._down_reason or 'no run was started'})")

    # -- failure handling -------------------------------------------------------------------
    def _ready(self) -> bool:
        """Whether calls should go to MLflow now; tries to reconnect when it is time."""
        with self._io:
            return self._ready_locked()

    def _ready_locked(self) -> bool:
        if not self.active or self._start_args is None:
            return self.enabled
        if self._down_reason is None:
            return self.run_id is not None
        if self.settings.reconnect_after_s is None or time.monotonic() < self._retry_at:
            return False
        if mlflow_env.probe(self.uri, self.settings.probe_timeout_s) is not None:
            self._retry_at = time.monotonic() + self.settings.reconnect_after_s
            return False
        reason, self._down_reason = self._down_reason, None
        if self.run_id is None:
            self._guarded("start", self._open_run)
        else:
            if not self._params_logged:  # the outage began while the params were being sent
                self._guarded("log_params", self._resend_params)
            if self._down_reason is None and self.settings.system_metrics:
                self._start_system_metrics(resume=True)  # its thread died with the outage
        if self._down_reason is None:
            log.warning("MLflow at %s reachable again (was: %s); tracking resumes, metrics "
                        "logged meanwhile were dropped", self.shown_uri, reason)
        return self.enabled

    def _guarded(self, what: str, fn: Callable[[], T]) -> T | None:
        """Run one MLflow call; on failure, go down (server gone) or skip this call."""
        with self._io:
            return self._guarded_locked(what, fn)

    def _guarded_locked(self, what: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except Exception as e:  # MLflow surfaces requests/urllib3/OS/sqlalchemy errors
            why = mlflow_env.probe(self.uri, self.settings.probe_timeout_s)
            if why is not None:
                self._go_down(f"{what}: {why}")
            elif self.run_id is None:  # reachable, but the run could not be opened
                self._go_down(f"{what}: {_short(e)}", verb="failing")
            elif what not in self._call_warnings:  # server fine: this call was refused
                self._call_warnings.add(what)
                log.warning("MLflow %s failed at %s (further %s failures are not reported): %s",
                            what, self.shown_uri, what, _short(e))
            return None

    def _go_down(self, reason: str, verb: str = "unreachable") -> None:
        if self._down_reason is None:
            retry = self.settings.reconnect_after_s
            log.warning("MLflow at %s %s: %s; training continues without tracking "
                        "(nothing is buffered; %s)", self.shown_uri, verb, reason,
                        f"retrying every {retry:g} s" if retry is not None else "no retries")
        self._down_reason = reason
        retry = self.settings.reconnect_after_s
        self._retry_at = time.monotonic() + (math.inf if retry is None else retry)

    def _batch(self, **kwargs: Any) -> None:
        assert self._client is not None and self.run_id is not None
        self._client.log_batch(self.run_id, **kwargs)


def _scalar(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


def _short(e: BaseException, limit: int = 300) -> str:
    text = mask_exception(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."
