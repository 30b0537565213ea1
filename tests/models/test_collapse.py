"""Collapse monitors against float64 references, and the SimSiam collapse story."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sslstream.models.collapse import effective_rank, embedding_std
from sslstream.models.methods import build_method

from tests.models.test_training_toy import SGD, TINY_BACKBONE, method_cfg, one_thread, train

__all__ = ["one_thread"]  # the fixture, re-exported so pytest finds it here


def _std_reference(z: np.ndarray) -> float:
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    return float(np.std(u, axis=0, ddof=1).mean())


def _erank_reference(z: np.ndarray) -> float:
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_embedding_std_matches_float64_reference() -> None:
    rng = np.random.default_rng(0)
    for shape in [(64, 8), (200, 32), (5, 3)]:
        z = rng.normal(size=shape)
        assert embedding_std(torch.tensor(z, dtype=torch.float32)) == pytest.approx(
            _std_reference(z), rel=1e-5)
    # isotropic Gaussian embeddings: ~1/sqrt(D)
    z = rng.normal(size=(4000, 64))
    assert embedding_std(torch.tensor(z, dtype=torch.float32)) == pytest.approx(
        1 / math.sqrt(64), rel=0.03)
    # complete collapse (one vector, any scale per sample): exactly 0
    v = rng.normal(size=16)
    collapsed = np.outer(rng.uniform(0.5, 2.0, size=50), v)
    assert embedding_std(torch.tensor(collapsed, dtype=torch.float32)) == pytest.approx(0.0, abs=1e-6)


def test_effective_rank_matches_float64_reference() -> None:
    assert effective_rank(torch.eye(12)) == pytest.approx(12.0, rel=1e-6)
    # identity-like: a scaled permutation of the identity, taller than wide
    z = np.vstack([3.0 * np.eye(6), np.zeros((4, 6))])
    assert effective_rank(torch.tensor(z, dtype=torch.float32)) == pytest.approx(6.0, rel=1e-6)
    rng = np.random.default_rng(1)
    rank1 = np.outer(rng.normal(size=40), rng.normal(size=10))
    assert effective_rank(torch.tensor(rank1, dtype=torch.float32)) == pytest.approx(1.0, abs=1e-4)
    # known singular values 4, 2, 1, 1: exp of the entropy of (0.5, 0.25, 0.125, 0.125)
    q, _ = np.linalg.qr(rng.normal(size=(20, 4)))
    z = q @ np.diag([4.0, 2.0, 1.0, 1.0]) @ np.linalg.qr(rng.normal(size=(4, 4)))[0]
    expected = math.exp(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125)))
    assert _erank_reference(z) == pytest.approx(expected, rel=1e-12)
    assert effective_rank(torch.tensor(z, dtype=torch.float32)) == pytest.approx(expected, rel=1e-5)
    z = rng.normal(size=(30, 12))
    assert effective_rank(torch.tensor(z, dtype=torch.float32)) == pytest.approx(
        _erank_reference(z), rel=1e-5)
    assert effective_rank(torch.zeros(5, 3)) == 0.0


def test_monitors_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="embedding_std"):
        embedding_std(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="effective_rank"):
        effective_rank(torch.zeros(4))


def _simsiam(stop_gradient: bool, proj_last_bn: bool) -> tuple[float, float, float]:
    torch.manual_seed(0)
    cfg = method_cfg("simsiam", proj_hidden_dim=128, proj_output_dim=64, proj_layers=3,
                     pred_hidden_dim=32, stop_gradient=stop_gradient, proj_last_bn=proj_last_bn)
    method = build_method(cfg, TINY_BACKBONE)
    losses, embeddings = train(method, {**SGD, "lr": 0.2}, 100, warmup=0)
    z = embeddings[-1]
    return sum(losses[-10:]) / 10, embedding_std(z) * math.sqrt(z.shape[1]), effective_rank(z)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_simsiam_without_stop_gradient_collapses(one_thread: None) -> None:
    """The SimSiam paper's Fig. 2 on a toy problem, seen through both monitors.

    Without the output BN the projector output collapses towards one direction: the std of
    the normalised embeddings falls towards 0 and the loss reaches its minimum -1 (the
    trivial solution). With the stop-gradient the same model keeps its spread.
    """
    loss_c, std_c, rank_c = _simsiam(stop_gradient=False, proj_last_bn=False)
    loss_h, std_h, rank_h = _simsiam(stop_gradient=True, proj_last_bn=False)
    assert loss_c < -0.95  # the trivial minimum
    assert std_c < 0.35 and std_c < 0.5 * std_h, (std_c, std_h)
    assert std_h > 0.6, std_h
    assert rank_c < 0.5 * rank_h, (rank_c, rank_h)
    # The paper's projector ends in BN (zero mean, unit variance per dimension), so the output
    # cannot become constant: there the collapse shows as a falling effective rank.
    _, std_bn, rank_bn = _simsiam(stop_gradient=False, proj_last_bn=True)
    _, _, rank_bn_h = _simsiam(stop_gradient=True, proj_last_bn=True)
    assert std_bn > 0.6  # the std monitor is blind to it ...
    assert rank_bn < 0.5 * rank_bn_h, (rank_bn, rank_bn_h)  # ... the effective rank is not
