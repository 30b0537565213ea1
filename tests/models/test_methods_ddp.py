"""Methods under real DDP (2 gloo ranks): the gradient DDP applies equals one process on the
whole batch. The objectives are tested for this on embeddings (test_objectives_ddp.py); this
checks that every method hands its process group and ``gather`` to its objective and that
nothing between the views and the loss breaks the equality.

BatchNorm runs in eval mode (running statistics) so that a sample's embedding does not
depend on which rank's batch it sits in: per-rank BN statistics are a real, documented
difference between 1 and W processes on CPU (SyncBN is CUDA-only), not what is tested here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sslstream.models.methods import METHODS, build_method
from torch import nn

from tests.ddp import run_ddp
from tests.models.test_training_toy import SMALL_HEADS, TINY_BACKBONE, method_cfg

# the methods whose objective gathers across ranks (a `gather` key): every one in the registry
NAMES = sorted(n for n, m in METHODS.items()
               if "gather" in {f.name for f in dataclasses.fields(m.config_class)})
BATCH = 6  # per rank


def _views(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randn(n, 3, 12, 12, generator=g)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    method = build_method(method_cfg(name, **SMALL_HEADS), TINY_BACKBONE)
    method.eval()
    return method


def _grads(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}


def _body(rank: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    v1, v2 = _views(BATCH * world_size)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for name in NAMES:
        method = _build(name)
        ddp = nn.parallel.DistributedDataParallel(method)
        loss, _ = ddp(v1[mine], v2[mine])
        loss.backward()  # DDP all-reduces (averages) the parameter gradients here
        out[name] = {"loss": loss.detach(), **_grads(method)}
    return out


@pytest.mark.timeout(180)
def test_method_gradients_under_two_ranks_equal_one_process_on_the_whole_batch() -> None:
    torch.set_num_threads(1)
    ranks = run_ddp(_body, world_size=2)
    v1, v2 = _views(BATCH * 2)
    for name in NAMES:
        method = _build(name)
        loss, _ = method.training_step([v1, v2])
        loss.backward()
        full = _grads(method)
        assert set(ranks[0][name]) - {"loss"} == set(full), name
        # mean of the per-rank losses = the full-batch loss; DDP's average = full gradient
        mean_loss = (ranks[0][name]["loss"] + ranks[1][name]["loss"]) / 2
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        for key, g in full.items():
            for r in ranks:
                torch.testing.assert_close(r[name][key], g, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
        assert max(g.abs().max() for g in full.values()) > 1e-4, name
