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
