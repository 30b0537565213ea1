"""BYOL and MoCo move their momentum targets in one place (``Method.after_optimizer_step``
over ``momentum_pairs``); the result must be the old per-method update: the EMA of the
online backbone + projector with the cosine tau schedule, here recomputed in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from sslstream.models.methods import Method

from tests.models.test_training_toy import SMALL_HEADS, TINY_BACKBONE, method_cfg

pytestmark = pytest.mark.timeout(60)

K = 6  # schedule length


def _tau(k: int, tau_base: float, tau_final: float) -> float:
    """tau_k = tau_final - (tau_final - tau_base)(cos(pi k / K) + 1) / 2 (BYOL's Eq.)."""
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * k / K) + 1.0) / 2.0


def _build(name: str, **extra: object) -> Method:
    from sslstream.models.methods import build_method

    torch.manual_seed(0)
    return build_method(method_cfg(name, **SMALL_HEADS, **extra), TINY_BACKBONE).double()


@pytest.mark.parametrize(("name", "extra", "taus"), [
    ("byol", {"pred_hidden_dim": 32, "tau_base": 0.9}, (0.9, 1.0)),
    ("mocov2", {"queue_size": 64, "tau_base": 0.8, "tau_final": 0.95}, (0.8, 0.95)),
    ("mocov2", {"queue_size": 64, "tau_base": 0.9, "tau_final": None}, (0.9, 0.9)),
])
def test_momentum_update_matches_a_float64_reference_ema(name: str, extra: dict,
                                                         taus: tuple[float, float]) -> None:
    method = _build(name, **extra)
    (online, target), = method.momentum_pairs
    assert online == (method.backbone, method.projector) and target is method.momentum
    online_params = list(itertools.chain(method.backbone.parameters(),
                                         method.projector.parameters()))
    target_params = list(method.momentum.target.parameters())
    buffers = [b.clone() for b in method.momentum.target.buffers()]
    g = torch.Generator().manual_seed(1)
    ref = [p.detach().clone() for p in target_params]
    for k in range(K + 2):  # two steps past K: tau holds tau_final
        with torch.no_grad():  # an "optimizer step" of the online network
            for p in online_params:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        tau = _tau(min(k, K), *taus)
        ref = [tau * r + (1.0 - tau) * p.detach() for r, p in zip(ref, online_params,
                                                                   strict=True)]
        method.after_optimizer_step(k + 1, K)
        for got, want in zip(target_params, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        assert method.momentum.last_tau_value == pytest.approx(tau, rel=1e-15)
    assert int(method.momentum.step) == K + 2
    # only parameters are averaged: BN statistics of the target are its own
    assert all(torch.equal(a, b) for a, b in zip(buffers, method.momentum.target.buffers(),
                                                 strict=True))
    # the predictor (BYOL) is not part of the target
    assert len(target_params) == len(online_params)


def test_methods_without_momentum_pairs_move_nothing() -> None:
    method = _build("simclr")
    assert method.momentum_pairs == []
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.after_optimizer_step(1, K)
    assert all(torch.equal(v, before[k]) for k, v in method.state_dict().items())
