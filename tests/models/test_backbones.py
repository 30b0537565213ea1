"""Backbones: classifier removed, feature width exposed, CIFAR stem, channels_last; ViTs
(sizes, patch grids, pooling, drop path, frozen patch projection, weight-decay groups), and
the shipped file's independence from sslstream and (for ResNets) from timm."""

from __future__ import annotations

import ast
import importlib.abc
import math
import sys
from pathlib import Path

import pytest
import torch
from sslstream.models.backbones import (
    ResNetMini,
    ViT,
    build_backbone,
    feature_dim_of,
    requirements,
)
from sslstream.models.methods.base import split_param_groups
from torch import nn
from torchvision.models.resnet import BasicBlock


def test_resnet18_cifar_stem_keeps_resolution_and_exposes_512_features() -> None:
    net = build_backbone({"name": "resnet18", "cifar_stem": True})
    assert feature_dim_of(net) == 512
    assert isinstance(net.conv1, nn.Conv2d)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    sizes = []
    net.layer1.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    net.eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512)
    assert sizes == [32]  # the ImageNet stem would have left 8 x 8


def test_resnet50_imagenet_stem_and_zero_init_residual() -> None:
    net = build_backbone({"name": "resnet50", "zero_init_residual": True})
    assert feature_dim_of(net) == 2048
    assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d)
    assert torch.count_nonzero(net.layer1[0].bn3.weight) == 0
    net.eval()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_any_torchvision_classifier_by_name() -> None:
    net = build_backbone({"name": "mobilenet_v3_small"})
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in net.modules())
    net.eval()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, feature_dim_of(net))


def test_bad_names_and_stems_are_named_in_errors() -> None:
    with pytest.raises(ValueError, match="not_a_net"):
        build_backbone({"name": "not_a_net"})
    with pytest.raises(ValueError, match="cifar_stem.*mobilenet_v3_small"):
        build_backbone({"name": "mobilenet_v3_small", "cifar_stem": True})
    with pytest.raises(ValueError, match="backbone.name"):
        build_backbone({})
    with pytest.raises(ValueError, match="same non-zero length"):
        ResNetMini(layers=(1, 1), widths=(8, 16, 32))


def test_resnet_mini_shape_widths_and_depths() -> None:
    net = build_backbone({"name": "resnet_mini", "cifar_stem": True, "widths": [8, 16, 24],
                          "layers": [2, 1, 1], "zero_init_residual": True})
    assert feature_dim_of(net) == 24
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 4
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    sizes = []
    for stage in net.layers:
        stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
    out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 24)
    assert sizes == [(8, 32, 32), (16, 16, 16), (24, 8, 8)]
    default = build_backbone({"name": "resnet_mini", "cifar_stem": True})
    assert feature_dim_of(default) == 128
    assert sum(p.numel() for p in default.parameters()) < 400_000


def test_channels_last_weights_give_the_same_features() -> None:
    torch.manual_seed(0)
    net = build_backbone({"name": "resnet_mini", "cifar_stem": True, "channels_last": True})
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    ref = build_backbone({"name": "resnet_mini", "cifar_stem": True})
    ref.load_state_dict(net.state_dict())
    net.eval()
    ref.eval()
    x = torch.randn(2, 3, 32, 32)
    out = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- ViTs


def _tiny_cifar(**extra) -> nn.Module:
    return build_backbone({"name": "vit_tiny", "image_size": 32, "patch_size": 4, **extra})


def test_vit_sizes_patch_grids_and_features() -> None:
    torch.manual_seed(0)
    tiny = build_backbone({"name": "vit_tiny"})  # ImageNet: 224 px, patch 16
    assert isinstance(tiny, ViT) and feature_dim_of(tiny) == 192
    assert tuple(tiny.vit.pos_embed.shape) == (1, 1 + 14 * 14, 192) and len(tiny.vit.blocks) == 12
    small = build_backbone({"name": "vit_small", "image_size": 32, "patch_size": 8,
                            "kwargs": {"depth": 1}})
    assert feature_dim_of(small) == 384 and small.vit.blocks[0].attn.num_heads == 6
    assert tuple(small.vit.pos_embed.shape) == (1, 1 + 4 * 4, 384)
    base = build_backbone({"name": "vit_base", "kwargs": {"depth": 1}})  # depth: keep it cheap
    assert feature_dim_of(base) == 768 and base.vit.blocks[0].attn.num_heads == 12
    cifar = _tiny_cifar()
    assert tuple(cifar.vit.pos_embed.shape) == (1, 1 + 8 * 8, 192)
    assert _tiny_cifar(channels_last=True, kwargs={"depth": 1}).vit.patch_embed.proj.weight \
        .is_contiguous(memory_format=torch.channels_last)
    assert cifar.vit.patch_embed.proj.kernel_size == (4, 4)
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in cifar.modules())
    cifar.eval()
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    # a multi-crop local crop (16 px): the position embedding is interpolated
    assert cifar(torch.randn(2, 3, 16, 16)).shape == (2, 192)


def test_vit_pools_class_token_or_mean_of_patch_tokens() -> None:
    torch.manual_seed(0)
    token = _tiny_cifar(kwargs={"depth": 2}).eval()
    mean = _tiny_cifar(pool="mean", kwargs={"depth": 2}).eval()
    mean.vit.load_state_dict(token.vit.state_dict(), strict=False)  # same blocks
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = token.vit.forward_features(x)  # (B, 1 + 64, D) after the final norm
        torch.testing.assert_close(token(x), feats[:, 0])
        patch = mean.vit.forward_features(x)
        torch.testing.assert_close(mean(x), mean.vit.fc_norm(patch[:, 1:].mean(dim=1)))
    assert not torch.allclose(token(x), mean(x))


def test_vit_drop_path_rises_linearly_over_the_blocks() -> None:
    net = _tiny_cifar(drop_path_rate=0.1, kwargs={"depth": 4})
    from timm.layers import DropPath

    rates = [float(b.drop_path1.drop_prob) if isinstance(b.drop_path1, DropPath) else 0.0
             for b in net.vit.blocks]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    x = torch.randn(4, 3, 32, 32)
    net.train()
    torch.manual_seed(1)
    a = net(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, net(x))  # stochastic depth in training
    net.eval()
    assert torch.equal(net(x), net(x))


def test_vit_frozen_random_patch_projection() -> None:
    torch.manual_seed(0)
    net = _tiny_cifar(freeze_patch_embed=True, kwargs={"depth": 1})
    proj = net.vit.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 192))  # MoCo v3: uniform Xavier over the patch
    assert float(proj.weight.abs().max()) <= bound and float(proj.weight.abs().max()) > 0.9 * bound
    assert torch.count_nonzero(proj.bias) == 0
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert proj.weight.grad is None
    assert net.vit.blocks[0].attn.qkv.weight.grad is not None
    assert all(p is not proj.weight for g in split_param_groups(net.named_parameters(), "b")
               for p in g["params"])


def test_vit_position_embedding_and_class_token_take_no_weight_decay() -> None:
    from sslstream.models.optim import build_optimizer

    net = _tiny_cifar(kwargs={"depth": 1})
    groups = split_param_groups(net.named_parameters(), "backbone")
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert {"vit.pos_embed", "vit.cls_token"} <= exempt and groups[1]["lars_exclude"]
    assert {"vit.patch_embed.proj.weight", "vit.blocks.0.attn.qkv.weight"} <= decayed
    assert all(n.endswith((".bias", ".weight")) for n in exempt - {"vit.pos_embed", "vit.cls_token"})
    assert all(net.get_parameter(n).ndim == 1 for n in exempt if n.endswith(".weight"))
    opt = build_optimizer(groups, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                                   "exclude_bias_and_norm_wd": True}, 256)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    # ResNets keep the old rule: exactly the tensors with ndim <= 1 are exempt
    res = build_backbone({"name": "resnet_mini"})
    r_groups = split_param_groups(res.named_parameters(), "r")
    assert all(p.ndim <= 1 for p in r_groups[1]["params"])
    assert all(p.ndim > 1 for p in r_groups[0]["params"])


def test_vit_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"backbone.patch_size=5 must divide backbone.image_size=32"):
        _tiny_cifar(patch_size=5)
    with pytest.raises(ValueError, match="backbone.pool='max'"):
        _tiny_cifar(pool="max")
    with pytest.raises(ValueError, match="drop_path_rate"):
        _tiny_cifar(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="cifar_stem.*'vit_tiny' is a ViT"):
        _tiny_cifar(cifar_stem=True)
    with pytest.raises(ValueError, match="vit_tiny"):  # the unknown-name message lists ViTs
        build_backbone({"name": "vit_huge"})
    net = _tiny_cifar(kwargs={"depth": 1})
    with pytest.raises(ValueError, match="18x18 is not a multiple of backbone.patch_size=4"):
        net(torch.randn(1, 3, 18, 18))
    assert requirements({"name": "vit_small"}) == ["timm"]
    assert requirements({"name": "resnet_mini"}) == [] == requirements({"name": "resnet50"})


def test_backbones_file_stands_alone_and_needs_timm_only_for_vits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every logged encoder ships models/backbones.py alone and imports it under a private
    name (orchestration/tracking/encoder_model.py: import_code): no sslstream import, and a
    ResNet encoder must load where timm is not installed."""
    import sslstream.models.backbones as backbones_mod
    from sslstream.orchestration.tracking.encoder_model import import_code

    source = Path(backbones_mod.__file__).read_text()
    top = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert top <= {"__future__", "math", "collections", "typing", "torch", "torchvision", "timm"}
    # a copy of the file (another content hash: a fresh module), timm made unimportable
    (tmp_path / "backbones.py").write_text(source + "\n# shipped copy\n")

    class _NoTimm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):  # noqa: ANN001
            if name == "timm" or name.startswith("timm."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    for mod in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_NoTimm(), *sys.meta_path])
    code = import_code(str(tmp_path))
    assert code.__name__.startswith("_sslstream_encoder_code_")
    assert feature_dim_of(code.build_backbone({"name": "resnet_mini"})) == 128
    with pytest.raises(ModuleNotFoundError, match="timm"):
        code.build_backbone({"name": "vit_tiny", "image_size": 32, "patch_size": 4})
