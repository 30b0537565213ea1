"""The encoder an embedding job runs: loaded from the registry or from a training checkpoint.

`--model` names it: a logged or registered encoder (``models:/sslstream-encoder@champion``,
``models:/name/3``, ``models:/m-<id>``; read through the registry with ``weights_only=True``,
rebuilt from its own spec) or a training checkpoint (``.../step-00001000.pt``: its
``backbone.*`` tensors, rebuilt from ``backbone.*`` and sized and normalised by the
``augment`` recipe of the config, as `sslstream eval --checkpoint` does: pass the
overrides it was trained with).

`LoadedEncoder.identity` is a digest of the spec and the weights, so an output written by
one encoder is recognised whatever URI named it (an alias that moved, a version number, the
same checkpoint under another path).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf
from sslstream.orchestration.errors import UserError
from torch import nn

if TYPE_CHECKING:  # encoder_model imports MLflow: loaded where a spec is made or read
    from sslstream.orchestration.tracking.encoder_model import EncoderSpec

MODEL_SCHEMES = ("models:/", "runs:/")


class ModelLoadError(UserError):
    """--model names no loadable encoder: no such checkpoint, no backbone weights in it, or
    weights that do not fit the backbone it describes."""


@dataclass(frozen=True)
class LoadedEncoder:
    """A backbone ready to embed (eval mode, CPU), what it expects, and where it came from."""

    backbone: nn.Module
    spec: EncoderSpec
    source: str      # --model as given
    version: str     # what produced the output: models:/<name>/<version>, models:/m-..., a path
    identity: str    # sha256 of the spec and the weights (hex, 16 chars)


def weights_digest(spec: EncoderSpec, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the spec (JSON) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(spec.to_json().encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def is_model_uri(source: str) -> bool:
    return source.startswith(MODEL_SCHEMES)


def load_encoder(cfg: DictConfig, source: str) -> LoadedEncoder:
    """The encoder named by ``source`` (see the module docstring); raises ModelLoadError (a
    path that is no checkpoint, weights that do not fit, a model the registry cannot give)."""
    from sslstream.models.backbones import build_backbone

    if is_model_uri(source):
        from mlflow.exceptions import MlflowException
        from sslstream.orchestration.tracking.mlflow_env import (
            StoreNotFound,
            resolve_tracking_uri,
        )
        from sslstream.orchestration.tracking.registry import (
            ModelNotFound,
            load_encoder_state_dict,
            resolve_version,
        )

        uri = resolve_tracking_uri(cfg.tracking.get("uri"))
        try:
            version = resolve_version(uri, source)
            state, spec = load_encoder_state_dict(uri, version)
        except (ModelNotFound, StoreNotFound, MlflowException) as e:
            raise ModelLoadError(str(e)) from e
    else:
        state, spec = _from_checkpoint(cfg, source)
        version = str(Path(source).expanduser().resolve())
    backbone = build_backbone(spec.backbone)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"--model {source}: the weights do not fit backbone "
                        f"{spec.backbone.get('name')!r} ({str(e).splitlines()[0]})") from e
    return LoadedEncoder(backbone.eval(), spec, source, version, weights_digest(spec, state))


def _from_checkpoint(cfg: DictConfig, source: str) -> tuple[dict[str, torch.Tensor], EncoderSpec]:
    from sslstream.models.backbones import build_backbone, feature_dim_of
    from sslstream.orchestration.runtime.checkpoint import load_checkpoint
    from sslstream.orchestration.tracking.encoder_model import EncoderSpec
    from sslstream.pipelines.views.recipes import TwoViewRecipe

    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"--model {source}: not a models:/ URI and no such checkpoint file")
    model = load_checkpoint(path).get("model", {})
    state = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    if not state:
        raise ModelLoadError(f"--model {source}: the checkpoint holds no backbone.* weights")
    recipe = TwoViewRecipe.from_config(cfg.augment)
    backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    assert isinstance(backbone_cfg, dict)
    spec = EncoderSpec(backbone=backbone_cfg, feature_dim=feature_dim_of(build_backbone(cfg.backbone)),
                       image_size=int(recipe.size),
                       mean=tuple(float(v) for v in recipe.view1.mean),  # type: ignore[arg-type]
                       std=tuple(float(v) for v in recipe.view1.std))  # type: ignore[arg-type]
    return state, spec
