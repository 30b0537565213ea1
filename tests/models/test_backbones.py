"""Backbones: classifier removed, feature width exposed, CIFAR stem, channels_last."""

from __future__ import annotations

import pytest
import torch
from sslstream.models.backbones import ResNetMini, build_backbone, feature_dim_of
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
