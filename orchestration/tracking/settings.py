"""What of a config MLflow sees: credentials redacted, nested keys flattened into params.

The tracking settings themselves (``TrackingSettings``, every ``tracking.*`` key) are in
orchestration/schema/tracking.py, with every other config key.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from sslstream.orchestration.schema.tracking import TrackingSettings
from sslstream.orchestration.tracking import mlflow_env

__all__ = ["KEY_BAD", "MAX_KEY", "TrackingSettings", "flatten_params", "redact_config",
           "redact_yaml"]

MAX_KEY = 250                       # MLflow's limit on param/metric key length
KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")  # characters MLflow refuses in keys


_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential", re.IGNORECASE)


def redact_config(cfg: Any) -> Any:
    """A copy of a config safe to log: no credentials in params or the config artifact.

    ``*storage_options*`` subtrees go through ``sslstream.pipelines.shards.storage.redact`` (fsspec's
    ``key`` / ``secret`` / ``token`` ...), keys that name a secret anywhere become ``***``,
    and credentials inside URLs (``http://user:token@host``) are masked.
    """
    from sslstream.pipelines.shards.storage import redact as redact_storage

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            if "storage_options" in key:
                return redact_storage(value)
            return {k: ("***" if _SECRET_KEY.search(str(k)) and not isinstance(v, Mapping)
                        else walk(v, str(k))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, key) for v in value]
        return mlflow_env.redact(value) if isinstance(value, str) else value

    return walk(cfg)


def redact_yaml(text: str) -> str:
    """YAML config text with credentials masked (re-dumped through ``redact_config``)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:  # not ours to fix: still mask URL credentials
        return mlflow_env.redact(text)
    if not isinstance(data, Mapping):
        return mlflow_env.redact(text)
    return yaml.safe_dump(redact_config(data), sort_keys=False, default_flow_style=None)


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
