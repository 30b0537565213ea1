"""The served encoder: an MLflow pyfunc defined from code (images -> embeddings).

MLflow copies THIS FILE into every logged encoder model (models-from-code) and executes it
when `mlflow.pyfunc.load_model(...)` runs in any process, so nothing is cloudpickled. The
model's state travels as plain artifacts written by `sslstream.orchestration.tracking.registry`:

- ``spec``: JSON (see `EncoderSpec`): the backbone config given to
  ``build_backbone``, the feature dimension, the image size and the
  normalisation mean/std the encoder was trained with;
- ``weights``: the backbone ``state_dict`` saved with ``torch.save`` and loaded with
  ``weights_only=True`` (tensors only, no code execution on load);
- ``code``: a folder holding the backbone code that trained the encoder (a copy of
  ``models/backbones.py``), imported under a private module name derived from its content
  (``_sslstream_encoder_code_<sha>``) without touching ``sys.path``. MLflow's ``code_paths``
  would prepend a folder to ``sys.path`` for the rest of the process, where a shipped
  ``models`` package shadows a user's own ``models`` (or is shadowed by one already
  imported); a private, content-named module can do neither, and two encoders trained by
  different code load side by side.

Input contract (also recorded as the model signature): a numpy ``uint8`` array of shape
``(N, H, W, 3)``, RGB, any H and W. Images whose size differs from the spec's image size are
resized (shorter side, bilinear, antialiased) and centre-cropped, like the evaluation
loader. Output: ``float32`` embeddings of shape ``(N, feature_dim)`` (backbone features,
not the projector's). Optional predict params: ``batch_size`` (default 256) and ``device``
(default ``"cpu"``; e.g. ``"cuda"``).

This file imports only torch, numpy, mlflow and the shipped code, because it runs in serving
processes that may not have sslstream installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
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


CODE_MODULE = "backbones"  # the module inside the shipped code folder that builds backbones


def import_code(folder: str) -> Any:
    """Import the shipped ``backbones`` module under a private, content-derived name.

    Nothing is added to ``sys.path``: the module is loaded from its file, so it neither
    shadows nor is shadowed by any package of the user's.
    """
    path = f"{folder}/{CODE_MODULE}.py"
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    name = f"_sslstream_encoder_code_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the encoder's code from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def build_encoder(spec: EncoderSpec, code: Any) -> torch.nn.Module:
    """Build the (untrained) backbone described by ``spec`` with ``code`` (a module holding
    ``build_backbone``); the caller loads the weights."""
    module = code.build_backbone(spec.backbone)
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
        self.module = build_encoder(self.spec, import_code(context.artifacts["code"]))
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
