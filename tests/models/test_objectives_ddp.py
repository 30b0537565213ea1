"""The gathered objectives are exact under DDP (2 real gloo processes on CPU).

DDP averages parameter gradients over ranks, so with W ranks holding B samples each the
trainer optimises the mean over ranks of the per-rank losses. The objectives are exact when

1. mean_r loss_r equals the loss of one process on all W*B samples, and
2. each rank's gradient w.r.t. its local embeddings, divided by W, equals the matching slice
   of the one-process full-batch gradient (DDP divides by W; everything upstream of the
   embeddings is linear in these gradients).

All cases run inside ONE spawned group (a spawn costs seconds). The same ranks also run the
losses with a detached all_gather (own slice kept differentiable, the common buggy "fix") and
the test shows that this breaks (2), so the check can fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import sslstream.models.objectives._common as common_mod
import torch
import torch.distributed as dist
from sslstream.models.objectives import (
    barlow_twins_loss,
    contrastive_margin,
    gather_no_grad,
    gather_with_grad,
    nt_xent,
    vicreg_loss,
)

from tests.ddp import DDPError, run_ddp

WORLD = 2
BATCH = 4  # per rank
DIM = 6
TOL = 1e-9  # float64; the brief asks ~1e-6

CASES: dict[str, Any] = {
    "nt_xent": lambda a, b, **kw: nt_xent(a, b, 0.3, **kw),
    "contrastive_margin": lambda a, b, **kw: contrastive_margin(a, b, 1.5, **kw),
    "contrastive_margin_raw": lambda a, b, **kw: contrastive_margin(
        a, b, 4.0, normalize=False, **kw
    ),
    "vicreg": lambda a, b, **kw: vicreg_loss(a, b, **kw),
    "barlow": lambda a, b, **kw: barlow_twins_loss(a, b, 0.05, **kw),
}


def _full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    z1 = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64) * 0.8
    z2 = z1 + 0.5 * torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    return z1, z2


def _detached_gather(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The bug: all_gather without autograd, own slice swapped back in so *some* grad flows."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = x
    return torch.cat(parts)


def _loss_and_grads(fn: Any, z1: torch.Tensor, z2: torch.Tensor, **kw: Any) -> dict[str, Any]:
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, _ = fn(a, b, **kw)
    loss.backward()
    return {"loss": loss.detach(), "g1": a.grad, "g2": b.grad}


def _ddp_body(rank: int, world: int, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, Any]:
    """Runs on every rank: all checks in one group."""
    torch.manual_seed(rank)
    local = slice(rank * BATCH, (rank + 1) * BATCH)
    l1, l2 = z1[local], z2[local]
    out: dict[str, Any] = {"exact": {}, "detached": {}}
    for name, fn in CASES.items():
        out["exact"][name] = _loss_and_grads(fn, l1, l2)
    # an explicit process group takes the same path
    sub = dist.new_group(list(range(world)))
    out["exact_group"] = _loss_and_grads(CASES["nt_xent"], l1, l2, group=sub)
    # the buggy gather, patched where the losses look it up (their shared global_batch)
    real = common_mod.gather_with_grad
    common_mod.gather_with_grad = _detached_gather
    try:
        for name, fn in CASES.items():
            out["detached"][name] = _loss_and_grads(fn, l1, l2)
    finally:
        common_mod.gather_with_grad = real
    # the primitives: rank order, and the backward sums every rank's gradient
    x = torch.full((2, 3), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = gather_with_grad(x)
    (gathered.sum() * (rank + 1)).backward()
    out["gathered"] = gathered.detach()
    out["gather_grad"] = x.grad
    out["gather_no_grad"] = gather_no_grad(x)
    return out


def _raise_on_last_rank(rank: int, world: int) -> None:
    if rank == world - 1:
        raise ValueError(f"deliberate failure on rank {rank}")
    dist.barrier()


@pytest.fixture(scope="module")
def ddp_results() -> list[dict[str, Any]]:
    z1, z2 = _full_batch()
    return run_ddp(_ddp_body, z1, z2, world_size=WORLD, timeout=150)


def _full(name: str) -> dict[str, Any]:
    z1, z2 = _full_batch()
    return _loss_and_grads(CASES[name], z1, z2)  # no process group here: one process


def _ddp_view(results: list[dict[str, Any]], kind: str, name: str) -> dict[str, torch.Tensor]:
    """What DDP optimises: mean loss over ranks, rank gradients / W stitched in rank order."""
    per_rank = [r[kind][name] for r in results]
    return {
        "loss": torch.stack([r["loss"] for r in per_rank]).mean(),
        "g1": torch.cat([r["g1"] for r in per_rank]) / WORLD,
        "g2": torch.cat([r["g2"] for r in per_rank]) / WORLD,
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(CASES))
def test_ddp_matches_full_batch(ddp_results: list[dict[str, Any]], name: str) -> None:
    full = _full(name)
    ddp = _ddp_view(ddp_results, "exact", name)
    torch.testing.assert_close(ddp["loss"], full["loss"], rtol=TOL, atol=TOL)
    torch.testing.assert_close(ddp["g1"], full["g1"], rtol=TOL, atol=TOL)
    torch.testing.assert_close(ddp["g2"], full["g2"], rtol=TOL, atol=TOL)
    assert full["g1"].abs().max() > 1e-3  # a non-trivial gradient is being compared


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(CASES))
def test_detached_gather_breaks_gradients(ddp_results: list[dict[str, Any]], name: str) -> None:
    full = _full(name)
    bad = _ddp_view(ddp_results, "detached", name)
    # the forward pass cannot tell (same values) ...
    torch.testing.assert_close(bad["loss"], full["loss"], rtol=TOL, atol=TOL)
    # ... but the gradients DDP would apply are wrong
    error = max((bad["g1"] - full["g1"]).abs().max(), (bad["g2"] - full["g2"]).abs().max())
    assert error > 1e-3, f"{name}: a detached gather went unnoticed (max grad error {error:.2e})"


@pytest.mark.timeout(180)
def test_explicit_group_and_gather_primitives(ddp_results: list[dict[str, Any]]) -> None:
    full = _full("nt_xent")
    per_rank = [r["exact_group"] for r in ddp_results]
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), full["loss"])
    torch.testing.assert_close(torch.cat([r["g1"] for r in per_rank]) / WORLD, full["g1"])
    want = torch.cat([torch.full((2, 3), float(r), dtype=torch.float64) for r in range(WORLD)])
    for r in ddp_results:
        torch.testing.assert_close(r["gathered"], want)
        torch.testing.assert_close(r["gather_no_grad"], want)
        assert not r["gather_no_grad"].requires_grad
        # d/dx of sum_r (r + 1) * sum(gathered_r) = 1 + 2 on every element, on every rank
        torch.testing.assert_close(r["gather_grad"], torch.full((2, 3), 3.0, dtype=torch.float64))


@pytest.mark.timeout(120)
def test_run_ddp_surfaces_a_rank_traceback() -> None:
    # One process: a spawn costs seconds on a loaded 2-core CI machine.
    with pytest.raises(DDPError, match=r"(?s)rank 0 raised.*ValueError: deliberate failure"):
        run_ddp(_raise_on_last_rank, world_size=1, timeout=60)
