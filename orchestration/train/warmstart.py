"""Warm start: begin a new run from an earlier encoder's backbone weights.

`trainer.init_from` names the source: a registered/logged encoder (`models:/name@champion`,
`models:/name/3`, `models:/m-<id>`, read through the registry with `weights_only=True`) or
a training checkpoint (`.../step-00001000.pt`, a local file or an object-store URL such
as `s3://bucket/runs/x/step-00001000.pt`; its `backbone.*` tensors). Only the
backbone is taken: heads, optimizer and schedules start fresh, as a new run should.

The method is built AROUND the loaded backbone, so methods with a momentum target copy
the warm weights into the target at construction (loading them afterwards would leave the
target at its random initialisation). A resumed run ignores `init_from`: its checkpoint
already holds everything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from sslstream.orchestration.errors import ConfigError, UserError
from torch import nn

log = logging.getLogger("sslstream.train")


def backbone_weights(cfg: DictConfig, source: str) -> dict[str, torch.Tensor]:
    """The backbone state_dict named by `source` (see the module docstring)."""
    if source.startswith(("models:/", "runs:/")):
        from sslstream.orchestration.tracking.mlflow_env import resolve_tracking_uri
        from sslstream.orchestration.tracking.registry import load_encoder_state_dict

        weights, spec = load_encoder_state_dict(resolve_tracking_uri(cfg.tracking.uri), source)
        if spec.backbone.get("name") != cfg.backbone.name:
            raise UserError(
                f"trainer.init_from={source} holds a {spec.backbone.get('name')!r} backbone, "
                f"but backbone.name={cfg.backbone.name!r}"
            )
        return weights
    from sslstream.orchestration.runtime.checkpoint import load_checkpoint
    from sslstream.orchestration.runtime.runstore import is_local_url
    from sslstream.pipelines.shards.masking import mask
    from sslstream.pipelines.shards.storage import StorageError

    if is_local_url(source):
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"trainer.init_from={source}: not a model URI and no such file")
        model = load_checkpoint(path).get("model", {})
    else:  # a checkpoint in an object store (trainer.storage_options reach it)
        try:
            model = load_checkpoint(source, storage_options=dict(
                cfg.trainer.get("storage_options") or {})).get("model", {})
        except StorageError as e:
            raise StorageError(f"trainer.init_from={mask(source)}: {e}", e.url) from None
    weights = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    if not weights:
        raise UserError(f"trainer.init_from={source}: the checkpoint has no backbone.* weights")
    return weights


def build_method_warm(cfg: DictConfig, weights: dict[str, torch.Tensor] | None, process_group: Any) -> nn.Module:
    """build_method(cfg.method, cfg.backbone), with the backbone loaded before the method
    (and so its momentum target) is built around it."""
    from sslstream.models.methods import METHODS, build_method

    if weights is None:
        return build_method(cfg.method, cfg.backbone, process_group=process_group)
    from sslstream.models.backbones import build_backbone

    backbone = build_backbone(cfg.backbone)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"trainer.init_from does not fit backbone {cfg.backbone.name!r}: {e}") from e
    name = str(cfg.method.name)
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is not one of {', '.join(sorted(METHODS))}")
    log.info("warm start: backbone weights from %s", cfg.trainer.init_from)
    return build_method(cfg.method, cfg.backbone, process_group=process_group, backbone=backbone)
