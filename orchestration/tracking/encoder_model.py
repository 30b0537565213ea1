"""The served encoder: an MLflow pyfunc defined from code (images -> embeddings).

MLflow copies THIS FILE into every logged encoder model (models-from-code) and executes it
when `mlflow.pyfunc.load_model(...)` runs in any process, so nothing is cloudpickled. The
model's state travels as two plain artifacts written by `orchestration.tracking.registry`:

- ``spec``: JSON (see `EncoderSpec`): the backbone config given to
  ``models.backbones.build_backbone``, the feature dimension, the image size and the
  normalisation mean/std the encoder was trained with;
- ``weights``: the backbone ``state_dict`` saved with ``torch.save`` and loaded with
  ``weights_only=True`` (tensors only, no code execution on load).

Input contract (also recorded as the model signature): a numpy ``uint8`` array of shape
``(N, H, W, 3)``, RGB, any H and W. Images whose size differs from the spec's image size are
resized (shorter side, bilinear, antialiased) and centre-cropped, like the evaluation
loader. Output: ``float32`` embeddings of shape ``(N, feature_dim)`` (backbone features,
not the projector's). Optional predict params: ``batch_size`` (default 256) and ``device``
(default ``"cpu"``; e.g. ``"cuda"``).

This file must only import torch, numpy, mlflow and the ``models`` package (shipped with the
model as code), because it runs in serving processes that may not have the rest of sslstream.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

SPEC_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncoderSpec:
    """Everything besides the weights that is needed to rebuild and feed the encoder."""

    backbone: dict[str, Any]            # config passed to the backbone builder
    feature_dim: int                    # D of the (N, D) embeddings
    image_size: int                     # side of the square input the encoder was trained on
    mean: tuple[float, float, float]    # per-channel normalisation, on [0, 1] pixel values
    std: tuple[float, float, float]
    format_version: int = SPEC_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderSpec:
        raw = json.loads(text)
        version = raw.get("format_version", 0)
        if version > SPEC_FORMAT_VERSION:
            raise ValueError(
                f"encoder spec format_version {version} is newer than this code "
                f"({SPEC_FORMAT_VERSION}); upgrade sslstream to load it"
            )
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["mean"] = tuple(float(v) for v in raw["mean"])
        raw["std"] = tuple(float(v) for v in raw["std"])
        return cls(**raw)


def build_encoder(spec: EncoderSpec) -> torch.nn.Module:
    """Build the (untrained) backbone described by ``spec``; the caller loads the weights."""
    from models.backbones import build_backbone

    module = build_backbone(spec.backbone)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"build_backbone returned {type(module).__name__}, not a torch module")
    return module


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Read a backbone state_dict without executing pickled code (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def preprocess(images: np.ndarray, spec: EncoderSpec) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> normalised float32 (N, 3, S, S), S = ``spec.image_size``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    size = spec.image_size
    h, w = x.shape[-2:]
    if (h, w) != (size, size):  # torchvision's Resize(size) + CenterCrop(size) arithmetic
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        if (new_h, new_w) != (h, w):
            x = torch.nn.functional.interpolate(
                x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class EncoderModel(PythonModel):
    """pyfunc wrapper: rebuilds the backbone from the spec and weights artifacts."""

    # The logged signature carries the schema; this opts out of MLflow's type-hint based
    # validation wrapper (and its "Add type hints" warning on every import of this file).
    _skip_type_hint_validation = True

    def load_context(self, context):  # noqa: ANN001 (MLflow inspects the signature)
        with open(context.artifacts["spec"], encoding="utf-8") as f:
            self.spec = EncoderSpec.from_json(f.read())
        self.module = build_encoder(self.spec)
        self.module.load_state_dict(load_weights(context.artifacts["weights"]))
        self.module.eval()
        self.device = torch.device("cpu")

    # No type hints: MLflow would derive (and enforce) a schema from them.
    def predict(self, context, model_input, params=None):
        params = params or {}
        images = _as_uint8_batch(model_input)
        device = torch.device(params.get("device") or "cpu")
        if device != self.device:
            self.module.to(device)
            self.device = device
        batch_size = max(1, int(params.get("batch_size") or 256))
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = preprocess(images[start : start + batch_size], self.spec).to(device)
                out.append(self.module(x).float().cpu())
        if not out:
            return np.zeros((0, self.spec.feature_dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)


def _as_uint8_batch(model_input: Any) -> np.ndarray:
    """Accept the signature's ndarray (or a dict holding a single one, as tensor specs allow)."""
    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise ValueError(f"expected one input tensor, got keys {sorted(model_input)}")
        model_input = next(iter(model_input.values()))
    if not isinstance(model_input, np.ndarray):
        raise TypeError(
            f"expected a numpy uint8 array (N, H, W, 3), got {type(model_input).__name__}"
        )
    return model_input


mlflow.models.set_model(EncoderModel())
