"""MLflow tracking's keys (``tracking.*``) and the model registry's (``tracking.registry.*``).

The embedded default needs no server: runs go to ./mlflow.db (sqlite) and ./mlruns/.
orchestration/tracking/ reads these as typed objects (``TrackingSettings``, ``RegistrySettings``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from sslstream.conf.typed import Check, Ge, Gt, MinLen, Typed, build

__all__ = ["TRACKING_SCHEMES", "HttpSettings", "RegistrySettings", "TrackingSettings",
           "tracking_uri_ok"]

NonEmpty = Annotated[str, MinLen(1)]
# MLflow's stores: its HTTP server, a local folder or file: URI, a database (sqlite, or a
# SQLAlchemy URL, also with a driver: postgresql+psycopg2://), Databricks
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                    "databricks", "databricks-uc", "uc")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def tracking_uri_ok(uri: str) -> bool:
    """A URI MLflow can store runs at: one of TRACKING_SCHEMES, or a local path."""
    m = _SCHEME.match(uri)
    if m is None or len(m.group(1)) == 1:  # no scheme (or a Windows drive letter): a path
        return bool(uri)
    return m.group(1).lower().split("+")[0] in TRACKING_SCHEMES


URI_WORDS = f"a local path or a URI of scheme {', '.join(TRACKING_SCHEMES)}"
TrackingUri = Annotated[str, Check(tracking_uri_ok, URI_WORDS)]


@dataclass(frozen=True, kw_only=True)
class HttpSettings(Typed):
    """Bounds on MLflow's HTTP client (its defaults wait ~250 s on a dead server);
    MLFLOW_HTTP_REQUEST_* variables win when set."""

    config_key: ClassVar[str] = "tracking.http"
    max_retries: Annotated[int, Ge(0)] = 2
    timeout_s: Annotated[float, Gt(0)] = 10
    backoff_factor: Annotated[int, Ge(0)] = 1  # backoff = factor x 2**retry seconds (MLflow: an integer)


@dataclass(frozen=True, kw_only=True)
class RegistrySettings(Typed):
    """``tracking.registry.*``: where encoders are registered and when one becomes champion
    (orchestration/tracking/promotion.py; docs/tracking.md "Registry")."""

    config_key: ClassVar[str] = "tracking.registry"
    name: NonEmpty = "sslstream-encoder"      # registered model name
    metric: NonEmpty = "eval/knn_acc"         # promotion metric (higher is better)
    margin: Annotated[float, Ge(0)] = 0.0     # champion moves only if new > champion + margin
    std_metric: NonEmpty = "eval/embedding_std"
    min_std_ratio: Annotated[float, Ge(0)] | None = 0.1  # collapsed if std * sqrt(D) below (healthy ~1)
    rank_metric: NonEmpty = "eval/effective_rank"
    min_effective_rank: Annotated[float, Ge(0)] | None = 2.0  # collapsed if effective rank below
    champion_alias: NonEmpty = "champion"
    challenger_alias: NonEmpty = "challenger"
    await_ready_s: Annotated[int, Ge(0)] = 60
    require_comparable: bool = True           # compare only evaluations of the same split and protocol
    register_unevaluated: bool = True         # a run without a labelled split registers its encoder
                                              # as a challenger, never the champion (false: nothing)


@dataclass(frozen=True, kw_only=True)
class TrackingSettings(Typed):
    """``tracking.*`` (docs/tracking.md)."""

    config_key: ClassVar[str] = "tracking"
    enabled: bool = True
    uri: TrackingUri | None = None       # null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
                                         # (the environment variable wins over this key when set)
    experiment: NonEmpty = "sslstream"
    artifact_location: NonEmpty | None = None  # null: <db dir>/mlruns/<experiment> for sqlite; servers choose
    http: HttpSettings = field(default_factory=HttpSettings)
    probe_timeout_s: Annotated[float, Gt(0)] = 5  # GET <uri>/health before starting and after a failure
    reconnect_after_s: Annotated[float, Ge(0)] | None = 300  # while unreachable, probe this often (0: at every call; null: never)
    system_metrics: bool = True          # CPU/GPU/memory/disk as system/* metrics
    system_metrics_interval_s: Annotated[float, Gt(0)] = 10
    max_param_length: Annotated[int, Ge(1)] = 500  # params = flattened resolved config; longer values are cut
    plots: bool = True                   # loss / kNN curves and a PCA plot of test embeddings
    metrics_queue: Annotated[int, Ge(0)] = 1000  # batches queued for the background sender (0: synchronous)
    metrics_flush_s: Annotated[float, Ge(0)] = 10  # at the end, wait at most this long for queued metrics
    parent_run_id: NonEmpty | None = None  # set by `sslstream train -m` (a sweep): each child run's parent
    registry: RegistrySettings = field(default_factory=RegistrySettings)

    @classmethod
    def from_config(cls, cfg: TrackingSettings | Mapping[str, Any] | None) -> TrackingSettings:
        """``cfg.tracking`` (or a part of it: the rest takes the defaults) as settings."""
        if isinstance(cfg, cls):
            return cfg
        return build(cls, cfg or {}, "tracking")
