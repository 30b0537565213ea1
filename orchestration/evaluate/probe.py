"""Linear probe on frozen features: a linear head initialised N(0, 0.01), SGD +
cross-entropy, the papers' protocol at small scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    *,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    standardize: bool = True,
    seed: int = 0,
) -> float:
    """Top-1 test accuracy of a linear classifier trained on frozen features.

    Features are standardised with the train statistics (BatchNorm-without-affine in
    MoCo v3's and MAE's probes) so one learning rate works across backbones whose feature
    scales differ by orders of magnitude. The head starts at N(0, 0.01), bias 0; SGD with
    momentum and a cosine learning rate over the epochs. Deterministic for a seed.
    """
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max()).item()) + 1
    x = train_x.float()
    xt = test_x.float()
    if standardize:
        mu, sd = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
        x, xt = (x - mu) / sd, (xt - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    y = train_y.long().to(x.device)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for s in range(0, n, batch_size):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        pred = head(xt).argmax(1)
    return float((pred.cpu() == test_y.long().cpu()).float().mean().item())
