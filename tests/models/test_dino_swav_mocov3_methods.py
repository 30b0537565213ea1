"""DINO, SwAV and MoCo v3 at the method level: ``training_step`` equals the papers' loss
recomputed in float64 from the method's own networks, run the way the official code runs
them, and the epoch schedules, frozen layers and state behave as the papers say.

The losses here are the float64 transcriptions of tests/models/test_objectives_dino_swav_mocov3.py
(plain Python loops, no code shared with models/objectives/); what this file adds is the
wiring: which crops reach the student and which the teacher, the backbone called once per
crop size (DINO's ``MultiCropWrapper``, SwAV's ``idx_crops``), the center the loss reads
and how it moves, the teacher temperature of each epoch, the queue's start and contents,
the first epoch(s) without last-layer / prototype updates, and the EMA of the momentum
networks. Networks run in train mode (batch statistics), as in training.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sslstream.models.methods import Method, MethodConfigError, build_method
from sslstream.models.methods.dino import DINO
from sslstream.models.methods.mocov3 import MoCoV3
from sslstream.models.methods.swav import SwAV

from tests.models.test_objectives_dino_swav_mocov3 import ref_dino, ref_mocov3, ref_swav
from tests.models.test_training_toy import SMALL_HEADS, TINY_BACKBONE, method_cfg, one_thread

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]
__all__ = ["one_thread"]  # the fixture, imported so pytest finds it here

B, SIZE, LOCAL = 4, 16, 8  # batch, global and local crop sides
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _build(name: str, backbone: dict | None = None, **extra: object) -> Method:
    torch.manual_seed(0)
    method = build_method(method_cfg(name, **SMALL_HEADS, **extra), backbone or TINY_BACKBONE)
    method.double().train()
    if isinstance(method, SwAV):  # unit rows in float64, as after any optimizer step
        method.prototypes.normalize_()
    return method


def _views(local_crops: int = 0, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sides = [SIZE, SIZE] + [LOCAL] * local_crops
    return [torch.randn(B, 3, s, s, generator=g, dtype=torch.float64) for s in sides]


def _loss(method: Method, views: list[torch.Tensor]) -> float:
    return float(method.training_step(views)[0].detach())


def _by_size(network: torch.nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """The official multi-crop forward, written out: the globals in one batch, the locals in
    another, outputs in crop order."""
    globals_, locals_ = torch.cat(views[:2]), views[2:]
    out = [network(globals_)] + ([network(torch.cat(locals_))] if locals_ else [])
    return torch.cat(out)


def _ema_reference(method: Method, online: list[torch.nn.Module], steps: int, total: int,
                   tau_base: float) -> None:
    """After each optimizer step (here: a random move of the online weights), the target is
    ``tau_k target + (1 - tau_k) online`` with BYOL's cosine ``tau_k`` (k = updates done)."""
    params = list(itertools.chain.from_iterable(m.parameters() for m in online))
    (pair,) = method.momentum_pairs
    target = list(pair.target.target.parameters())
    assert len(target) == len(params)
    ref = [t.detach().clone() for t in target]
    g = torch.Generator().manual_seed(3)
    for k in range(steps):
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        tau = 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / total) + 1.0) / 2.0
        ref = [tau * r + (1.0 - tau) * p.detach() for r, p in zip(ref, params, strict=True)]
        method.after_optimizer_step(k + 1, total)
        for got, want in zip(target, ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------- DINO


def test_dino_step_is_the_papers_loss_with_centering_and_the_teacher_temperature_warmup() -> None:
    """Two global + two local crops over four epochs of a 3-epoch warm-up 0.04 -> 0.07: the
    student sees every crop, the teacher the globals only; each step's loss is H(teacher
    centred by the center before the step, student) at np.linspace's temperature of its
    epoch (main_dino.py), and the center then moves to 0.9 c + 0.1 mean(teacher)."""
    method = _build("dino", out_dim=32, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=3)
    assert isinstance(method, DINO)
    views = _views(local_crops=2)
    with torch.no_grad():
        student = method.head(_by_size(method.backbone, views)).split(B)
        teacher = method.momentum.target(torch.cat(views[:2])).split(B)
    seen: list[tuple[int, ...]] = []
    hook = method.momentum.target.register_forward_hook(
        lambda _m, inp, _out: seen.append(tuple(inp[0].shape)))
    temps = [*np.linspace(0.04, 0.07, 3), 0.07]  # the official teacher_temp_schedule
    for epoch, temp in enumerate(temps):
        method.set_epoch(epoch)
        center = method.center.center.clone()
        loss, metrics = method.training_step(views)
        want = ref_dino(list(student), list(teacher), center, float(temp), 0.1)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-9), epoch
        assert metrics["teacher_temp"] == pytest.approx(float(temp), rel=1e-12)
        mean = torch.cat(teacher).mean(dim=0, keepdim=True)
        torch.testing.assert_close(method.center.center, 0.9 * center + 0.1 * mean, **TOL)
        # the embedding the collapse monitors see: the first global crop's bottleneck
        with torch.no_grad():
            bottleneck = method.head.bottleneck(_by_size(method.backbone, views))
        torch.testing.assert_close(metrics["embeddings"], bottleneck[:B], **TOL)
    hook.remove()
    assert seen == [(2 * B, 3, SIZE, SIZE)] * len(temps)  # the globals only, in one batch
    assert method.center.center.abs().max() > 1e-3  # a real center was subtracted
    # the loss depends on the center and the temperature: the checks above can fail
    assert ref_dino(list(student), list(teacher), torch.zeros(1, 32), 0.07, 0.1) != \
        pytest.approx(ref_dino(list(student), list(teacher), method.center.center, 0.07, 0.1))


def test_dino_last_layer_is_frozen_in_the_first_epoch_only() -> None:
    """main_dino.py ``cancel_gradients_last_layer``: in epoch < freeze_last_layer_epochs
    the last layer gets no gradient, so an SGD step with momentum and weight decay leaves
    it bit for bit; the rest of the student trains; from the next epoch on it trains too.
    The weight norm's g stays 1 throughout (``norm_last_layer``)."""
    method = _build("dino", out_dim=32, freeze_last_layer_epochs=1)
    opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    last = method.head.last_layer
    views = _views(local_crops=1)
    for epoch in (0, 0, 1):
        before = {k: v.clone() for k, v in method.head.state_dict().items()}
        backbone_before = [p.clone() for p in method.backbone.parameters()]
        method.set_epoch(epoch)
        opt.zero_grad()
        method.training_step(views)[0].backward()
        assert all(p.grad is not None for p in last.parameters() if p.requires_grad)
        method.after_backward(epoch)
        opt.step()
        method.after_optimizer_step(1, 10)
        after = method.head.state_dict()
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        last_keys = {k for k in after if k.startswith("last_layer.")}
        assert "last_layer.parametrizations.weight.original0" not in changed  # g frozen at 1
        if epoch == 0:
            assert all(p.grad is None for p in last.parameters())
            assert not changed & last_keys, changed
        else:
            assert "last_layer.parametrizations.weight.original1" in changed
        assert changed - last_keys  # the MLP trained
        assert any(not torch.equal(a, b) for a, b in zip(backbone_before,
                                                         method.backbone.parameters(),
                                                         strict=True))
    torch.testing.assert_close(last.parametrizations.weight.original0,
                               torch.ones_like(last.parametrizations.weight.original0))


def test_dino_teacher_is_the_ema_of_backbone_and_head() -> None:
    method = _build("dino", out_dim=32, tau_base=0.9)
    _ema_reference(method, [method.backbone, method.head], steps=5, total=4, tau_base=0.9)


def test_dino_teacher_runs_without_stochastic_depth() -> None:
    """The official teacher is built without drop_path_rate: in train mode it gives the same
    output twice, the student (drop-path 0.5 here) does not."""
    vit = {"name": "vit_tiny", "image_size": SIZE, "patch_size": 4, "drop_path_rate": 0.5,
           "kwargs": {"depth": 2}}
    method = _build("dino", backbone=vit, out_dim=32)
    x = _views()[0]
    with torch.no_grad():
        assert torch.equal(method.momentum(x), method.momentum(x))
        assert not torch.equal(method.backbone(x), method.backbone(x))


# ----------------------------------------------------------------------------------- SwAV


def _swav_reference(method: SwAV, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each crop's prototype scores, as main_swav.py: the backbone per crop size, the
    projection head over all crops at once, L2 normalisation, unit prototypes."""
    with torch.no_grad():
        z = F.normalize(method.projector(_by_size(method.backbone, views)), dim=1)
        return list((z @ F.normalize(method.prototypes.layer.weight, dim=1).T).split(B))


def test_swav_step_is_swapped_prediction_over_every_crop_with_codes_from_the_globals() -> None:
    method = _build("swav", n_prototypes=20, queue_size=0)
    views = _views(local_crops=2)
    want = ref_swav(_swav_reference(method, views), n_global=2, temp=0.1, eps=0.05, iters=3)
    loss, _ = method.training_step(views)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-9)
    # codes from every crop (n_global = 4) would be another loss: the check can fail
    assert ref_swav(_swav_reference(method, views), 4, 0.1, 0.05, 3) != pytest.approx(want)


def test_swav_queue_fills_from_its_epoch_and_joins_the_sinkhorn_once_full() -> None:
    """queue_start_epoch 1, a queue of two batches per global crop: epoch 0 leaves it empty;
    in epoch 1 the first two steps fill it (their losses without it), the third step's codes
    come from Sinkhorn over [queued projections of those two steps; this batch]."""
    method = _build("swav", n_prototypes=20, queue_size=2 * B, queue_start_epoch=1)
    assert isinstance(method, SwAV)
    batches = [_views(seed=s) for s in range(4)]
    scores = [_swav_reference(method, v) for v in batches]

    def no_queue(i: int) -> float:
        return ref_swav(scores[i], 2, 0.1, 0.05, 3)

    method.set_epoch(0)
    assert _loss(method, batches[0]) == pytest.approx(no_queue(0), rel=1e-9)
    assert [int(q.filled) for q in method.queues] == [0, 0]
    method.set_epoch(1)
    for i in (1, 2):
        assert _loss(method, batches[i]) == pytest.approx(no_queue(i), rel=1e-9)
    assert all(q.full for q in method.queues)
    with torch.no_grad():  # the queue holds the projections of steps 1 and 2, crop by crop
        for g, q in enumerate(method.queues):
            z = [F.normalize(method.projector(_by_size(method.backbone, batches[i])), dim=1)
                 for i in (1, 2)]
            torch.testing.assert_close(q.keys, torch.cat([zi[g * B:(g + 1) * B] for zi in z]),
                                       **TOL)
    queue = [torch.cat([scores[1][g], scores[2][g]]) for g in range(2)]
    want = ref_swav(scores[3], 2, 0.1, 0.05, 3, queue=queue)
    assert _loss(method, batches[3]) == pytest.approx(want, rel=1e-9)
    assert want != pytest.approx(no_queue(3))  # the queue changed the codes


def test_swav_prototypes_are_frozen_for_their_epochs_and_stay_unit_vectors() -> None:
    method = _build("swav", n_prototypes=20, queue_size=0, freeze_prototypes_epochs=2)
    opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    views = _views(local_crops=1)
    for epoch in (0, 1, 2):
        before = method.prototypes.layer.weight.detach().clone()
        method.set_epoch(epoch)
        opt.zero_grad()
        method.training_step(views)[0].backward()
        assert method.prototypes.layer.weight.grad is not None
        method.after_backward(epoch)
        opt.step()
        method.after_optimizer_step(1, 10)
        weight = method.prototypes.layer.weight
        moved = float((weight.detach() - before).abs().max())
        # frozen: only the renormalisation of unit rows (float64 rounding) touches them
        assert (moved < 1e-14) if epoch < 2 else (moved > 1e-4), (epoch, moved)
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(20, dtype=torch.float64),
                                   **TOL)


# -------------------------------------------------------------------------------- MoCo v3


def test_mocov3_step_is_the_papers_loss_with_keys_from_the_momentum_encoder() -> None:
    """moco/builder.py: q = predictor(projector(backbone(x))) and k = momentum encoder(x),
    each view on its own; loss ctr(q1, k2) + ctr(q2, k1) at T; keys carry no gradient."""
    method = _build("mocov3", pred_hidden_dim=32, temperature=0.2)
    assert isinstance(method, MoCoV3)
    with torch.no_grad():  # the key encoder differs from the query encoder, as after training
        for p in method.momentum.parameters():
            p.mul_(0.9)
    views = _views()
    with torch.no_grad():
        q = [method.predictor(method.projector(method.backbone(v))) for v in views]
        k = [method.momentum.target(v) for v in views]
    loss, _ = method.training_step(views)
    assert float(loss.detach()) == pytest.approx(ref_mocov3(q[0], q[1], k[0], k[1], 0.2), rel=1e-9)
    # keys from the query encoder would be another loss: the check can fail
    with torch.no_grad():
        own = [method.projector(method.backbone(v)) for v in views]
    assert float(loss.detach()) != pytest.approx(ref_mocov3(q[0], q[1], own[0], own[1], 0.2))
    loss.backward()
    assert all(p.grad is None for p in method.momentum.parameters())
    with pytest.raises(MethodConfigError, match="augment.local.count"):
        method(_views(local_crops=2))  # two views only


def test_mocov3_key_encoder_is_the_ema_of_backbone_and_projector() -> None:
    method = _build("mocov3", pred_hidden_dim=32, tau_base=0.9)
    _ema_reference(method, [method.backbone, method.projector], steps=5, total=4, tau_base=0.9)
