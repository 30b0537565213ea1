"""`sslstream export`: the exported file takes uint8 (N, H, W, 3) images of any size and
batch, and its own runtime (onnxruntime, torch.jit.load) answers like the eager encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sslstream.models.backbones import build_backbone, feature_dim_of
from sslstream.orchestration.cli import main
from sslstream.orchestration.embed.export import CHECK_IMAGES, export_encoder, run_exported
from sslstream.orchestration.embed.model import LoadedEncoder, weights_digest
from sslstream.orchestration.schema import compose_config
from sslstream.orchestration.tracking.encoder_model import EncoderSpec
from sslstream.pipelines.views.recipes import TwoViewRecipe

pytestmark = pytest.mark.timeout(600)


def _trained_looking(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    with torch.no_grad():  # BN running stats off their defaults
        for _ in range(2):
            backbone(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    return backbone.eval()


def _reference(backbone: torch.nn.Module, images: np.ndarray, size: int, mean, std) -> np.ndarray:
    """torchvision's eval transform in float64 (independent of encoder_model.Preprocess)."""
    from torchvision.transforms.v2 import functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.center_crop(F.resize(x, [size], antialias=True), [size])
    x = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        return backbone(x.float()).numpy()


@pytest.mark.slow
def test_onnx_from_a_checkpoint_matches_torch(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    cfg = compose_config([])
    backbone = _trained_looking(dict(cfg.backbone))
    ckpt = tmp_path / "step-00000010.pt"
    torch.save({"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, ckpt)
    out = tmp_path / "exported" / "encoder.onnx"
    assert main(["export", "--model", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert f"checked on {CHECK_IMAGES + 6} images" in capsys.readouterr().out
    graph = onnx.load(str(out)).graph
    (inp,) = graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim][-1] == 3
    recipe = TwoViewRecipe.from_config(cfg.augment)
    mean, std = tuple(recipe.view1.mean), tuple(recipe.view1.std)
    rng = np.random.default_rng(7)
    for shape in ((16, 32, 32), (1, 32, 32), (3, 40, 48), (2, 64, 50), (2, 20, 20)):
        images = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        got = run_exported("onnx", out, images)
        want = _reference(backbone, images, recipe.size, mean, std)
        assert got.shape == (shape[0], 128) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


VIT = {"name": "vit_tiny", "image_size": 32, "patch_size": 4}


@pytest.mark.parametrize("cfg, fmt", [
    pytest.param(VIT, "torchscript", id="vit-torchscript"),
    pytest.param(VIT, "onnx", id="vit-onnx", marks=pytest.mark.slow),
    pytest.param({"name": "mobilenet_v3_small"}, "torchscript", id="mobilenet-torchscript"),
])
def test_other_backbone_families(cfg: dict, fmt: str, tmp_path: Path) -> None:
    """A timm ViT and a MobileNet export like the ResNet: the export is generic over the
    backbone (the ViT checks that its input is a multiple of its patch size, which holds
    for the crop's static size under torch.export's symbolic height and width)."""
    backbone = _trained_looking(cfg) if cfg["name"] != "vit_tiny" else build_backbone(cfg).eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = EncoderSpec(backbone=cfg, feature_dim=feature_dim_of(backbone), image_size=32,
                       mean=mean, std=std)
    encoder = LoadedEncoder(backbone, spec, "test", "test",
                            weights_digest(spec, backbone.state_dict()))
    out = tmp_path / f"encoder.{fmt}"
    done = export_encoder(encoder, fmt, str(out))
    assert done.max_abs_diff <= 1e-4 and out.is_file()
    rng = np.random.default_rng(3)
    for shape in ((16, 32, 32), (2, 45, 33)):
        images = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        np.testing.assert_allclose(run_exported(fmt, out, images),
                                   _reference(backbone, images, 32, mean, std), rtol=0,
                                   atol=1e-4)


@pytest.mark.parametrize("argv, code, words", [
    (["export", "--model", "x.pt", "--out", "y.onnx"], 2, "needs --format"),
    (["export", "--model", "x.pt", "--format", "tflite", "--out", "y"], 2, "expected one of"),
    (["export", "--model", "no-such.pt", "--format", "onnx", "--out", "y.onnx"], 1,
     "no such checkpoint file"),
])
def test_export_usage_errors(argv: list[str], code: int, words: str, in_tmp_cwd: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == code
    assert words in capsys.readouterr().err
