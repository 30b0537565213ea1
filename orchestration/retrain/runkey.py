"""The run key: snapshot id + a hash of the training-relevant config names the run
(checkpoint folder, MLflow run, registry tag), so a retried retrain finds its run.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_hash(cfg: DictConfig, ignore: Sequence[str] = ()) -> str:
    """sha256 of the resolved config minus `ignore` (dotted keys that do not change the model).

    Operational settings (where the tracking server is, lock timing, the run's own name,
    the data location, which the snapshot already covers) are ignored, so moving a
    scheduler to another machine does not start a new run.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    for dotted in ignore:
        node: Any = plain
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    canon = json.dumps(plain, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def run_key(model_name: str, snap_id: str, cfg_hash: str) -> str:
    """`<model>-<snapshot[:12]>-<config[:8]>`: a folder name and MLflow run name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("._") or "model"
    return f"{safe}-{snap_id[:12]}-{cfg_hash[:8]}"
