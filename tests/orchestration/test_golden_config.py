"""The redesigned config resolves to what the old one did: every method x recipe x data.

tests/golden/train_cfg.json holds `sslstream train --cfg` for each combination, captured
before conf/ became one recipe file per (method, regime) over a typed schema (issue 21).
Each combination is composed again and compared key by key; the differences the redesign
meant are listed in INTENDED, each with its reason, and nothing else may differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from sslstream.orchestration.schema import compose_config

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "train_cfg.json").read_text())
MISSING = object()

# key (a dotted prefix matches everything below it) -> why it may differ from the golden file
INTENDED: dict[str, str] = {
    "method.preset": "presets are recipe files now (conf/recipe/<method>_<regime>.yaml)",
    "method.presets": "presets are recipe files now (conf/recipe/<method>_<regime>.yaml)",
    # keys the schema declares with their defaults, which some presets used to leave out: the
    # consumers applied the same defaults in code (`cfg.get(key, default)`), so nothing changes
    "data.generate_train_samples": "schema default shown for every data preset (unused unless data.generate)",
    "data.generate_test_samples": "schema default shown for every data preset (unused unless data.generate)",
    "data.generate_seed": "schema default shown for every data preset (unused unless data.generate)",
    "data.root": "null for data=shards: the schema has the key for every preset",
    "backbone.layers": "null for torchvision backbones: resnet_mini's key, declared once for all",
    "backbone.widths": "null for torchvision backbones: resnet_mini's key, declared once for all",
    "backbone.kwargs": "the torchvision builder's extra arguments, {} by default (read before, undeclared)",
    "tracking.parent_run_id": "new: a sweep's parent MLflow run (`sslstream train -m`)",
    # keys added after the golden file was captured, by the features merged with this change
    "augment.local": "new: multi-crop's local crops (issue 22), count 0 (none) by default",
    "trainer.accumulate_steps": "new: gradient accumulation (issue 22), 1 (off) by default",
    "optim.weight_decay_end": "new: DINO's weight-decay schedule (issue 22), null (constant) by default",
    "backbone.image_size": "new: ViT key (issue 22), null on other networks",
    "backbone.patch_size": "new: ViT key (issue 22), null on other networks",
    "backbone.drop_path_rate": "new: ViT key (issue 22), null on other networks",
    "backbone.pool": "new: ViT key (issue 22), null on other networks",
    "backbone.freeze_patch_embed": "new: ViT key (issue 22), null on other networks",
    "data.cache_dir": "new: the local shard cache (issue 25), off by default",
    "data.cache_limit": "new: the local shard cache (issue 25)",
    "data.max_member_bytes": "new: the per-member size cap of the tar reader (issue 27)",
    "embed": "new: `sslstream embed`'s section (issue 23)",
    "trainer.storage_options": "new: fsspec options for an object-store output_dir (issue 24)",
    "retrain.run_key_ignore": "embed and the cache keys (issues 23, 25) do not change the trained model",
}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def _intended(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in INTENDED)


@pytest.mark.parametrize("combo", sorted(GOLDEN))
def test_every_combination_resolves_as_before(combo: str, monkeypatch) -> None:
    for var in ("SSLSTREAM_DATA_DIR", "SSLSTREAM_CIFAR10", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    entry = GOLDEN[combo]
    new = _flat(OmegaConf.to_container(compose_config(entry["args"]), resolve=True))
    old = _flat(entry["cfg"])
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, MISSING), new.get(key, MISSING)
        if a == b and (type(a) is type(b) or {type(a), type(b)} <= {int, float}):
            continue
        if not _intended(key):
            diffs.append(f"{key}: {'(absent)' if a is MISSING else a!r} -> "
                         f"{'(absent)' if b is MISSING else b!r}")
    assert not diffs, f"{combo} differs from the golden config:\n" + "\n".join(diffs)


def test_the_comparison_can_fail() -> None:
    """A changed value, a lost key and an added key are each reported."""
    old = _flat({"optim": {"lr": 1.0, "eta": 0.02}, "x": {}})
    new = _flat({"optim": {"lr": 0.5}, "y": 1, "x": {}})
    changed = [k for k in set(old) | set(new) if old.get(k, MISSING) != new.get(k, MISSING)]
    assert sorted(changed) == ["optim.eta", "optim.lr", "y"]
    assert not _intended("optim.lr") and _intended("method.presets.cifar.tau_base")
