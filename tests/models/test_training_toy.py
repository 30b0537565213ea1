"""A few hundred CPU steps of every method on a tiny synthetic image set.

Each method must lower its loss and must not collapse (embedding std and effective rank of
the online embeddings stay well away from their collapsed values). The images are coloured
shapes on coloured backgrounds, generated here; views are random crops + flips in torch.
The helpers are reused by test_collapse.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from sslstream.models.collapse import effective_rank, embedding_std
from sslstream.models.methods import METHODS, Method, build_method
from sslstream.models.optim import WarmupCosine, build_optimizer

from tests.conftest import REPO_ROOT

TINY_BACKBONE = {"name": "resnet_mini", "cifar_stem": True, "widths": [8, 16, 32, 64],
                 "layers": [1, 1, 1, 1]}
SMALL_HEADS = {"proj_hidden_dim": 128, "proj_output_dim": 64}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and 2-thread OpenMP crawls on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_images(n: int = 64, size: int = 24, seed: int = 0) -> torch.Tensor:
    """``n`` normalised images (n, 3, size, size): two random discs/squares/diamonds each."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        img = (torch.rand(3, 1, 1, generator=g) * 0.5).expand(3, size, size).clone()
        for _ in range(2):
            cx, cy = (torch.rand(2, generator=g) * size).tolist()
            r = 3 + float(torch.rand(1, generator=g)) * size / 4
            kind = int(torch.randint(0, 3, (1,), generator=g))
            if kind == 0:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            elif kind == 1:
                mask = ((xx - cx).abs() < r) & ((yy - cy).abs() < r)
            else:
                mask = (xx - cx).abs() + (yy - cy).abs() < r
            img = torch.where(mask, torch.rand(3, 1, 1, generator=g).expand_as(img), img)
        images[i] = img
    return (images - 0.5) / 0.25


def random_views(images: torch.Tensor, crop: int, g: torch.Generator) -> torch.Tensor:
    """Random ``crop`` x ``crop`` crops, each flipped horizontally with probability 1/2."""
    n, _, size, _ = images.shape
    ox = torch.randint(0, size - crop + 1, (n,), generator=g).tolist()
    oy = torch.randint(0, size - crop + 1, (n,), generator=g).tolist()
    flip = (torch.rand(n, generator=g) < 0.5).tolist()
    out = torch.empty(n, 3, crop, crop)
    for i in range(n):
        v = images[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop]
        out[i] = v.flip(-1) if flip[i] else v
    return out


def method_cfg(name: str, regime: str = "cifar", **overrides: Any) -> Any:
    """The ``method`` block of conf/recipe/<name>_<regime>.yaml, with ``overrides`` merged in."""
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "recipe" / f"{name}_{regime}.yaml").method
    return OmegaConf.merge(cfg, overrides)


def train(method: Method, optim_cfg: dict[str, Any], steps: int, *, batch: int = 32,
          warmup: int = 10, seed: int = 1) -> tuple[list[float], list[torch.Tensor]]:
    """``steps`` optimizer steps; returns the losses and the embeddings of every 10th step."""
    images = make_images()
    g = torch.Generator().manual_seed(seed)
    opt = build_optimizer(method.parameter_groups(), optim_cfg, batch)
    sched = WarmupCosine(opt, warmup, steps)
    losses, embeddings = [], []
    method.train()
    for k in range(steps):
        idx = torch.randperm(images.shape[0], generator=g)[:batch]
        v1, v2 = random_views(images[idx], 16, g), random_views(images[idx], 16, g)
        loss, metrics = method.training_step([v1, v2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        method.after_optimizer_step(k + 1, steps)
        losses.append(float(loss.detach()))
        if k % 10 == 0 or k == steps - 1:
            embeddings.append(metrics["embeddings"])
    return losses, embeddings


SGD = {"name": "sgd", "lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9}
LARS = {"name": "lars", "lr": 0.5, "weight_decay": 1e-5, "eta": 0.02, "clip_lr": True}

# what a method needs besides the small heads and LARS (every registered method runs)
CASES = {
    "byol": ({"pred_hidden_dim": 128}, LARS),
    "simsiam": ({"pred_hidden_dim": 32}, SGD),
    "mocov2": ({"queue_size": 512}, SGD),
}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_learns_without_collapsing(name: str, one_thread: None) -> None:
    extra, optim_cfg = CASES.get(name, ({}, LARS))
    torch.manual_seed(0)
    method = build_method(method_cfg(name, **SMALL_HEADS, **extra), TINY_BACKBONE)
    steps = 200
    losses, embeddings = train(method, optim_cfg, steps)
    assert all(math.isfinite(v) for v in losses), name
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 0.1 * abs(first), (name, first, last)
    z = embeddings[-1]
    dim = z.shape[1]
    std_ratio = embedding_std(z) * math.sqrt(dim)  # ~1 healthy, 0 collapsed
    rank = effective_rank(z)
    assert std_ratio > 0.4, (name, std_ratio)
    assert rank > 4.0, (name, rank)
