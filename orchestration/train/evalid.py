"""What an evaluation measured, so that only like is compared with like at promotion.

A kNN accuracy is a number about (encoder, labelled split, protocol). The registry
(orchestration/tracking/registry.py: `COMPARABLE_TAGS`) promotes a new version over the
champion only when both were evaluated on the same labelled split and with the same
protocol; otherwise the new version stays challenger, with that reason. A smoke test on
another split, or at another image size, cannot take the crown.

* split: the content fingerprint of data.test (pipelines/shards/snapshot.py: names and
  checksums / ETags, independent of where the shards are read from), and of data.bank
  unless the bank is the training data itself (the default): then it is recorded as
  `train`, so successive retrains on growing data stay comparable on their fixed test split.
* protocol: the evaluation settings that change the number (kNN k and temperature, probe
  settings, sample caps) and the encoder's input (size, normalisation).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sslstream.orchestration.tracking.registry import COMPARABLE_TAGS

SPLIT_TAG, PROTOCOL_TAG = COMPARABLE_TAGS
PROTOCOL_KEYS = ("knn_k", "knn_t", "probe", "probe_epochs", "probe_lr", "probe_batch_size")


def eval_identity(cfg: DictConfig) -> dict[str, str]:
    """`{eval.split_fingerprint, eval.protocol}` for the run's evaluation."""
    data = cfg.data
    so = dict(data.storage_options)
    test = _split_id(data.test, so)
    bank = "train" if data.bank == data.train else _split_id(data.bank, so)
    return {SPLIT_TAG: f"test:{test},bank:{bank}", PROTOCOL_TAG: protocol(cfg)}


def protocol(cfg: DictConfig) -> str:
    """A short, stable digest of the settings that change an evaluation's numbers."""
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    assert isinstance(ev, dict)
    keys = [k for k in ev if k in PROTOCOL_KEYS or "max_samples" in str(k)]
    doc: dict[str, Any] = {k: ev[k] for k in sorted(keys)}
    view = cfg.augment.view1
    doc["input"] = {"size": view.size, "mean": list(view.mean), "std": list(view.std)}
    text = json.dumps(doc, sort_keys=True, default=str)
    knn = f"knn k={ev['knn_k']} t={ev['knn_t']}"
    return f"{knn}, {view.size}px, {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _split_id(spec: Any, storage_options: dict) -> str:
    """Content id of a split (16 hex); the spec's own hash when it cannot be listed."""
    if not spec:
        return "none"
    from sslstream.pipelines.shards.mix import flat_urls

    spec = flat_urls(spec)  # a weighted mix: its shards
    try:
        from sslstream.pipelines.shards.snapshot import take_snapshot

        return take_snapshot(spec, storage_options).id[:16]
    except Exception:  # unlisted store: the spec is the best identity there is
        return "spec-" + hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]
