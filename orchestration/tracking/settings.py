"""Tracking configuration (``cfg.tracking``) and config -> MLflow params flattening.

Read (and validated) without importing MLflow or starting a run: the CLI's config check,
the NullTracker and retrain's settings use them too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.tracking import mlflow_env
from sslstream.orchestration.tracking.registry import RegistrySettings
from sslstream.pipelines.shards.masking import mask

MAX_KEY = 250                       # MLflow's limit on param/metric key length
KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")  # characters MLflow refuses in keys


@dataclass(frozen=True)
class TrackingSettings:
    """``cfg.tracking`` (conf/tracking/local.yaml documents every field)."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "sslstream"
    artifact_location: str | None = None
    http_max_retries: int = mlflow_env.DEFAULT_MAX_RETRIES
    http_timeout_s: float = mlflow_env.DEFAULT_TIMEOUT_S
    http_backoff_factor: int = mlflow_env.DEFAULT_BACKOFF_FACTOR
    probe_timeout_s: float = 5.0
    reconnect_after_s: float | None = 300.0
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    max_param_length: int = 500
    plots: bool = True
    metrics_queue: int = 1000       # metric batches waiting for the background sender (0: sync)
    metrics_flush_s: float = 10.0   # at the end, wait at most this long for queued metrics
    registry: RegistrySettings = field(default_factory=RegistrySettings)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | Any | None) -> TrackingSettings:
        """Build from a mapping/DictConfig; unknown keys are an error naming the key."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        raw = _to_dict(cfg)
        http = raw.pop("http", None) or {}
        for key, name in (("max_retries", "http_max_retries"), ("timeout_s", "http_timeout_s"),
                          ("backoff_factor", "http_backoff_factor")):
            if key in http:
                raw[name] = http.pop(key)
        if http:
            raise ConfigError(f"unknown tracking.http keys: {sorted(http)}")
        reg = dict(raw.pop("registry", None) or {})
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise ConfigError(f"unknown tracking config keys: {unknown}")
        reg_known = {f.name for f in fields(RegistrySettings)}
        if unknown := sorted(set(reg) - reg_known):
            raise ConfigError(f"unknown tracking.registry config keys: {unknown}")
        return cls(**raw, registry=RegistrySettings(**reg))


def _to_dict(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return {k: (_to_dict(v) if isinstance(v, Mapping) else v) for k, v in dict(cfg).items()}


def mask_yaml(text: str) -> str:
    """YAML config text with credentials masked: parsed, masked as a mapping (secret keys
    lose their values; pipelines/shards/masking.py) and dumped again."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:  # not ours to fix: still mask URL credentials
        return mask(text)
    if not isinstance(data, Mapping):
        return mask(text)
    return yaml.safe_dump(mask(data), sort_keys=False, default_flow_style=None)


def flatten_params(cfg: Mapping[str, Any], max_length: int = 500) -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` strings that MLflow accepts as params.

    Lists become JSON; values longer than ``max_length`` are cut with a ``...[+N chars]``
    marker (MLflow rejects > 6000); keys with characters MLflow refuses are sanitised and
    over-long keys shortened with a hash, so flattening never fails on odd configs.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if not value and prefix:
                out[prefix] = "{}"
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        if isinstance(value, (list, tuple)):
            text = json.dumps(list(value), default=str)
        else:
            text = "None" if value is None else str(value)
        if len(text) > max_length:
            marker = f"...[+{len(text) - max_length} chars]"
            text = text[: max(0, max_length - len(marker))] + marker
        key = KEY_BAD.sub("_", prefix)
        if len(key) > MAX_KEY:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            key = key[: MAX_KEY - 11] + "~" + digest
        out[key] = text

    walk("", cfg)
    return out
