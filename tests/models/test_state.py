"""MomentumEncoder, Queue, FeatureQueue and DINOCenter: tau schedule, frozen target, state
round trips, DDP enqueue (the DDP exactness of the DINO center and the SwAV queue with their
losses: tests/models/test_dino_swav_mocov3_ddp.py)."""

from __future__ import annotations

import math

import pytest
import sslstream.models.state as state_mod
import torch
from sslstream.models.state import DINOCenter, FeatureQueue, MomentumEncoder, Queue, cosine_tau
from torch import nn

from tests.ddp import run_ddp


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def _perturb(net: nn.Module, seed: int) -> None:
    """Stand-in for an optimizer step on the online network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_tau_schedule_equals_byol_formula_in_float64() -> None:
    total, base = 37, 0.996
    for k in range(total + 3):
        kk = min(k, total)
        expected = 1.0 - (1.0 - base) * (math.cos(math.pi * kk / total) + 1.0) / 2.0
        assert cosine_tau(k, total, base) == pytest.approx(expected, rel=0, abs=1e-15)
    assert cosine_tau(0, total, base) == pytest.approx(base, abs=1e-15)
    assert cosine_tau(total, total, base) == pytest.approx(1.0, abs=1e-15)
    # tau_final = tau_base gives a constant rate (MoCo)
    assert {cosine_tau(k, 10, 0.999, 0.999) for k in range(11)} == {0.999}
    with pytest.raises(ValueError, match="total_steps"):
        cosine_tau(0, 0, 0.99)


def test_update_is_ema_with_the_scheduled_tau_and_counts_steps() -> None:
    online = _net(0)
    enc = MomentumEncoder(online, tau_base=0.9)
    total = 5
    for k in range(total):
        _perturb(online, k)
        before = [t.detach().double().clone() for t in enc.target.parameters()]
        tau = enc.update(online, total)
        expected_tau = 1.0 - 0.1 * (math.cos(math.pi * k / total) + 1.0) / 2.0
        assert tau == pytest.approx(expected_tau, abs=1e-15)
        for t_old, t_new, o in zip(before, enc.target.parameters(), online.parameters(), strict=True):
            ref = expected_tau * t_old + (1.0 - expected_tau) * o.detach().double()
            torch.testing.assert_close(t_new.double(), ref, rtol=0, atol=1e-6)
        assert int(enc.step) == k + 1
    # the target never receives gradients
    assert all(not p.requires_grad for p in enc.target.parameters())


def test_tau_base_one_is_a_frozen_random_target() -> None:
    online = _net(0)
    enc = MomentumEncoder(online, tau_base=1.0)
    initial = {k: v.clone() for k, v in enc.target.state_dict().items()}
    for k in range(200):
        _perturb(online, k)
        assert enc.update(online, 200) == 1.0
    for name, p in enc.target.named_parameters():
        assert torch.equal(p, initial[name]), name
    assert not torch.equal(next(online.parameters()), initial["0.weight"])
    assert int(enc.step) == 200


def test_forward_alone_never_moves_the_target() -> None:
    online = _net(0)
    enc = MomentumEncoder(online, tau_base=0.5)
    initial = [p.clone() for p in enc.target.parameters()]
    _perturb(online, 1)
    out = enc(torch.randn(8, 5))
    assert not out.requires_grad
    for p, q in zip(enc.target.parameters(), initial, strict=True):
        assert torch.equal(p, q)
    assert int(enc.step) == 0


def test_momentum_state_dict_round_trip_is_bit_exact_including_tau_step() -> None:
    online = _net(0)
    enc = MomentumEncoder(online, tau_base=0.9)
    for k in range(7):
        _perturb(online, k)
        enc(torch.randn(8, 5))  # moves BN running stats (buffers) too
        enc.update(online, 20)
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    assert int(state["step"]) == 7

    fresh = MomentumEncoder(_net(123), tau_base=0.9)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the tau metric resumes too (the rate of update k = 6), not tau_base
    assert enc.last_tau_value == cosine_tau(6, 20, 0.9)
    assert fresh.last_tau_value == pytest.approx(cosine_tau(6, 20, 0.9), abs=1e-7)
    # the restored step drives the schedule: the next update uses tau(7), as the original does
    assert fresh.tau(20) == enc.tau(20) == cosine_tau(7, 20, 0.9)
    _perturb(online, 99)
    assert fresh.update(online, 20) == enc.update(online, 20)
    for a, b in zip(fresh.state_dict().values(), enc.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_queue_wraps_and_round_trips() -> None:
    q = Queue(10, 2)
    batches = [torch.full((4, 2), float(i + 1)) for i in range(3)]
    ptrs = []
    for b in batches:
        q.enqueue(b)
        ptrs.append(int(q.ptr))
    assert ptrs == [4, 8, 2]
    expected_owner = [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]  # slot -> batch that wrote it last
    assert q.keys[:, 0].tolist() == [float(v) for v in expected_owner]

    fresh = Queue(10, 2, seed=5)
    assert not torch.equal(fresh.keys, q.keys)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.keys, q.keys) and int(fresh.ptr) == 2
    extra = torch.randn(3, 2)
    q.enqueue(extra)
    fresh.enqueue(extra)
    assert torch.equal(fresh.keys, q.keys) and torch.equal(fresh.ptr, q.ptr)


def test_queue_rejects_bad_shapes() -> None:
    q = Queue(4, 3)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        q.enqueue(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="queue_size=4"):
        q.enqueue(torch.zeros(5, 3))


def test_queue_initial_keys_are_unit_vectors_and_identical_across_instances() -> None:
    a, b = Queue(16, 8), Queue(16, 8)
    assert torch.equal(a.keys, b.keys)  # same seed: ranks agree without a broadcast
    torch.testing.assert_close(a.keys.norm(dim=1), torch.ones(16))


def _queue_body(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    q = Queue(10, 2)
    snapshots = []
    for step in range(3):
        # key value = 100 * step + 10 * rank + row: tells who wrote a slot, and when
        base = 100.0 * step + 10.0 * rank
        keys = torch.stack([torch.full((2,), base + i) for i in range(3)])
        q.enqueue(keys)
        snapshots.append(q.keys[:, 0].clone())
    return {"snapshots": torch.stack(snapshots), "ptr": q.ptr.clone()}


@pytest.mark.timeout(120)
def test_queue_under_two_gloo_ranks_holds_all_keys_in_rank_order() -> None:
    results = run_ddp(_queue_body, world_size=2)
    r0, r1 = results
    assert torch.equal(r0["snapshots"], r1["snapshots"])
    assert int(r0["ptr"]) == int(r1["ptr"]) == (3 * 6) % 10  # 6 keys per step, wrapped
    snaps = r0["snapshots"]
    # step 0 writes slots 0..5: rank 0's three keys, then rank 1's
    assert snaps[0, :6].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    # step 1 writes slots 6..9 then wraps to 0..1
    expected_step1 = [111.0, 112.0, 2.0, 10.0, 11.0, 12.0, 100.0, 101.0, 102.0, 110.0]
    assert snaps[1].tolist() == expected_step1
    # step 2 writes slots 2..7
    expected_step2 = [111.0, 112.0, 200.0, 201.0, 202.0, 210.0, 211.0, 212.0, 102.0, 110.0]
    assert snaps[2].tolist() == expected_step2


def test_dino_center_is_the_ema_of_the_batch_mean_in_float64() -> None:
    c = DINOCenter(4, momentum=0.9).double()
    assert torch.equal(c.center, torch.zeros(1, 4, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    want = [0.0] * 4
    for _ in range(3):
        crops = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
        mean = [sum(float(t[i, k]) for t in crops for i in range(3)) / 6 for k in range(4)]
        want = [0.9 * w + 0.1 * m for w, m in zip(want, mean, strict=True)]
        c.update(crops)
    torch.testing.assert_close(c.center, torch.tensor([want], dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)
    # a (N, K) tensor and the list of its crops are the same update
    a, b = DINOCenter(4).double(), DINOCenter(4).double()
    t = torch.randn(6, 4, dtype=torch.float64)
    a.update(t)
    b.update([t[:3], t[3:]])
    assert torch.equal(a.center, b.center)


def test_dino_center_round_trips_bit_exactly_and_rejects_bad_input() -> None:
    c = DINOCenter(8)
    for i in range(5):
        c.update(torch.randn(4, 8) + i)
    fresh = DINOCenter(8)
    fresh.load_state_dict(c.state_dict())
    assert torch.equal(fresh.center, c.center)
    nxt = torch.randn(4, 8)
    c.update(nxt)
    fresh.update(nxt)
    assert torch.equal(fresh.center, c.center)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        c.update(torch.zeros(4, 7))
    with pytest.raises(ValueError, match="out_dim"):
        DINOCenter(0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOCenter(4, momentum=1.5)


def test_feature_queue_starts_empty_counts_rows_and_round_trips() -> None:
    q = FeatureQueue(10, 2)
    assert torch.count_nonzero(q.keys) == 0 and not q.full
    for i in range(2):
        q.enqueue(torch.full((4, 2), float(i + 1)))
    assert int(q.filled) == 8 and not q.full  # 8 of 10 rows hold real projections
    q.enqueue(torch.full((4, 2), 3.0))        # wraps: slots 8, 9, 0, 1
    assert q.full and int(q.filled) == 10 and int(q.ptr) == 2
    assert q.keys[:, 0].tolist() == [3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0]
    assert torch.equal(q.rank_rows(), q.keys)  # one process: every row is this rank's

    half = FeatureQueue(10, 2)
    half.enqueue(torch.ones(4, 2))
    fresh = FeatureQueue(10, 2)
    fresh.load_state_dict(half.state_dict())
    assert not fresh.full and int(fresh.filled) == 4  # the host mirror follows the buffer
    for b in (torch.randn(4, 2), torch.randn(4, 2)):
        half.enqueue(b)
        fresh.enqueue(b)
    assert fresh.full and half.full
    for k, v in half.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_feature_queue_rank_rows_are_one_block_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    q = FeatureQueue(9, 2)
    q.keys.copy_(torch.arange(18, dtype=torch.float32).view(9, 2))
    monkeypatch.setattr(state_mod, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(state_mod, "get_rank", lambda group=None: 1)
    assert torch.equal(q.rank_rows(), q.keys[3:6])
    with pytest.raises(ValueError, match="queue_size=10 must be divisible by the number of "
                                         "ranks \\(3\\)"):
        FeatureQueue(10, 2).rank_rows()
