"""`sslstream export`: the encoder as one ONNX or TorchScript file a client runs alone.

The exported graph takes what the served pyfunc takes: uint8 images ``(N, H, W, 3)``, RGB,
any N, H and W, and returns float32 embeddings ``(N, D)``. Resizing (shorter side to
`eval_resize`, bilinear, antialiased), the centre crop and the normalisation are inside the
graph: they are the pyfunc's own `Preprocess` module (encoder_model.py), exported with the
backbone, so the file, the served model and `sslstream embed` share one definition of the
input. Nothing here depends on the backbone's family: any backbone `torch.export` traces
(ResNets, ViTs) exports the same way.

- ``onnx``: ``torch.onnx.export(dynamo=True)`` with symbolic batch, height and width; the
  resize becomes an ONNX ``Resize`` with ``antialias=1`` (opset 18+). Needs the ``export``
  extra (onnx, onnxscript; onnxruntime for the check).
- ``torchscript``: the scripted preprocessing (its size arithmetic stays dynamic) around the
  traced backbone; ``torch.jit.load`` runs it without sslstream installed. TorchScript is
  deprecated in torch 2.14 (``torch.jit.script`` warns) but still what many C++ / mobile
  runtimes load.

Every export is checked before it is published: the written file, run by its own runtime
(onnxruntime / ``torch.jit.load``), must match the eager model within `CHECK_ATOL` on
`CHECK_IMAGES` images at the spec's size and on images of other sizes.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sslstream.orchestration.embed.model import LoadedEncoder
from sslstream.orchestration.embed.store import publish_file
from sslstream.orchestration.errors import UserError
from sslstream.orchestration.tracking.encoder_model import Preprocess
from torch import nn

log = logging.getLogger("sslstream.export")

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
CHECK_IMAGES = 16
CHECK_ATOL = 1e-4
ONNX_OPSET = 18  # Resize's antialias attribute needs opset 18
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


class ExportError(UserError):
    """The export failed or its check did not pass; the message says which."""


class EncoderGraph(nn.Module):
    """uint8 (N, H, W, 3) -> float32 (N, D): `Preprocess` then the backbone."""

    def __init__(self, encoder: LoadedEncoder, *, always_resize: bool) -> None:
        super().__init__()
        self.preprocess = Preprocess(encoder.spec, always_resize=always_resize)
        self.backbone = encoder.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images)).float()


@dataclass(frozen=True)
class Exported:
    path: str
    format: str
    max_abs_diff: float      # exported vs eager, over the check images
    checked: int             # images in the check


def export_encoder(encoder: LoadedEncoder, fmt: str, out: str | Path, *, seed: int = 0,
                   storage_options: dict | None = None) -> Exported:
    """Write ``encoder`` as ``fmt`` to ``out`` (a path or an fsspec URL), checked first."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    encoder.backbone.eval()
    with tempfile.TemporaryDirectory(prefix="sslstream-export-") as tmp:
        local = Path(tmp) / f"encoder{SUFFIX[fmt]}"
        if fmt == "onnx":
            _to_onnx(encoder, local)
        else:
            _to_torchscript(encoder, local)
        diff, n = check_export(encoder, fmt, local, seed=seed)
        if diff > CHECK_ATOL:
            raise ExportError(f"the {fmt} export of {encoder.version} differs from the eager "
                              f"model by {diff:.3g} (> {CHECK_ATOL}) on {n} images: not written")
        publish_file(local, str(out), storage_options)
    log.info("export: %s -> %s (%s, max |diff| %.2g over %d images)", encoder.version, out,
             fmt, diff, n)
    return Exported(str(out), fmt, diff, n)


def _to_onnx(encoder: LoadedEncoder, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"--format onnx needs the export extra (pip install "
                          f"'sslstream[export]'): {e}") from e
    graph = EncoderGraph(encoder, always_resize=True).eval()
    size = encoder.spec.image_size
    example = torch.zeros(2, size + 3, size + 5, 3, dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("height", min=1, max=16384),
            2: torch.export.Dim("width", min=1, max=16384)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"images": dims}, verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path))


def _to_torchscript(encoder: LoadedEncoder, path: Path) -> None:
    size = encoder.spec.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* are deprecated in torch 2.14 (FutureWarning)
        backbone = torch.jit.trace(encoder.backbone, torch.zeros(2, 3, size, size),
                                   check_trace=False)
        module = torch.jit.script(_Scripted(Preprocess(encoder.spec), backbone))
        torch.jit.save(module, str(path))


class _Scripted(nn.Module):
    def __init__(self, preprocess: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.preprocess = torch.jit.script(preprocess)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images)).float()


def check_images(size: int, seed: int = 0) -> list[np.ndarray]:
    """`CHECK_IMAGES` images at the spec's size, then batches of other sizes (wide, tall,
    smaller: resized up)."""
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, 256, (CHECK_IMAGES, size, size, 3), dtype=np.uint8)]
    for h, w in ((size + 8, size + 16), (2 * size, size + 1), (max(1, size // 2),) * 2):
        out.append(rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8))
    return out


def run_exported(fmt: str, path: Path | str, images: np.ndarray) -> np.ndarray:
    """The exported file, run by its own runtime on ``images`` (uint8 NHWC)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError(f"checking an onnx export needs onnxruntime (pip install "
                              f"'sslstream[export]'): {e}") from e
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return module(torch.from_numpy(images)).numpy()


def check_export(encoder: LoadedEncoder, fmt: str, path: Path, *, seed: int = 0) -> tuple[float, int]:
    """(max |exported - eager|, images compared) over `check_images`."""
    eager = EncoderGraph(encoder, always_resize=False).eval()
    worst, n = 0.0, 0
    for batch in check_images(encoder.spec.image_size, seed):
        with torch.inference_mode():
            want = eager(torch.from_numpy(batch)).numpy()
        got = run_exported(fmt, path, batch)
        if got.shape != want.shape:
            raise ExportError(f"the {fmt} export returned shape {got.shape} for input "
                              f"{batch.shape}, the eager model {want.shape}")
        worst, n = max(worst, float(np.abs(got - want).max())), n + len(batch)
    return worst, n


