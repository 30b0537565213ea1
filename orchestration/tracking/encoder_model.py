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

Input (what a client sends; `predict` checks it, see "Why no input schema" below):

- ``images``: a ``uint8`` array of shape ``(N, H, W, 3)``, RGB, any H and W (one size per
  call). Integer arrays holding 0..255 are taken as ``uint8`` (JSON has no uint8); anything
  else (floats, another rank, a fourth channel) is refused.
- ``image_bytes``: N encoded image files (PNG, JPEG, WebP: what PIL opens), each a base64
  string (the JSON form) or ``bytes``; decoded to RGB, each at its own size.

A bare array means ``images``; a dict names one of the two keys (``{"images": ...}`` or
``{"image_bytes": [...]}``). Every image whose size differs from the spec's is resized
(shorter side to `eval_resize(image_size)`, bilinear, antialiased) and centre-cropped to the
spec's size, the evaluation loader's protocol (pipelines/views/eval_loader.py). Output:
``float32`` embeddings of shape ``(N, feature_dim)`` (backbone features, not the
projector's), in input order. Optional predict params: ``batch_size`` (default 256) and
``device`` (default ``"cpu"``; e.g. ``"cuda"``).

A bad input raises `InvalidInput` (an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``,
and a ``ValueError``), which ``mlflow models serve`` answers with HTTP 400 and its message.

Why no input schema in the signature: MLflow enforces a tensor schema by casting, so a JSON
float tensor (pixels scaled to 0..1) would be truncated to zeros and embedded without a
word, and a schema admits one input form, so encoded files could not be sent at all. The
signature records the outputs and the params; the inputs are checked here, and the logged
model's ``metadata`` and input example describe them.

This file imports only torch, numpy, PIL, mlflow and the shipped code, because it runs in
serving processes that may not have sslstream installed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image

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


def eval_resize(size: int) -> int:
    """Shorter side before the centre crop: the evaluation loader's rule (256 for 224,
    ratio 0.875; no resize at CIFAR sizes), copied because this file cannot import
    sslstream (a test holds the two equal)."""
    return size if size <= 64 else int(round(size * 256 / 224))


def _round_half_even_half(d: int) -> int:
    """``round(d / 2)`` for ``d >= 0`` in integers (Python's and torchvision's centre-crop
    offset), written so TorchScript and ONNX graphs compute the same value."""
    return d // 2 + (d % 2) * ((d // 2) % 2)


class Preprocess(torch.nn.Module):
    """uint8 (N, H, W, 3) RGB -> normalised float32 (N, 3, S, S), S = ``spec.image_size``.

    Shorter side to ``eval_resize(S)`` (bilinear, antialiased, on [0, 1] floats), centre
    crop S x S, per-channel (x - mean) / std. TorchScript-compatible, so the exported
    model (``sslstream export``) runs this same code. ``always_resize`` runs the resize
    even when the size already fits (an identity), which keeps a traced graph free of
    shape-dependent branches.
    """

    def __init__(self, spec: EncoderSpec, always_resize: bool = False) -> None:
        super().__init__()
        self.size = int(spec.image_size)
        self.resize = eval_resize(self.size)
        self.always_resize = bool(always_resize)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        h, w = x.shape[-2], x.shape[-1]
        size, short = self.size, min(x.shape[-2], x.shape[-1])
        if self.always_resize or h != size or w != size:
            # torchvision's Resize(resize) arithmetic: the shorter side becomes `resize`
            new_h, new_w = h * self.resize // short, w * self.resize // short
            if self.always_resize or new_h != h or new_w != w:
                x = torch.nn.functional.interpolate(x, size=[new_h, new_w], mode="bilinear",
                                                    align_corners=False, antialias=True)
            top, left = _round_half_even_half(new_h - size), _round_half_even_half(new_w - size)
            # gathered rows and columns, not a slice: the result is size x size to torch.export
            # too (a slice at a symbolic offset has a data-dependent length, on which a backbone
            # that checks its input, a ViT, cannot be exported with symbolic height and width)
            at = torch.arange(size, device=x.device)
            x = x.index_select(2, at + top).index_select(3, at + left)
        return ((x - self.mean) / self.std).contiguous()


def preprocess(images: np.ndarray, spec: EncoderSpec) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> normalised float32 (N, 3, S, S) (see `Preprocess`)."""
    images = _checked_pixels(images)
    return Preprocess(spec)(torch.from_numpy(np.ascontiguousarray(images)))


class InvalidInput(MlflowException, ValueError):
    """A request the encoder cannot take; the scoring server answers it with HTTP 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


INPUT_KEYS = ("images", "image_bytes")
MAX_PIXELS = 50_000_000  # an encoded image declaring more is refused before decoding
DEVICES = ("cpu", "cuda")

# What `predict` takes, recorded in the logged model's metadata (the signature has no inputs).
INPUT_CONTRACT = {
    "images": "uint8 (N, H, W, 3) RGB pixels (JSON: integers 0..255), any H, W",
    "image_bytes": "N encoded image files (PNG/JPEG/WebP), base64 strings in JSON",
    "resize": "shorter side to eval_resize(image_size), centre crop image_size",
}


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
        self.preprocess = Preprocess(self.spec)
        self.device = torch.device("cpu")

    # No type hints: MLflow would derive (and enforce) a schema from them.
    def predict(self, context, model_input, params=None):
        params = params or {}
        device, batch_size = _device(params.get("device")), _batch_size(params.get("batch_size"))
        batches = _image_batches(model_input, batch_size)
        if device != self.device:
            self.module.to(device)
            self.preprocess.to(device)
            self.device = device
        out = []
        with torch.inference_mode():
            for batch in batches:
                # a read-only array (np.asarray of a PIL image) is copied: torch wants writable
                pixels = batch if batch.flags.writeable else batch.copy()
                x = self.preprocess(torch.from_numpy(pixels).to(device))
                out.append(self.module(x).float().cpu())
        if not out:
            return np.zeros((0, self.spec.feature_dim), dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)


def _device(value: Any) -> torch.device:
    text = str(value or "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICES:
        raise InvalidInput(f"params.device={text!r}: expected one of {', '.join(DEVICES)} "
                           "(optionally with an index, e.g. cuda:0)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"params.device={text!r}: this process has no CUDA device")
    return device


def _batch_size(value: Any) -> int:
    if value is None:
        return 256
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidInput(f"params.batch_size={value!r}: expected an integer >= 1")
    return int(value)


def _image_batches(model_input: Any, batch_size: int) -> list[np.ndarray]:
    """The request as uint8 (n, H, W, 3) batches in input order; raises `InvalidInput`.

    Pixel arrays are cut into batches of ``batch_size``; encoded files decode to their own
    sizes, so consecutive files of one size share a batch.
    """
    key, value = "images", model_input
    if isinstance(model_input, dict):
        unknown = sorted(str(k) for k in model_input if k not in INPUT_KEYS)
        if unknown or len(model_input) != 1:
            raise InvalidInput(f"expected one input named {' or '.join(INPUT_KEYS)}, got "
                               f"{sorted(str(k) for k in model_input)}")
        key, value = next(iter(model_input.items()))
    if key == "image_bytes":
        images = [_decode(item, i) for i, item in enumerate(_items(value))]
        batches: list[np.ndarray] = []
        for image in images:
            last = batches[-1] if batches else None
            if last is not None and last.shape[1:] == image.shape and len(last) < batch_size:
                batches[-1] = np.concatenate([last, image[None]])
            else:
                batches.append(image[None])
        return batches
    if not isinstance(value, np.ndarray):
        raise InvalidInput(f"images: expected a uint8 array (N, H, W, 3), got "
                           f"{type(value).__name__}")
    pixels = _checked_pixels(value)
    return [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]


def _checked_pixels(images: np.ndarray) -> np.ndarray:
    """``images`` as uint8 (N, H, W, 3); integer arrays within 0..255 are converted."""
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
        raise InvalidInput(f"images: expected shape (N, H, W, 3) with H, W > 0 (RGB), got "
                           f"{tuple(images.shape)}")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iu":
        raise InvalidInput(f"images: expected uint8 pixel values 0..255, got dtype "
                           f"{images.dtype} (send integers, not floats scaled to 0..1)")
    if images.size and (int(images.min()) < 0 or int(images.max()) > 255):
        raise InvalidInput(f"images: pixel values must lie in 0..255, got "
                           f"{int(images.min())}..{int(images.max())}")
    return images.astype(np.uint8)


def _items(value: Any) -> Sequence[Any]:
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise InvalidInput(f"image_bytes: expected a list of N files, got shape "
                               f"{tuple(value.shape)}")
        return list(value)
    if isinstance(value, list | tuple):
        return value
    raise InvalidInput(f"image_bytes: expected a list of base64 strings, got "
                       f"{type(value).__name__}")


def _decode(item: Any, i: int) -> np.ndarray:
    """One encoded file (base64 text or bytes) -> uint8 (H, W, 3) RGB."""
    if isinstance(item, str | np.str_):
        try:
            data = base64.b64decode(str(item), validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidInput(f"image_bytes[{i}]: not base64 ({e})") from None
    elif isinstance(item, bytes | bytearray | np.bytes_):
        data = bytes(item)
    else:
        raise InvalidInput(f"image_bytes[{i}]: expected a base64 string, got {type(item).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise InvalidInput(f"image_bytes[{i}]: {w}x{h} is more than {MAX_PIXELS} pixels")
            rgb = np.array(im.convert("RGB"))
    except InvalidInput:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InvalidInput(f"image_bytes[{i}]: not a decodable image ({len(data)} bytes: "
                           f"{e})") from None
    if 0 in rgb.shape:
        raise InvalidInput(f"image_bytes[{i}]: empty image")
    return rgb


mlflow.models.set_model(EncoderModel())
