"""DINO, SwAV and MoCo v3 are exact under DDP: 2 gloo ranks x B == 1 rank x 2B.

What DDP optimises with W ranks is the mean of the per-rank losses, with each rank's
gradient averaged; so (as tests/models/test_objectives_ddp.py) the mean loss over ranks
must equal the one-process loss on the whole batch and the per-rank input gradients,
stitched in rank order and divided by W, the one-process gradient. Besides the losses:
the DINO center (all-reduced mean), the Sinkhorn codes (all-reduced sums) and the SwAV
feature queue (gathered keys, one block of rows per rank) match one process too.

Each check can fail: the same ranks also run SwAV and MoCo v3 with ``gather=False`` (per-rank
Sinkhorn sums / per-rank keys), and the test shows those differ from the full batch.
All cases run in ONE spawned group (a spawn costs seconds).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sslstream.models.objectives import dino_loss, mocov3_loss, sinkhorn, swav_loss
from sslstream.models.state import DINOCenter, FeatureQueue

from tests.ddp import run_ddp

pytestmark = pytest.mark.timeout(180)

WORLD, BATCH, DIM, K, CROPS, QUEUE = 2, 4, 6, 5, 4, 8
TOL = 1e-9  # float64


def _inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    n = WORLD * BATCH
    prototypes = F.normalize(randn(K, DIM), dim=1)
    return {
        "student": [randn(n, K) * 2 for _ in range(CROPS)],
        "teacher": [randn(n, K) * 2 for _ in range(2)],
        "center": randn(1, K) * 0.1,
        "z": [F.normalize(randn(n, DIM), dim=1) for _ in range(CROPS)],
        "z_old": [F.normalize(randn(n, DIM), dim=1) for _ in range(2)],  # the queued batch
        "prototypes": prototypes,
        "moco": [randn(n, DIM) for _ in range(4)],
    }


def _dino(student: list[torch.Tensor], teacher: list[torch.Tensor],
          center: torch.Tensor) -> dict[str, Any]:
    leaves = [s.clone().requires_grad_() for s in student]
    loss = dino_loss(leaves, teacher, center, teacher_temp=0.05, student_temp=0.1).loss
    loss.backward()
    state = DINOCenter(K, momentum=0.9).double()
    state.center.copy_(center)
    state.update(teacher)
    return {"loss": loss.detach(), "grads": [s.grad for s in leaves], "center": state.center}


def _swav(z: list[torch.Tensor], z_old: list[torch.Tensor], prototypes: torch.Tensor,
          gather: bool = True) -> dict[str, Any]:
    queues = [FeatureQueue(QUEUE, DIM).double() for _ in range(2)]
    for q, old in zip(queues, z_old, strict=True):
        q.enqueue(old)  # every rank's rows land in every rank's queue
    leaves = [t.clone().requires_grad_() for t in z]
    scores = [t @ prototypes.T for t in leaves]
    queue_scores = [q.rank_rows() @ prototypes.T for q in queues]
    out: dict[str, Any] = {}
    for label, qs in (("plain", None), ("queue", queue_scores)):
        for t in leaves:
            t.grad = None
        loss = swav_loss(scores, queue_scores=qs, gather=gather).loss
        loss.backward(retain_graph=True)
        out[label] = {"loss": loss.detach(), "grads": [t.grad.clone() for t in leaves]}
    out["codes"] = sinkhorn(scores[0].detach(), gather=gather)
    out["queue_keys"] = queues[0].keys.clone()
    out["queue_full"] = queues[0].full
    return out


def _moco(moco: list[torch.Tensor], gather: bool = True) -> dict[str, Any]:
    q1, q2 = (t.clone().requires_grad_() for t in moco[:2])
    loss = mocov3_loss(q1, q2, moco[2], moco[3], 0.2, gather=gather).loss
    loss.backward()
    return {"loss": loss.detach(), "grads": [q1.grad, q2.grad]}


def _ddp_body(rank: int, world: int, data: dict[str, Any]) -> dict[str, Any]:
    local = slice(rank * BATCH, (rank + 1) * BATCH)

    def mine(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t[local] for t in ts]

    return {
        "dino": _dino(mine(data["student"]), mine(data["teacher"]), data["center"]),
        "swav": _swav(mine(data["z"]), mine(data["z_old"]), data["prototypes"]),
        "swav_local": _swav(mine(data["z"]), mine(data["z_old"]), data["prototypes"],
                            gather=False),
        "moco": _moco(mine(data["moco"])),
        "moco_local": _moco(mine(data["moco"]), gather=False),
    }


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_ddp(_ddp_body, _inputs(), world_size=WORLD, timeout=150)


def _full() -> dict[str, Any]:
    data = _inputs()
    return {
        "dino": _dino(data["student"], data["teacher"], data["center"]),
        "swav": _swav(data["z"], data["z_old"], data["prototypes"]),
        "moco": _moco(data["moco"]),
    }


def _ddp_view(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean loss over ranks; per-rank gradients / W stitched in rank order."""
    n = len(per_rank[0]["grads"])
    return {"loss": torch.stack([r["loss"] for r in per_rank]).mean(),
            "grads": [torch.cat([r["grads"][i] for r in per_rank]) / WORLD for i in range(n)]}


def _assert_same(ddp: dict[str, Any], full: dict[str, Any]) -> None:
    torch.testing.assert_close(ddp["loss"], full["loss"], rtol=TOL, atol=TOL)
    for got, want in zip(ddp["grads"], full["grads"], strict=True):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert max(float(g.abs().max()) for g in full["grads"]) > 1e-3  # non-trivial gradients


def _max_grad_error(ddp: dict[str, Any], full: dict[str, Any]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(ddp["grads"], full["grads"],
                                                          strict=True))


def test_dino_loss_and_center_are_exact(results: list[dict[str, Any]]) -> None:
    full = _full()["dino"]
    _assert_same(_ddp_view([r["dino"] for r in results]), full)
    for r in results:  # every rank holds the center of the global batch
        torch.testing.assert_close(r["dino"]["center"], full["center"], rtol=TOL, atol=1e-12)
    # a center from rank 0's batch alone would differ: the check can fail
    data = _inputs()
    own = DINOCenter(K).double()
    own.center.copy_(data["center"])
    own.update([t[:BATCH] for t in data["teacher"]])
    assert (own.center - full["center"]).abs().max() > 1e-3


def test_swav_codes_loss_and_gradients_are_exact_with_and_without_queue(
        results: list[dict[str, Any]]) -> None:
    full = _full()["swav"]
    codes = torch.cat([r["swav"]["codes"] for r in results])
    torch.testing.assert_close(codes, full["codes"], rtol=TOL, atol=1e-12)
    for label in ("plain", "queue"):
        _assert_same(_ddp_view([r["swav"][label] for r in results]), full[label])
    for r in results:  # the gathered queue is the one-process queue, on every rank
        assert r["swav"]["queue_full"] and full["queue_full"]
        torch.testing.assert_close(r["swav"]["queue_keys"], full["queue_keys"], rtol=0, atol=0)
    # per-rank Sinkhorn sums (gather=False) give other codes and other gradients
    local_codes = torch.cat([r["swav_local"]["codes"] for r in results])
    assert (local_codes - full["codes"]).abs().max() > 1e-3
    bad = _ddp_view([r["swav_local"]["plain"] for r in results])
    assert _max_grad_error(bad, full["plain"]) > 1e-4


def test_mocov3_loss_and_gradients_are_exact(results: list[dict[str, Any]]) -> None:
    full = _full()["moco"]
    _assert_same(_ddp_view([r["moco"] for r in results]), full)
    # keys of this rank only: fewer negatives, another loss
    bad = _ddp_view([r["moco_local"] for r in results])
    assert abs(float(bad["loss"] - full["loss"])) > 1e-3
    assert _max_grad_error(bad, full) > 1e-3
