"""Methods under real DDP (2 gloo ranks): the loss and the gradient DDP applies equal one
process on the whole batch. The objectives are tested for this on embeddings
(test_objectives_ddp.py, test_dino_swav_mocov3_ddp.py); this checks that every method hands
its process group and ``gather`` to its objective and its state, and that nothing between the
views and the loss breaks the equality: DINO and SwAV also with local crops (one backbone
call per crop size), DINO's center and SwAV's feature queue (filled by a first step, scored
in the second) after the step.

BatchNorm runs in eval mode (running statistics) so that a sample's embedding does not
depend on which rank's batch it sits in: per-rank BN statistics are a real, documented
difference between 1 and W processes on CPU (SyncBN is CUDA-only), not what is tested here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from sslstream.models.methods import METHODS, build_method
from sslstream.models.methods.dino import DINO
from sslstream.models.methods.swav import SwAV
from torch import nn

from tests.ddp import run_ddp
from tests.models.test_training_toy import SMALL_HEADS, TINY_BACKBONE, method_cfg

BATCH = 6  # per rank
SIZE, LOCAL_SIZE = 12, 8  # global and local crop sides


class Case(NamedTuple):
    name: str
    method: str
    extra: dict[str, Any]
    local_crops: int = 0
    warm_step: bool = False  # one no-grad step first (fills SwAV's queue)


# every registered method with its recipe's values (small heads); the multi-crop ones also
# with local crops, SwAV also with its feature queue in use
CASES = [Case(n, n, {"dino": {"out_dim": 256}, "swav": {"n_prototypes": 40},
                     "mocov3": {"pred_hidden_dim": 64}}.get(n, {})) for n in sorted(METHODS)]
CASES += [
    Case("dino+local", "dino", {"out_dim": 256}, local_crops=2),
    Case("swav+local", "swav", {"n_prototypes": 40}, local_crops=2),
    Case("swav+queue", "swav", {"n_prototypes": 40, "queue_size": 2 * BATCH,
                                "queue_start_epoch": 0}, warm_step=True),
]


def _views(n: int, local_crops: int, seed: int = 42) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, 3, SIZE, SIZE, generator=g) for _ in range(2)]
            + [torch.randn(n, 3, LOCAL_SIZE, LOCAL_SIZE, generator=g) for _ in range(local_crops)])


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    method = build_method(method_cfg(case.method, **SMALL_HEADS, **case.extra), TINY_BACKBONE)
    method.eval()
    return method


def _grads(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}


def _state(method: nn.Module) -> dict[str, torch.Tensor]:
    """The cross-rank state after the step: DINO's center, SwAV's queues."""
    if isinstance(method, DINO):
        return {"center": method.center.center.clone()}
    if isinstance(method, SwAV):
        return {f"queue{i}": q.keys.clone() for i, q in enumerate(method.queues)}
    return {}


def _step(case: Case, model: nn.Module, rows: slice) -> torch.Tensor:
    """The case's step on ``rows`` of the global batch (``model``: the method or its DDP)."""
    if case.warm_step:
        with torch.no_grad():
            model([v[rows] for v in _views(BATCH * 2, case.local_crops, seed=7)])
    loss, _ = model([v[rows] for v in _views(BATCH * 2, case.local_crops)])
    loss.backward()  # under DDP: the parameter gradients are all-reduced (averaged) here
    return loss.detach()


def _body(rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for case in CASES:
        method = _build(case)
        loss = _step(case, nn.parallel.DistributedDataParallel(method), mine)
        out[case.name] = {"loss": loss, "grads": _grads(method), "state": _state(method)}
    return out


@pytest.mark.timeout(240)
def test_method_loss_gradients_and_state_under_two_ranks_equal_one_process() -> None:
    torch.set_num_threads(1)
    ranks = run_ddp(_body, world_size=2)
    for case in CASES:
        method = _build(case)
        loss = _step(case, method, slice(None))
        full, state = _grads(method), _state(method)
        got = [r[case.name] for r in ranks]
        assert set(got[0]["grads"]) == set(full), case.name
        # mean of the per-rank losses = the full-batch loss; DDP's average = full gradient
        mean_loss = (got[0]["loss"] + got[1]["loss"]) / 2
        torch.testing.assert_close(mean_loss, loss, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=case.name: f"{n} loss: {m}")
        for key, g in full.items():
            for r in got:
                torch.testing.assert_close(r["grads"][key], g, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, k=key, n=case.name: f"{n} {k}: {m}")
        assert max(g.abs().max() for g in full.values()) > 1e-4, case.name
        for key, value in state.items():  # every rank holds the one-process state
            for r in got:
                torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, k=key, n=case.name: f"{n} {k}: {m}")
    # the queue case really scored a full queue
    queued = _build(CASES[-1])
    _step(CASES[-1], queued, slice(None))
    assert all(q.full for q in queued.queues)
