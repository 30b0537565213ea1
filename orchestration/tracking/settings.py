"""What of a config MLflow sees: credentials redacted, nested keys flattened into params.

The tracking settings themselves (``TrackingSettings``, every ``tracking.*`` key) are in
orchestration/schema/tracking.py, with every other config key. Credentials go through the
one masking function (pipelines/shards/masking.py: ``mask``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from sslstream.orchestration.schema.tracking import TrackingSettings
from sslstream.pipelines.shards.masking import mask

__all__ = ["KEY_BAD", "MAX_KEY", "TrackingSettings", "flatten_params", "mask_yaml"]

MAX_KEY = 250                       # MLflow's limit on param/metric key length
KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")  # characters MLflow refuses in keys


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
