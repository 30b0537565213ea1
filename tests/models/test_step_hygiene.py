"""The training step's hot-path hygiene: one graph for torch.compile (no graph break, which
also rules out host syncs such as ``.item()``), bf16 autocast safety, channels_last inputs."""

from __future__ import annotations

import pytest
import torch
from sslstream.models.methods import METHODS
from sslstream.models.state import cosine_tau

from tests.models.test_methods import _build, _views
from tests.models.test_training_toy import one_thread

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]
__all__ = ["one_thread"]
NAMES = sorted(METHODS)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_is_one_graph_without_breaks(name: str) -> None:
    """A graph break in training_step is either Python control flow on tensor data or a
    host sync (``.item()``, ``float(t)``, ``.tolist()``): both cost every step on a GPU."""
    method = _build(name)
    method.train()
    v1, v2 = _views()
    try:
        explained = torch._dynamo.explain(method.training_step)([v1, v2])
    finally:
        torch._dynamo.reset()
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_step_gives_a_float32_loss_close_to_fp32(name: str) -> None:
    method = _build(name)
    method.eval()  # running BN statistics: both passes see the same normalisation
    v1, v2 = _views(batch=16)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    ref, _ = method.training_step([v1, v2])
    method.load_state_dict(state)  # MoCo: same queue for the second pass
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, metrics = method.training_step([v1, v2])
    assert low.dtype == torch.float32, name
    assert torch.isfinite(low)
    assert float(low.detach()) == pytest.approx(float(ref.detach()), rel=0.05, abs=0.05), name
    low.backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), name


@pytest.mark.parametrize("name", ["byol", "simclr"])
def test_channels_last_views_give_the_same_loss(name: str) -> None:
    method = _build(name)
    method.eval()
    v1, v2 = _views()
    ref, _ = method.training_step([v1, v2])
    cl = [v.contiguous(memory_format=torch.channels_last) for v in (v1, v2)]
    out, _ = method.to(memory_format=torch.channels_last).training_step(list(cl))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["byol", "mocov2"])
def test_compiled_step_does_not_recompile_as_the_state_moves(name: str) -> None:
    """tau, the EMA step and the queue pointer change every step: reading any of them as a
    Python value in training_step would make torch.compile guard on it and recompile."""
    method = _build(name)
    method.train()
    step = torch.compile(method.training_step, backend="eager")
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    taus = []
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for k in range(3):
                loss, metrics = step(list(_views(seed=k)))
                opt.zero_grad()
                loss.backward()
                opt.step()
                method.after_optimizer_step(k, 10)
                taus.append(float(metrics["tau"]))
    finally:
        torch._dynamo.reset()
    # the metric follows the schedule: tau_base before any update, then the last update's
    enc = method.momentum
    expected = [enc.tau_base] + [cosine_tau(k, 10, enc.tau_base, enc.tau_final) for k in (0, 1)]
    assert taus == pytest.approx(expected, abs=1e-7)
    assert taus[2] != taus[1]
