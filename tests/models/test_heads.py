"""Heads have the papers' layer structure (where BN, ReLU and biases sit) and widths."""

from __future__ import annotations

import pytest
import torch
from sslstream.models import heads
from torch import nn


def _layout(m: nn.Sequential) -> list[str]:
    out = []
    for layer in m:
        if isinstance(layer, nn.Linear):
            out.append(f"L{layer.in_features}-{layer.out_features}{'b' if layer.bias is not None else ''}")
        elif isinstance(layer, nn.BatchNorm1d):
            out.append("BN" if layer.affine else "BN0")
        elif isinstance(layer, nn.ReLU):
            out.append("R")
    return out


def test_paper_shapes() -> None:
    assert _layout(heads.byol_mlp(512, 4096, 256)) == ["L512-4096", "BN", "R", "L4096-256b"]
    assert _layout(heads.simclr_projector(512, 2048, 128)) == ["L512-2048", "BN", "R", "L2048-128b"]
    assert _layout(heads.moco_projector(2048, 2048, 128)) == ["L2048-2048b", "R", "L2048-128b"]
    assert _layout(heads.simsiam_projector(2048, 2048, 2048)) == [
        "L2048-2048", "BN", "R", "L2048-2048", "BN", "R", "L2048-2048", "BN0"]
    assert _layout(heads.simsiam_projector(512, 2048, 2048, 2, last_bn=False)) == [
        "L512-2048", "BN", "R", "L2048-2048b"]
    assert _layout(heads.simsiam_predictor(2048, 512, 2048)) == [
        "L2048-512", "BN", "R", "L512-2048b"]
    assert _layout(heads.vicreg_expander(2048, 8192, 8192)) == [
        "L2048-8192", "BN", "R", "L8192-8192", "BN", "R", "L8192-8192"]
    assert _layout(heads.barlow_projector(64, 32, 16)) == [
        "L64-32", "BN", "R", "L32-32", "BN", "R", "L32-16"]


def test_mlp_forward_shapes_and_validation() -> None:
    m = heads.mlp(10, 20, 5, 3)
    assert m(torch.randn(4, 10)).shape == (4, 5)
    assert _layout(heads.mlp(10, 20, 5, 1)) == ["L10-5b"]
    with pytest.raises(ValueError, match="out_dim"):
        heads.mlp(10, 20, 0)
    with pytest.raises(ValueError, match="num_layers"):
        heads.mlp(10, 20, 5, 0)


def test_mocov3_and_swav_heads_have_the_official_layout() -> None:
    # moco-v3 builder.py _build_mlp: no biases, BN everywhere, last BN without affine
    assert _layout(heads.mocov3_projector(384, 4096, 256)) == [
        "L384-4096", "BN", "R", "L4096-4096", "BN", "R", "L4096-256", "BN0"]
    assert _layout(heads.mocov3_projector(2048, 4096, 256, num_layers=2)) == [
        "L2048-4096", "BN", "R", "L4096-256", "BN0"]
    assert _layout(heads.mocov3_predictor(256, 4096, 256)) == ["L256-4096", "BN", "R", "L4096-256"]
    # swav resnet50.py projection_head
    assert _layout(heads.swav_projector(2048, 2048, 128)) == ["L2048-2048", "BN", "R", "L2048-128b"]


def test_swav_prototypes_are_unit_vectors_renormalised_and_frozen_for_an_epoch() -> None:
    torch.manual_seed(0)
    protos = heads.SwAVPrototypes(16, 30, freeze_epochs=1)
    assert protos.layer.bias is None and protos.layer.weight.shape == (30, 16)
    torch.testing.assert_close(protos.layer.weight.norm(dim=1), torch.ones(30))
    with torch.no_grad():
        protos.layer.weight.mul_(3.0).add_(0.1)
    protos.normalize_()
    torch.testing.assert_close(protos.layer.weight.norm(dim=1), torch.ones(30))
    z = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    scores = protos(z)
    assert scores.shape == (4, 30) and scores.abs().max() <= 1.0 + 1e-6
    scores.sum().backward()
    assert protos.cancel_gradients(epoch=0) and protos.layer.weight.grad is None
    protos(z).sum().backward()
    assert not protos.cancel_gradients(epoch=1) and protos.layer.weight.grad is not None
    with pytest.raises(ValueError, match="n_prototypes"):
        heads.SwAVPrototypes(16, 0)


def _weight_g(head: heads.DINOHead) -> nn.Parameter:
    return head.last_layer.parametrizations.weight.original0


def test_dino_head_layout_normalised_output_layer_and_frozen_norm() -> None:
    torch.manual_seed(0)
    head = heads.DINOHead(384, out_dim=1000, hidden_dim=64, bottleneck_dim=32)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]  # no BN for ViTs
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [64, 64, 32]
    assert all(float(m.weight.detach().std()) < 0.03 and torch.count_nonzero(m.bias) == 0
               for m in head.mlp if isinstance(m, nn.Linear))  # trunc_normal(std=0.02)
    # weight-normalised last layer: every row a unit vector, g = 1 and frozen
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(1000))
    assert head.last_layer.bias is None
    assert torch.equal(_weight_g(head), torch.ones(1000, 1)) and not _weight_g(head).requires_grad
    x = torch.randn(5, 384)
    out = head(x)
    assert out.shape == (5, 1000)
    # = unit rows . unit bottleneck: every logit a cosine
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=1)
    v = head.last_layer.parametrizations.weight.original1
    torch.testing.assert_close(out, bottleneck @ torch.nn.functional.normalize(v, dim=1).T)
    assert out.abs().max() <= 1.0 + 1e-6
    free = heads.DINOHead(384, out_dim=10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False,
                          use_bn=True)
    assert _weight_g(free).requires_grad
    assert any(isinstance(m, nn.BatchNorm1d) for m in free.mlp)


def test_dino_head_last_layer_is_frozen_during_the_first_epoch_and_ema_copies_it() -> None:
    from sslstream.models.state import MomentumEncoder

    torch.manual_seed(0)
    head = heads.DINOHead(8, out_dim=12, hidden_dim=16, bottleneck_dim=4, freeze_last_layer=1)
    head(torch.randn(3, 8)).sum().backward()
    assert head.cancel_last_layer_gradients(epoch=0)
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert all(p.grad is not None for p in head.mlp.parameters())
    head(torch.randn(3, 8)).sum().backward()
    assert not head.cancel_last_layer_gradients(epoch=1)
    assert head.last_layer.parametrizations.weight.original1.grad is not None
    # the teacher (a deep copy, EMA over parameters) carries the weight norm and g
    teacher = MomentumEncoder(head, tau_base=0.5)
    x = torch.randn(2, 8)
    torch.testing.assert_close(teacher(x), head(x))
    with pytest.raises(ValueError, match="bottleneck_dim"):
        heads.DINOHead(8, bottleneck_dim=0)
