"""The peer column of benchmarks/quality_cpu.py (benchmarks/lightly_peer.py) builds each
method as lightly's CIFAR-10 benchmark does: every method takes a training step, and the
recipe values of DINO, SwaV and MoCo v3 (optimiser, momentum schedule, teacher head,
prototypes) are the ones its docstring cites. Needs the ``bench`` extra (lightly)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("lightly.loss")

from benchmarks.lightly_peer import PEER_METHODS, PeerModel, peer_optimizer, peer_transform  # noqa: E402

FEAT = 8


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, FEAT, 3), nn.BatchNorm2d(FEAT), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def _views(method: str, n: int = 8) -> list[torch.Tensor]:
    from PIL import Image

    rng = np.random.default_rng(0)
    tf = peer_transform(method)
    per_image = [tf(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))) for _ in range(n)]
    return [torch.stack([v[j] for v in per_image]) for j in range(len(per_image[0]))]


@pytest.mark.parametrize("method", PEER_METHODS)
def test_every_peer_method_trains_its_backbone_and_not_its_teacher(method: str) -> None:
    torch.manual_seed(1)
    model = PeerModel(method, _backbone(), FEAT, total_steps=4, steps_per_epoch=2).train()
    opt, _ = peer_optimizer(model, batch=8, total_steps=4)
    views = _views(method)
    assert len(views) == 2 and views[0].shape == (8, 3, 32, 32)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    loss = model.loss(views, step=0)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters(), strict=True))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    if model.momentum is not None:
        assert all(not p.requires_grad and id(p) not in in_opt for p in model.momentum.parameters())


@pytest.mark.parametrize(("method", "kind", "lr", "wd"), [
    ("dino", torch.optim.SGD, 0.06 * 256 / 128, 5e-4),
    ("mocov3", torch.optim.SGD, 0.06 * 256 / 128, 5e-4),
    ("swav", torch.optim.Adam, 1e-3 * 256 / 128, 1e-6),
])
def test_optimiser_is_the_benchmarks(method: str, kind: type, lr: float, wd: float) -> None:
    model = PeerModel(method, _backbone(), FEAT)
    opt, _ = peer_optimizer(model, batch=256, total_steps=10)
    assert type(opt) is kind
    assert opt.param_groups[0]["lr"] == pytest.approx(lr) and opt.param_groups[0]["weight_decay"] == wd
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)].split(".")[0] for g in opt.param_groups for p in g["params"]}
    expected = {"dino": {"backbone", "projection_head"}, "swav": {"backbone", "projection_head", "prototypes"},
                "mocov3": {"backbone", "projection_head", "prediction_head"}}[method]
    assert trained == expected


def test_mocov3_momentum_follows_a_cosine_from_099_to_1() -> None:
    """moco-v3's cosine per step, as lightly's cosine_schedule spells it (1.0 at the last of
    K steps): m_k = 1 - (1 - 0.99) (1 + cos(pi k / (K - 1))) / 2."""
    total = 4
    model = PeerModel("mocov3", _backbone(), FEAT, total_steps=total).train()
    opt, _ = peer_optimizer(model, batch=8, total_steps=total)
    views = _views("mocov3")
    assert model.momentum is not None
    for k in range(total):
        teacher = model.momentum["backbone"][0].weight.detach().double().clone()
        student = model.backbone[0].weight.detach().double().clone()
        loss = model.loss(views, step=k)
        m = 1 - (1 - 0.99) * (1 + math.cos(math.pi * k / (total - 1))) / 2
        torch.testing.assert_close(model.momentum["backbone"][0].weight.double(),
                                   m * teacher + (1 - m) * student, rtol=0, atol=1e-7)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_dino_teacher_head_is_built_anew_and_moves_with_momentum_099() -> None:
    model = PeerModel("dino", _backbone(), FEAT).train()
    assert model.momentum is not None
    s_w = model.projection_head.layers[0].weight
    t_w = model.momentum["projection_head"].layers[0].weight
    assert s_w.shape == t_w.shape == (2048, FEAT) and not torch.equal(s_w, t_w)
    assert torch.equal(model.backbone[0].weight, model.momentum["backbone"][0].weight)
    t0 = t_w.detach().double().clone()
    model.loss(_views("dino"), step=0)
    torch.testing.assert_close(t_w.double(), 0.99 * t0 + 0.01 * s_w.detach().double(), rtol=0, atol=1e-7)


def test_swav_prototypes_are_unit_vectors_when_scored() -> None:
    model = PeerModel("swav", _backbone(), FEAT).train()
    w = model.prototypes.heads[0].weight
    assert w.shape == (512, 128) and not torch.allclose(w.norm(dim=1), torch.ones(512))
    model.loss(_views("swav"), step=0)
    torch.testing.assert_close(w.detach().norm(dim=1), torch.ones(512))
