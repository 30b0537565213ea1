"""Single-process tests of models/objectives against independent float64 references.

The references below are written from the papers' formulas with explicit loops over samples,
pairs and dimensions (no vectorised shortcuts shared with the implementation), so a wrong
normalisation, a missing 1/2, a biased/unbiased variance mix-up or a wrong negative set in the
implementation makes them disagree.
"""

from __future__ import annotations

import math

import pytest
import torch
from sslstream.models.objectives import (
    barlow_twins_loss,
    byol_loss,
    contrastive_margin,
    info_nce,
    nt_xent,
    simsiam_loss,
    vicreg_loss,
)

pytestmark = pytest.mark.timeout(60)

F64 = torch.float64


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


# ----------------------------------------------------------------------------- references


def _norm(v: torch.Tensor) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in v))


def _unit(v: torch.Tensor) -> list[float]:
    n = _norm(v)
    return [float(x) / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    n = z1.shape[0]
    emb = [_unit(z1[i]) for i in range(n)] + [_unit(z2[i]) for i in range(n)]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        den = sum(math.exp(_dot(emb[a], emb[b]) / t) for b in range(2 * n) if b != a)
        total += -math.log(math.exp(_dot(emb[a], emb[pos]) / t) / den)
    return total / (2 * n)


def ref_contrastive(z1: torch.Tensor, z2: torch.Tensor, m: float, normalize: bool = True) -> float:
    n = z1.shape[0]

    def prep(v: torch.Tensor) -> list[float]:
        return _unit(v) if normalize else [float(x) for x in v]

    emb = [(i, prep(z1[i])) for i in range(n)] + [(i, prep(z2[i])) for i in range(n)]
    pos = sum(0.5 * _dist(prep(z1[i]), prep(z2[i])) ** 2 for i in range(n)) / n
    neg, count = 0.0, 0
    for a in range(2 * n):
        for b in range(a + 1, 2 * n):
            if emb[a][0] == emb[b][0]:
                continue  # same image: the positive pair
            neg += 0.5 * max(0.0, m - _dist(emb[a][1], emb[b][1])) ** 2
            count += 1
    assert count == 2 * n * (n - 1)
    return pos + (neg / count if count else 0.0)


def ref_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        qi = _unit(q[i])
        logits = [_dot(qi, _unit(k[i])) / t] + [
            _dot(qi, _unit(queue[j])) / t for j in range(queue.shape[0])
        ]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return total / q.shape[0]


def ref_byol(p: torch.Tensor, z: torch.Tensor) -> float:
    n = p.shape[0]
    return sum(_dist(_unit(p[i]), _unit(z[i])) ** 2 for i in range(n)) / n


def ref_simsiam(p: torch.Tensor, z: torch.Tensor) -> float:
    n = p.shape[0]
    return (
        -sum(
            _dot([float(x) for x in p[i]], [float(x) for x in z[i]]) / (_norm(p[i]) * _norm(z[i]))
            for i in range(n)
        )
        / n
    )


def _column_stats(x: torch.Tensor, d: int) -> tuple[float, float, float]:
    """mean, unbiased variance, biased variance of column d."""
    n = x.shape[0]
    col = [float(x[i, d]) for i in range(n)]
    mean = sum(col) / n
    ss = sum((c - mean) ** 2 for c in col)
    return mean, ss / (n - 1), ss / n


def ref_vicreg(
    x: torch.Tensor, y: torch.Tensor, lam: float, mu: float, nu: float, eps: float = 1e-4
) -> tuple[float, float, float, float]:
    n, dim = x.shape
    inv = sum((float(x[i, d]) - float(y[i, d])) ** 2 for i in range(n) for d in range(dim)) / (
        n * dim
    )
    var = 0.0
    cov = 0.0
    for z in (x, y):
        stats = [_column_stats(z, d) for d in range(dim)]
        var += sum(max(0.0, 1.0 - math.sqrt(s[1] + eps)) for s in stats) / dim / 2
        for d in range(dim):
            for e in range(dim):
                if d == e:
                    continue
                c = sum(
                    (float(z[i, d]) - stats[d][0]) * (float(z[i, e]) - stats[e][0])
                    for i in range(n)
                ) / (n - 1)
                cov += c * c / dim
    return lam * inv + mu * var + nu * cov, inv, var, cov


def ref_barlow(
    x: torch.Tensor, y: torch.Tensor, lambd: float, eps: float = 1e-5
) -> tuple[float, float, float]:
    n, dim = x.shape

    def standardised(z: torch.Tensor) -> list[list[float]]:
        out = [[0.0] * dim for _ in range(n)]
        for d in range(dim):
            mean, _, var_b = _column_stats(z, d)
            for i in range(n):
                out[i][d] = (float(z[i, d]) - mean) / math.sqrt(var_b + eps)
        return out

    a, b = standardised(x), standardised(y)
    on, off = 0.0, 0.0
    for i in range(dim):
        for j in range(dim):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            if i == j:
                on += (1 - c) ** 2
            else:
                off += c * c
    return on + lambd * off, on, off


# ----------------------------------------------------------------------------- value tests


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_nt_xent_matches_reference(temperature: float) -> None:
    z1, z2 = _randn(5, 4, seed=1), _randn(5, 4, seed=2)
    got, _ = nt_xent(z1, z2, temperature)
    assert got.dtype == F64 and got.ndim == 0
    assert float(got) == pytest.approx(ref_nt_xent(z1, z2, temperature), rel=1e-12, abs=1e-12)


def test_nt_xent_invariances_and_edge_cases() -> None:
    z1, z2 = _randn(6, 5, seed=3), _randn(6, 5, seed=4)
    # cosine similarity: per-row positive rescaling changes nothing
    scale = torch.rand(6, 1, dtype=F64) * 5 + 0.1
    assert float(nt_xent(z1 * scale, z2, 0.3).loss) == pytest.approx(
        float(nt_xent(z1, z2, 0.3).loss), rel=1e-12
    )
    # collapse: all similarities equal, loss = log(2N - 1) whatever the temperature
    same = torch.ones(6, 5, dtype=F64)
    for t in (0.05, 0.5, 5.0):
        assert float(nt_xent(same, same, t).loss) == pytest.approx(math.log(11), rel=1e-12)
    # a single image has no negatives: the positive is the only candidate
    assert float(nt_xent(z1[:1], z2[:1]).loss) == pytest.approx(0.0, abs=1e-12)
    # perfectly separated (one-hot views identical, images orthogonal): lower T, lower loss
    eye = torch.eye(4, dtype=F64)
    losses = [float(nt_xent(eye, eye, t).loss) for t in (1.0, 0.5, 0.1)]
    assert losses[0] > losses[1] > losses[2] > 0
    assert losses[2] == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + 6)), rel=1e-12)


@pytest.mark.parametrize("margin", [0.5, 1.0, 1.7])
def test_contrastive_margin_matches_reference(margin: float) -> None:
    z1, z2 = _randn(5, 4, seed=5), _randn(5, 4, seed=6)
    got, _ = contrastive_margin(z1, z2, margin)
    assert float(got) == pytest.approx(ref_contrastive(z1, z2, margin), rel=1e-12, abs=1e-14)


def test_contrastive_margin_unnormalised_matches_reference() -> None:
    z1, z2 = _randn(4, 3, seed=7, scale=0.5), _randn(4, 3, seed=8, scale=0.5)
    got, _ = contrastive_margin(z1, z2, 2.0, normalize=False)
    assert float(got) == pytest.approx(ref_contrastive(z1, z2, 2.0, normalize=False), rel=1e-12)


def test_contrastive_margin_edge_cases() -> None:
    z = _randn(5, 4, seed=9)
    # identical views: positive term 0, the loss is the negative term alone
    ref_neg_only = ref_contrastive(z, z, 1.5)
    assert float(contrastive_margin(z, z, 1.5).loss) == pytest.approx(ref_neg_only, rel=1e-12)
    # orthogonal images (distance sqrt 2): beyond a margin of 1 nothing is pushed
    eye = torch.eye(4, dtype=F64)
    assert float(contrastive_margin(eye, eye, 1.0).loss) == 0.0
    # ... within a margin of 2 every negative pays 1/2 (2 - sqrt 2)^2
    assert float(contrastive_margin(eye, eye, 2.0).loss) == pytest.approx(
        0.5 * (2 - math.sqrt(2)) ** 2, rel=1e-12
    )
    # larger margin never lowers the loss
    z1, z2 = _randn(5, 4, seed=10), _randn(5, 4, seed=11)
    values = [float(contrastive_margin(z1, z2, m).loss) for m in (0.25, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    # one image: no negatives, positive term only
    assert float(contrastive_margin(z1[:1], z2[:1]).loss) == pytest.approx(
        ref_contrastive(z1[:1], z2[:1], 1.0), rel=1e-12
    )
    # coincident negatives (collapse) give a finite gradient
    same = torch.ones(3, 4, dtype=F64, requires_grad=True)
    contrastive_margin(same, same.detach().clone(), 1.0, normalize=False).loss.backward()
    assert torch.isfinite(same.grad).all()


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(temperature: float) -> None:
    q, k, queue = _randn(4, 5, seed=12), _randn(4, 5, seed=13), _randn(7, 5, seed=14)
    got, _ = info_nce(q, k, queue, temperature)
    assert float(got) == pytest.approx(ref_info_nce(q, k, queue, temperature), rel=1e-12)


def test_info_nce_edge_cases() -> None:
    eye = torch.eye(6, dtype=F64)
    q, queue = eye[:2], eye[2:]
    # positive aligned, queue orthogonal: loss = log(1 + K e^{-1/T})
    for t in (0.1, 0.2, 1.0):
        want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 4))
        assert float(info_nce(q, q.clone(), queue, t).loss) == pytest.approx(want, rel=1e-12)
    # everything orthogonal: all logits 0, loss = log(K + 1) for any temperature
    assert float(info_nce(q, eye[4:6], eye[2:4], 0.07).loss) == pytest.approx(math.log(3), rel=1e-12)
    # empty queue: only the positive
    assert float(info_nce(q, eye[4:6], eye[:0], 0.2).loss) == pytest.approx(0.0, abs=1e-12)
    # keys and queue get no gradient
    qg, kg, qu = (_randn(3, 5, seed=s).requires_grad_() for s in (15, 16, 17))
    info_nce(qg, kg, qu).loss.backward()
    assert qg.grad is not None and kg.grad is None and qu.grad is None
    with pytest.raises(ValueError, match=r"queue must be \(K, 5\)"):
        info_nce(qg, kg, torch.zeros(5, 7, dtype=F64))


def test_byol_and_simsiam_match_reference_and_edge_cases() -> None:
    p, z = _randn(6, 4, seed=18), _randn(6, 4, seed=19)
    assert float(byol_loss(p, z).loss) == pytest.approx(ref_byol(p, z), rel=1e-12)
    assert float(simsiam_loss(p, z).loss) == pytest.approx(ref_simsiam(p, z), rel=1e-12)
    # identical direction / orthogonal / opposite
    assert float(byol_loss(p, 3 * p).loss) == pytest.approx(0.0, abs=1e-12)
    assert float(simsiam_loss(p, 3 * p).loss) == pytest.approx(-1.0, rel=1e-12)
    eye = torch.eye(4, dtype=F64)
    assert float(byol_loss(eye, eye.roll(1, dims=1)).loss) == pytest.approx(2.0, rel=1e-12)
    assert float(simsiam_loss(eye, eye.roll(1, dims=1)).loss) == pytest.approx(0.0, abs=1e-12)
    assert float(byol_loss(p, -p).loss) == pytest.approx(4.0, rel=1e-12)


def test_stop_gradients() -> None:
    p, z = _randn(4, 3, seed=20).requires_grad_(), _randn(4, 3, seed=21).requires_grad_()
    byol_loss(p, z).loss.backward()
    assert p.grad is not None and z.grad is None
    p.grad = None
    simsiam_loss(p, z).loss.backward()
    assert p.grad is not None and z.grad is None
    simsiam_loss(p, z, stop_gradient=False).loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vicreg_matches_official_form() -> None:
    x, y = _randn(6, 4, seed=22, scale=0.7), _randn(6, 4, seed=23, scale=1.3)
    loss, parts = vicreg_loss(x, y, 25.0, 25.0, 1.0)
    want, inv, var, cov = ref_vicreg(x, y, 25.0, 25.0, 1.0)
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(parts["invariance"]) == pytest.approx(inv, rel=1e-12)
    assert float(parts["variance"]) == pytest.approx(var, rel=1e-12)
    assert float(parts["covariance"]) == pytest.approx(cov, rel=1e-12)
    assert var > 0  # the hinge is active for the 0.7-scaled branch: the term is exercised
    assert float(vicreg_loss(x, y, 2.0, 3.0, 0.5).loss) == pytest.approx(
        ref_vicreg(x, y, 2.0, 3.0, 0.5)[0], rel=1e-12
    )
    assert not parts["variance"].requires_grad


def test_vicreg_edge_cases() -> None:
    x = _randn(8, 3, seed=24)
    _, parts = vicreg_loss(x, x.clone())
    assert float(parts["invariance"]) == 0.0
    # collapse: zero variance, the hinge pays 1 - sqrt(eps) per branch (halved, summed)
    const = torch.ones(8, 3, dtype=F64)
    _, parts = vicreg_loss(const, const)
    assert float(parts["variance"]) == pytest.approx(1 - math.sqrt(1e-4), rel=1e-12)
    assert float(parts["covariance"]) == 0.0
    # whitened, decorrelated, unit-variance batch: variance and covariance terms vanish
    eye = torch.eye(4, dtype=F64)
    white = torch.cat([eye, -eye]) * math.sqrt(7 / 2)  # unbiased var = 1, off-diag cov = 0
    _, parts = vicreg_loss(white, white)
    assert float(parts["covariance"]) == pytest.approx(0.0, abs=1e-24)
    assert float(parts["variance"]) == 0.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(x[:1], x[:1])


def test_barlow_twins_matches_reference() -> None:
    x, y = _randn(7, 4, seed=25), _randn(7, 4, seed=26, scale=3.0)
    for lambd in (0.0051, 0.5):
        loss, parts = barlow_twins_loss(x, y, lambd)
        want, on, off = ref_barlow(x, y, lambd)
        assert float(loss) == pytest.approx(want, rel=1e-12)
        assert float(parts["on_diag"]) == pytest.approx(on, rel=1e-12)
        assert float(parts["off_diag"]) == pytest.approx(off, rel=1e-12)


def test_barlow_twins_edge_cases() -> None:
    x = _randn(16, 5, seed=27)
    # identical views: C_ii = var / (var + eps), so the diagonal term is ~0
    _, parts = barlow_twins_loss(x, 2 * x + 1)
    assert float(parts["on_diag"]) < 1e-8
    # independent views: the diagonal is far from 1
    _, parts = barlow_twins_loss(x, _randn(16, 5, seed=28))
    assert float(parts["on_diag"]) > 1.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        barlow_twins_loss(x[:1], x[:1])


# ----------------------------------------------------------------------------- gradients


# name -> (loss of (a, b), whether b gets gradient: stop-gradient inputs are held constant)
GRADCHECK_CASES = {
    "nt_xent": (lambda a, b: nt_xent(a, b, 0.3).loss, True),
    "contrastive_margin": (lambda a, b: contrastive_margin(a, b, 1.5).loss, True),
    "contrastive_margin_raw": (
        lambda a, b: contrastive_margin(a, b, 3.0, normalize=False).loss, True),
    "vicreg": (lambda a, b: vicreg_loss(a * 0.7, b).loss, True),
    "barlow": (lambda a, b: barlow_twins_loss(a, b, 0.1).loss, True),
    "simsiam_no_stop": (lambda a, b: simsiam_loss(a, b, stop_gradient=False).loss, True),
    "byol": (lambda a, b: byol_loss(a, b).loss, False),
    "simsiam": (lambda a, b: simsiam_loss(a, b).loss, False),
    "info_nce": (lambda a, b: info_nce(a, b, torch.eye(4, 3, dtype=F64) + 0.1, 0.2).loss, False),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck(name: str) -> None:
    fn, both = GRADCHECK_CASES[name]
    a = _randn(5, 3, seed=30).requires_grad_()
    b = _randn(5, 3, seed=31).requires_grad_(both)
    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- contracts


def test_low_precision_inputs_are_computed_in_float32() -> None:
    z1, z2 = _randn(8, 6, seed=32).float(), _randn(8, 6, seed=33).float()
    for fn in (
        nt_xent,
        contrastive_margin,
        vicreg_loss,
        barlow_twins_loss,
        byol_loss,
        simsiam_loss,
    ):
        low, _ = fn(z1.bfloat16(), z2.bfloat16())
        assert low.dtype == torch.float32, fn.__name__
        full, _ = fn(z1.bfloat16().float(), z2.bfloat16().float())  # same rounded inputs
        assert float(low) == pytest.approx(float(full), rel=1e-6), fn.__name__
    queue = _randn(5, 6, seed=34).float()
    low, _ = info_nce(z1.bfloat16(), z2.bfloat16(), queue.bfloat16())
    assert low.dtype == torch.float32
    full, _ = info_nce(z1.bfloat16().float(), z2.bfloat16().float(), queue.bfloat16().float())
    assert float(low) == pytest.approx(float(full), rel=1e-6)
    # under autocast float32 inputs would go through bf16 matmuls: every loss must switch
    # autocast off and give its float32 value
    fns = (nt_xent, contrastive_margin, vicreg_loss, barlow_twins_loss, byol_loss,
           simsiam_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [fn(z1, z2).loss for fn in fns] + [info_nce(z1, z2, queue).loss]
    refs = [fn(z1, z2).loss for fn in fns] + [info_nce(z1, z2, queue).loss]  # autocast off
    for fn, out, ref in zip([*fns, info_nce], outs, refs, strict=True):
        assert out.dtype == torch.float32, fn.__name__
        assert float(out) == pytest.approx(float(ref), rel=1e-6), fn.__name__


def test_bad_inputs_name_the_problem() -> None:
    z = torch.zeros(4, 3)
    with pytest.raises(
        ValueError, match=r"nt_xent: inputs must have the same shape.*\(4, 3\) and \(5, 3\)"
    ):
        nt_xent(z, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="nt_xent: temperature must be > 0"):
        nt_xent(z, z, 0.0)
    with pytest.raises(ValueError, match="contrastive_margin: margin must be > 0"):
        contrastive_margin(z, z, -1.0)
    with pytest.raises(ValueError, match=r"vicreg_loss: first input must be 2-D"):
        vicreg_loss(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="byol_loss: first input must be floating point"):
        byol_loss(torch.zeros(4, 3, dtype=torch.long), z)
