"""DINO, SwAV and MoCo v3 objectives against float64 transcriptions of the papers' pseudo-code
and against lightly's implementations (the ``bench`` extra) on random inputs.

The references below loop over crops, samples and prototypes in plain Python floats; they
share no code with the implementation. The DDP exactness of the three losses is in
tests/models/test_dino_swav_mocov3_ddp.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sslstream.models.objectives import (
    dino_loss,
    mocov3_loss,
    sinkhorn,
    swav_loss,
    teacher_temperature,
)
from sslstream.models.state import DINOCenter

pytestmark = pytest.mark.timeout(60)

F64 = torch.float64


def _randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).mul(scale).to(dtype)


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in t]


def _softmax(row: list[float], temp: float) -> list[float]:
    m = max(x / temp for x in row)
    e = [math.exp(x / temp - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


# ----------------------------------------------------------------------------- references


def ref_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
             tt: float, ts: float) -> float:
    """DINO Algorithm 1, H(t, s) = -sum P_t log P_s, over all (global g, crop v != g) pairs,
    each averaged over the batch, then over the pairs (official multi-crop code)."""
    c = [float(x) for x in center.flatten()]
    total, n_pairs = 0.0, 0
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            pair = 0.0
            for t_row, s_row in zip(_rows(t), _rows(s), strict=True):
                p_t = _softmax([x - ck for x, ck in zip(t_row, c, strict=True)], tt)
                p_s = _softmax(s_row, ts)
                pair += -sum(a * math.log(b) for a, b in zip(p_t, p_s, strict=True))
            total += pair / t.shape[0]
            n_pairs += 1
    return total / n_pairs


def ref_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> list[list[float]]:
    """SwAV Algorithm 1: Q = exp(scores/eps)^T / sum; rows to r = 1/K, columns to c = 1/B,
    ``iters`` times; columns normalised to 1 at the end. Returns (B, K)."""
    b, k = scores.shape
    s = _rows(scores)
    q = [[math.exp(s[i][j] / eps) for i in range(b)] for j in range(k)]  # K x B
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        for j in range(k):
            u = sum(q[j])
            q[j] = [x * (1.0 / k) / u for x in q[j]]
        for i in range(b):
            col = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] *= (1.0 / b) / col
    out = []
    for i in range(b):
        col = sum(q[j][i] for j in range(k))
        out.append([q[j][i] / col for j in range(k)])
    return out


def ref_swav(scores: list[torch.Tensor], n_global: int, temp: float, eps: float, iters: int,
             queue: list[torch.Tensor] | None = None) -> float:
    """Swapped prediction: codes of each global crop (with its queue rows as extra
    Sinkhorn columns) predicted from every other crop; mean over the global crops."""
    batch = scores[0].shape[0]
    loss = 0.0
    for g in range(n_global):
        out = scores[g] if queue is None else torch.cat([queue[g], scores[g]])
        codes = ref_sinkhorn(out, eps, iters)[-batch:]
        sub = 0.0
        for v, s in enumerate(scores):
            if v == g:
                continue
            term = 0.0
            for q_row, s_row in zip(codes, _rows(s), strict=True):
                p = _softmax(s_row, temp)
                term += -sum(a * math.log(b) for a, b in zip(q_row, p, strict=True))
            sub += term / batch
        loss += sub / (len(scores) - 1)
    return loss / n_global


def ref_mocov3(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
               temp: float) -> float:
    """MoCo v3 Algorithm 1: ctr(q, k) = 2 tau CE(q k^T / tau, range(N)) on unit vectors."""

    def unit(t: torch.Tensor) -> list[list[float]]:
        return [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in _rows(t)]

    def ctr(q: torch.Tensor, k: torch.Tensor) -> float:
        uq, uk = unit(q), unit(k)
        n = len(uq)
        total = 0.0
        for i in range(n):
            logits = [sum(a * b for a, b in zip(uq[i], uk[j], strict=True)) / temp
                      for j in range(n)]
            m = max(logits)
            total += -(logits[i] - m - math.log(sum(math.exp(x - m) for x in logits)))
        return 2 * temp * total / n

    return ctr(q1, k2) + ctr(q2, k1)


# ----------------------------------------------------------------------------- DINO


def _dino_inputs(batch: int = 3, dim: int = 7, crops: int = 4, seed: int = 0):
    student = [_randn(batch, dim, seed=seed + v, scale=2.0) for v in range(crops)]
    teacher = [_randn(batch, dim, seed=seed + 100 + g, scale=2.0) for g in range(2)]
    center = _randn(dim, seed=seed + 200, scale=0.3)
    return student, teacher, center


@pytest.mark.parametrize("crops", [2, 3, 6])
def test_dino_loss_equals_the_paper_in_float64(crops: int) -> None:
    student, teacher, center = _dino_inputs(crops=crops)
    loss, parts = dino_loss(student, teacher, center, teacher_temp=0.07, student_temp=0.1)
    assert loss.dtype == F64
    assert float(loss) == pytest.approx(ref_dino(student, teacher, center, 0.07, 0.1),
                                        rel=1e-12, abs=1e-12)
    # parts: teacher entropy (mean over teacher crops and samples) and loss - entropy
    ent = 0.0
    for t in teacher:
        for row in _rows(t):
            p = _softmax([x - float(c) for x, c in zip(row, center, strict=True)], 0.07)
            ent += -sum(a * math.log(a) for a in p)
    ent /= len(teacher) * teacher[0].shape[0]
    assert float(parts["teacher_entropy"]) == pytest.approx(ent, rel=1e-10)
    assert float(parts["kl"]) == pytest.approx(float(loss) - ent, rel=1e-10, abs=1e-12)
    assert float(parts["kl"]) >= 0.0


def test_dino_loss_gradient_reaches_the_student_only() -> None:
    student, teacher, center = _dino_inputs()
    student = [s.requires_grad_() for s in student]
    teacher = [t.requires_grad_() for t in teacher]
    dino_loss(student, teacher, center).loss.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().max() > 0 for s in student)
    small_s, small_t, small_c = _dino_inputs(batch=2, dim=4, crops=3)
    torch.autograd.gradcheck(
        lambda *s: dino_loss(list(s), small_t, small_c, teacher_temp=0.05).loss,
        tuple(s.requires_grad_() for s in small_s))


def test_dino_loss_matches_lightly() -> None:
    lightly_loss = pytest.importorskip("lightly.loss")
    dim = 32
    student = [_randn(8, dim, seed=v, scale=3.0, dtype=torch.float32) for v in range(6)]
    teacher = [_randn(8, dim, seed=50 + g, scale=3.0, dtype=torch.float32) for g in range(2)]
    center = _randn(dim, seed=99, dtype=torch.float32)
    peer = lightly_loss.DINOLoss(output_dim=dim, warmup_teacher_temp=0.04, teacher_temp=0.06,
                                 warmup_teacher_temp_epochs=3, student_temp=0.1,
                                 center_momentum=0.9)
    peer.center.copy_(center.view(1, 1, dim))
    want = peer(teacher_out=teacher, student_out=student, teacher_temp=0.06)
    got = dino_loss(student, teacher, center, teacher_temp=0.06, student_temp=0.1).loss
    torch.testing.assert_close(got, want.reshape(()), rtol=1e-5, atol=1e-6)
    # lightly's forward also moved its center: ours after one update is the same
    ours = DINOCenter(dim, momentum=0.9)
    ours.center.copy_(center.view(1, dim))
    ours.update(teacher)
    torch.testing.assert_close(ours.center, peer.center.view(1, dim), rtol=1e-6, atol=1e-7)


def test_teacher_temperature_schedule_is_the_official_linspace() -> None:
    import numpy as np

    warm, final, epochs, total = 0.04, 0.07, 30, 100
    official = np.concatenate((np.linspace(warm, final, epochs),
                               np.ones(total - epochs) * final))
    for e in range(total):
        assert teacher_temperature(e, final, warm, epochs) == pytest.approx(official[e],
                                                                             abs=1e-15)
    assert teacher_temperature(0, 0.04, 0.02, 1) == 0.02   # one warm-up epoch
    assert teacher_temperature(0, 0.04, 0.02, 0) == 0.04   # no warm-up
    with pytest.raises(ValueError, match="teacher_temp"):
        teacher_temperature(0, 0.0, 0.04, 3)


def test_dino_loss_rejects_bad_crops() -> None:
    student, teacher, center = _dino_inputs()
    with pytest.raises(ValueError, match="teacher crop"):
        dino_loss(student[:1], teacher, center)
    with pytest.raises(ValueError, match="student crop 2"):
        dino_loss([*student[:2], student[2][:, :3], student[3]], teacher, center)
    with pytest.raises(ValueError, match="center"):
        dino_loss(student, teacher, center[:3])
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss(student, teacher, center, student_temp=0.0)


# ----------------------------------------------------------------------------- SwAV


def _swav_scores(batch: int = 5, k: int = 6, crops: int = 4, seed: int = 0,
                 dtype: torch.dtype = F64) -> list[torch.Tensor]:
    prototypes = F.normalize(_randn(k, 8, seed=seed + 77), dim=1)
    return [(F.normalize(_randn(batch, 8, seed=seed + v), dim=1) @ prototypes.T).to(dtype)
            for v in range(crops)]


def test_sinkhorn_equals_the_paper_in_float64() -> None:
    scores = _swav_scores(batch=5, k=6, crops=1)[0]
    codes = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(codes, torch.tensor(ref_sinkhorn(scores, 0.05, 3), dtype=F64),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(5, dtype=F64))
    # iterated to convergence the codes are an equipartition: N / K samples per prototype
    converged = sinkhorn(scores, 0.05, 2000)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 5 / 6, dtype=F64),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("crops,n_global,with_queue", [(2, 2, False), (4, 2, False),
                                                       (5, 2, True), (3, 1, False)])
def test_swav_loss_equals_the_paper_in_float64(crops: int, n_global: int,
                                               with_queue: bool) -> None:
    scores = _swav_scores(crops=crops)
    queue = [_swav_scores(batch=4, seed=30 + g, crops=1)[0] for g in range(n_global)] \
        if with_queue else None
    loss, parts = swav_loss(scores, n_global=n_global, queue_scores=queue, temperature=0.1,
                            epsilon=0.05, iterations=3)
    want = ref_swav(scores, n_global, 0.1, 0.05, 3, queue)
    assert float(loss) == pytest.approx(want, rel=1e-11, abs=1e-12)
    assert parts == {}
    if with_queue:  # the queue changes the codes, hence the loss
        assert float(swav_loss(scores, n_global=n_global).loss) != pytest.approx(want, rel=1e-6)


def test_swav_loss_matches_lightly_with_multicrop_and_queue() -> None:
    swav_mod = pytest.importorskip("lightly.loss.swav_loss")
    scores = _swav_scores(batch=8, k=12, crops=6, dtype=torch.float32)
    queue = [_swav_scores(batch=16, k=12, seed=40 + g, crops=1, dtype=torch.float32)[0]
             for g in range(2)]
    peer = swav_mod.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    for q in (None, queue):
        want = peer(scores[:2], scores[2:], q)
        got = swav_loss(scores, n_global=2, queue_scores=q).loss
        torch.testing.assert_close(got, want.reshape(()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sinkhorn(scores[0]), swav_mod.sinkhorn(scores[0], 3, 0.05),
                               rtol=1e-5, atol=1e-7)


def test_swav_gradient_flows_through_predictions_not_codes() -> None:
    scores = _swav_scores(batch=3, k=4, crops=4)
    fixed = [s.detach() for s in scores[:2]]
    torch.autograd.gradcheck(  # locals only: the globals also feed the (constant) codes
        lambda a, b: swav_loss([*fixed, a, b]).loss,
        tuple(s.detach().clone().requires_grad_() for s in scores[2:]))
    leaves = [s.detach().clone().requires_grad_() for s in scores]
    swav_loss(leaves).loss.backward()
    assert all(t.grad is not None and t.grad.abs().max() > 0 for t in leaves)


def test_swav_rejects_bad_inputs() -> None:
    scores = _swav_scores()
    with pytest.raises(ValueError, match="n_global"):
        swav_loss(scores, n_global=5)
    with pytest.raises(ValueError, match="one tensor per global crop"):
        swav_loss(scores, queue_scores=[scores[0]])
    with pytest.raises(ValueError, match="crop 1"):
        swav_loss([scores[0], scores[1][:, :4]])
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(scores[0], iterations=0)


# ----------------------------------------------------------------------------- MoCo v3


def _moco_inputs(batch: int = 6, dim: int = 5, seed: int = 0,
                 dtype: torch.dtype = F64) -> list[torch.Tensor]:
    return [_randn(batch, dim, seed=seed + i, dtype=dtype) for i in range(4)]


@pytest.mark.parametrize("temp", [0.2, 1.0])
def test_mocov3_loss_equals_the_paper_in_float64(temp: float) -> None:
    q1, q2, k1, k2 = _moco_inputs()
    loss, parts = mocov3_loss(q1, q2, k1, k2, temp)
    assert float(loss) == pytest.approx(ref_mocov3(q1, q2, k1, k2, temp), rel=1e-12)
    assert parts == {}
    # symmetric: q1 is contrasted with k2 (not k1)
    assert float(loss) != pytest.approx(ref_mocov3(q1, q2, k2, k1, temp), rel=1e-6)
    # collapse: 2 * 2T log N
    same = torch.ones(6, 5, dtype=F64)
    assert float(mocov3_loss(same, same, same, same, temp).loss) == pytest.approx(
        4 * temp * math.log(6), rel=1e-12)


def test_mocov3_keys_get_no_gradient() -> None:
    q1, q2, k1, k2 = (t.requires_grad_() for t in _moco_inputs())
    mocov3_loss(q1, q2, k1, k2, 0.2).loss.backward()
    assert k1.grad is None and k2.grad is None
    torch.autograd.gradcheck(lambda a, b: mocov3_loss(a, b, k1, k2, 0.2).loss,
                             (q1.detach().clone().requires_grad_(),
                              q2.detach().clone().requires_grad_()))


def test_mocov3_loss_matches_lightly_ntxent_per_query() -> None:
    """lightly's NTXentLoss with a memory bank is InfoNCE against the bank; MoCo v3's ctr(q,
    k) for query i is that with k_i the positive and the other keys in the bank, scaled 2T."""
    lightly_loss = pytest.importorskip("lightly.loss")
    temp, n, dim = 0.2, 8, 16
    q1, q2, k1, k2 = _moco_inputs(batch=n, dim=dim, dtype=torch.float32)

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k = F.normalize(k, dim=1)
        total = torch.zeros(())
        for i in range(n):
            crit = lightly_loss.NTXentLoss(temperature=temp, memory_bank_size=(n - 1, dim))
            crit.memory_bank.bank.copy_(torch.cat([k[:i], k[i + 1:]]))
            total = total + crit(q[i:i + 1], k[i:i + 1])
        return 2 * temp * total / n

    want = ctr(q1, k2) + ctr(q2, k1)
    torch.testing.assert_close(mocov3_loss(q1, q2, k1, k2, temp).loss, want, rtol=1e-5,
                               atol=1e-6)


def test_mocov3_rejects_bad_inputs_and_computes_half_precision_in_fp32() -> None:
    q1, q2, k1, k2 = _moco_inputs()
    with pytest.raises(ValueError, match="mocov3_loss"):
        mocov3_loss(q1, q2, k1, k2[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        mocov3_loss(q1, q2, k1, k2, 0.0)
    half = [t.to(torch.bfloat16) for t in (q1, q2, k1, k2)]
    assert mocov3_loss(*half).loss.dtype == torch.float32
    assert dino_loss(half[:3], half[:2], torch.zeros(5)).loss.dtype == torch.float32
    assert swav_loss([h.clamp(-1, 1) for h in half]).loss.dtype == torch.float32
