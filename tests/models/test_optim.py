"""LARS against an independent float64 reference, warmup-cosine against its formula, lr scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sslstream.models.optim import LARS, WarmupCosine, build_optimizer, scale_lr


def _lars_reference(w: np.ndarray, g: np.ndarray, buf: np.ndarray | None, *, lr: float,
                    momentum: float, wd: float, eta: float, exclude: bool,
                    clip: bool = False, form: str = "paper") -> tuple[np.ndarray, np.ndarray]:
    """One LARS step in float64 numpy: ``paper`` is You et al. Eq. 6 as solo-learn's lars.py
    writes it (eta |w| / (|g| + wd |w| + 1e-8)); ``update`` is the official VICReg code
    (eta |w| / |g + wd w|)."""
    if exclude:
        d = g.copy()
    else:
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        d = g + wd * w
        if form == "paper":
            trust = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
        else:
            trust = eta * w_norm / np.linalg.norm(d)
        if clip:
            trust = min(trust / lr, 1.0)
        d = trust * d
    buf = d if buf is None else momentum * buf + d
    return w - lr * buf, buf


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    c = rng.normal(size=3)
    w0, b0 = rng.normal(size=(3, 4)), rng.normal(size=3)

    def grads(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # L = 0.5 ||W X - Y||^2 + 0.5 ||b - c||^2
        return (w @ x - y) @ x.T, b - c

    def torch_loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((w @ torch.from_numpy(x) - torch.from_numpy(y)) ** 2).sum() + 0.5 * (
            (b - torch.from_numpy(c)) ** 2).sum()

    return w0, b0, grads, torch_loss


@pytest.mark.parametrize("form", ["paper", "update"])
@pytest.mark.parametrize("clip", [False, True])
def test_lars_matches_reference_update(clip: bool, form: str) -> None:
    w0, b0, grads, torch_loss = _problem()
    w = torch.tensor(w0, requires_grad=True)
    b = torch.tensor(b0, requires_grad=True)
    lrs = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    # wd large enough that the two trust-ratio forms differ visibly
    hp = dict(momentum=0.9, wd=0.5, eta=0.02)
    opt = LARS([{"params": [w], "lars_exclude": False}, {"params": [b], "lars_exclude": True}],
               lr=lrs[0], momentum=hp["momentum"], weight_decay=hp["wd"], eta=hp["eta"], clip=clip,
               trust_ratio=form)
    rw, rb, bw, bb = w0.copy(), b0.copy(), None, None
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        torch_loss(w, b).backward()
        opt.step()
        gw, gb = grads(rw, rb)
        rw, bw = _lars_reference(rw, gw, bw, lr=lr, exclude=False, clip=clip, form=form, **hp)
        rb, bb = _lars_reference(rb, gb, bb, lr=lr, exclude=True, clip=clip, form=form, **hp)
        np.testing.assert_allclose(w.detach().numpy(), rw, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b.detach().numpy(), rb, rtol=1e-10, atol=1e-12)
    # the trust ratio really acted: plain SGD momentum would have moved w differently
    sgd_w = torch.tensor(w0, requires_grad=True)
    sgd = torch.optim.SGD([sgd_w], lr=lrs[0], momentum=0.9, weight_decay=hp["wd"])
    for lr in lrs:
        sgd.param_groups[0]["lr"] = lr
        sgd.zero_grad()
        torch_loss(sgd_w, torch.tensor(b0)).backward()
        sgd.step()
    assert not np.allclose(sgd_w.detach().numpy(), rw, atol=1e-3)
    # and the other trust-ratio form would have moved w differently too
    other = "update" if form == "paper" else "paper"
    ow, obuf = w0.copy(), None
    for lr in lrs:
        ow, obuf = _lars_reference(ow, grads(ow, b0)[0], obuf, lr=lr, exclude=False, clip=clip,
                                   form=other, **hp)
    assert not np.allclose(ow, rw, rtol=1e-6, atol=1e-8)


def test_lars_trust_ratio_is_one_for_zero_weights() -> None:
    w = torch.zeros(3, 3, requires_grad=True)
    opt = LARS([w], lr=0.1, momentum=0.0, weight_decay=0.5, eta=0.001)
    w.grad = torch.ones(3, 3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1))


def test_build_optimizer_lars_groups_scaling_and_exclusion() -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4))
    p = torch.nn.Parameter(torch.randn(4, 4))
    groups = [
        {"name": "enc", "params": [w], "lars_exclude": False},
        {"name": "enc/bias_norm", "params": [b], "lars_exclude": True, "lr_mult": 0.5},
        {"name": "pred", "params": [p], "lars_exclude": False, "fixed_lr": True},
    ]
    cfg = {"name": "lars", "lr": 0.3, "base_batch": 256, "scaling": "linear",
           "weight_decay": 1e-6, "momentum": 0.9, "eta": 0.001}
    opt = build_optimizer(groups, cfg, global_batch_size=1024)
    assert isinstance(opt, LARS)
    assert {g["trust_ratio"] for g in opt.param_groups} == {"paper"}
    upd = build_optimizer(groups, {**cfg, "trust_ratio": "update"}, 1024)
    assert {g["trust_ratio"] for g in upd.param_groups} == {"update"}
    with pytest.raises(ValueError, match="optim.trust_ratio"):
        build_optimizer(groups, {**cfg, "trust_ratio": "both"}, 1024)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([1.2, 0.6, 1.2])
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0, 1e-6]
    assert [g["fixed_lr"] for g in opt.param_groups] == [False, False, True]
    assert opt.param_groups[1]["lars_exclude"] is True

    sgd = build_optimizer(groups, {"name": "sgd", "lr": 0.05, "weight_decay": 1e-4}, 512)
    assert isinstance(sgd, torch.optim.SGD)
    # MoCo / SimSiam decay every parameter unless asked otherwise
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 1e-4, 1e-4]
    adamw = build_optimizer(groups, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                                     "exclude_bias_and_norm_wd": True}, 256)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0, 0.05]
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(groups, {"name": "adagrad", "lr": 0.1}, 256)
    with pytest.raises(ValueError, match=r"optim\.lr=-1 is not allowed: expected a number >= 0"):
        build_optimizer(groups, {"name": "sgd", "lr": -1}, 256)
    # a key left out takes the optimiser's default (the dataclass's: models/optim.py)
    assert build_optimizer(groups, {"name": "sgd"}, 256).param_groups[0]["lr"] == 0.05


def test_scale_lr_rules() -> None:
    assert scale_lr(0.3, 4096) == pytest.approx(4.8)
    assert scale_lr(0.3, 4096, "sqrt") == pytest.approx(0.3 * 4.0)
    assert scale_lr(0.3, 4096, "none") == 0.3
    assert scale_lr(0.05, 512, "linear", base_batch=256) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.scaling"):
        scale_lr(0.1, 256, "cubic")


def _expected_factor(k: int, warmup: int, total: int, start: float, final: float) -> float:
    if k < warmup:
        return start + (1 - start) * (k + 1) / warmup
    if k >= total:
        return final
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))


@pytest.mark.parametrize(("start", "final"), [(0.0, 0.0), (0.1, 0.001)])
def test_warmup_cosine_values_and_fixed_lr_group(start: float, final: float) -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.4}, {"params": [b], "lr": 0.1,
                                                        "fixed_lr": True}], lr=0.4)
    sched = WarmupCosine(opt, 5, 20, warmup_start_ratio=start, final_lr_ratio=final)
    for k in range(25):
        expected = 0.4 * _expected_factor(k, 5, 20, start, final)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), k
        assert opt.param_groups[1]["lr"] == 0.1
        opt.step()
        sched.step()


def test_warmup_cosine_resumes_from_state_dict() -> None:
    def make() -> tuple[torch.optim.Optimizer, WarmupCosine]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        return opt, WarmupCosine(opt, 3, 12)

    opt, sched = make()
    for _ in range(7):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for _ in range(6):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()


def test_warmup_cosine_rejects_bad_steps() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(opt, 30, 20)


def test_warmup_cosine_endpoints() -> None:
    """The values a run actually sees at its ends: no step at lr 0, the peak reached at the
    end of warmup, the cosine at (T-1-W)/(T-W) on the last step (as solo-learn's / pl_bolts'
    closed form), the floor after the end."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = WarmupCosine(opt, 4, 10, final_lr_ratio=0.01)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.5)  # first step: base / W, not 0
    assert seen[3] == pytest.approx(2.0) and seen[4] == pytest.approx(2.0)  # peak
    assert all(a >= b for a, b in zip(seen[4:], seen[5:], strict=False))  # then decays
    assert seen[9] == pytest.approx(0.02 + 1.98 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert seen[10] == seen[11] == pytest.approx(0.02)  # past the end: the floor


def test_lars_mixed_dtypes_in_one_group() -> None:
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4, dtype=torch.float64)
    ref_a, ref_b = a.detach().clone(), b.detach().clone()
    LARS([a, b], lr=0.1, weight_decay=0.01, eta=0.02).step()
    for p, w in ((a, ref_a), (b, ref_b)):
        g = p.grad.double()
        w64 = w.double()
        q = 0.02 * w64.norm() / (g.norm() + 0.01 * w64.norm() + 1e-8)
        torch.testing.assert_close(p.detach().double(), w64 - 0.1 * q * (g + 0.01 * w64),
                                   rtol=1e-5, atol=1e-6)


def _dino_wd_schedule(base: float, end: float, total: int) -> list[float]:
    """facebookresearch/dino utils.cosine_scheduler(base, end, epochs, niter_per_ep) without
    warmup, written out in float64: end + (base - end)(1 + cos(pi i / T)) / 2 for i < T."""
    return [end + 0.5 * (base - end) * (1 + math.cos(math.pi * i / total)) for i in range(total)]


def test_weight_decay_schedule_is_dinos_cosine_on_decayed_groups_only() -> None:
    """optim.weight_decay_end: the decayed group follows DINO's wd_schedule step by step
    (AdamW really applies it), the bias/norm group keeps none, and a resumed run continues
    on the same values."""
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    groups = [{"params": [w], "lars_exclude": False}, {"params": [b], "lars_exclude": True}]
    cfg = {"name": "adamw", "lr": 0.0, "weight_decay": 0.04, "weight_decay_end": 0.4}
    opt = build_optimizer(groups, cfg, 256)
    sched = WarmupCosine(opt, 0, 10, weight_decay_end=0.4)
    expected = _dino_wd_schedule(0.04, 0.4, 10)
    seen = []
    for _ in range(12):
        seen.append((opt.param_groups[0]["weight_decay"], opt.param_groups[1]["weight_decay"]))
        opt.step()
        sched.step()
    assert [s[0] for s in seen[:10]] == pytest.approx(expected, rel=1e-12)
    assert seen[10][0] == seen[11][0] == pytest.approx(0.4)  # past the end: the final value
    assert all(s[1] == 0.0 for s in seen)
    # without weight_decay_end the decay stays as built
    opt = build_optimizer(groups, {**cfg, "weight_decay_end": None}, 256)
    sched = WarmupCosine(opt, 0, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["weight_decay"] == 0.04


def test_weight_decay_schedule_moves_the_weights_and_resumes_exactly() -> None:
    """AdamW's decoupled decay uses the scheduled value: at lr 0.1 and zero gradients each
    step multiplies the weights by (1 - lr_k * wd_k); a scheduler restored from state_dict
    (with the optimizer's) continues with the same values."""
    def make() -> tuple[torch.nn.Parameter, torch.optim.Optimizer, WarmupCosine]:
        p = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
        opt = build_optimizer([{"params": [p]}], {"name": "adamw", "lr": 0.1,
                                                   "weight_decay": 0.04}, 256)
        return p, opt, WarmupCosine(opt, 2, 8, weight_decay_end=0.4)

    p, opt, sched = make()
    scale = 1.0
    for k in range(8):
        lr, wd = opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
        assert wd == pytest.approx(_dino_wd_schedule(0.04, 0.4, 8)[k], rel=1e-12)
        scale *= 1 - lr * wd
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
        if k == 3:
            saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), scale, dtype=torch.float64))
    _, opt2, sched2 = make()
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["weight_decay"] == pytest.approx(_dino_wd_schedule(0.04, 0.4, 8)[4])
    sched2.step()
    assert opt2.param_groups[0]["weight_decay"] == pytest.approx(_dino_wd_schedule(0.04, 0.4, 8)[5])
