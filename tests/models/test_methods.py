"""Every method: one step interface, detached metrics, optimiser groups, state round trips;
MoCo's shuffle-BN and queue under 2 gloo ranks."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sslstream.models.methods import METHODS, MoCoV2, build_method

from tests.conftest import REPO_ROOT
from tests.ddp import run_ddp
from tests.models.test_training_toy import SMALL_HEADS, TINY_BACKBONE, method_cfg, one_thread

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]  # the fixture, imported so pytest finds it here

EXTRA = {"byol": {"pred_hidden_dim": 32}, "simsiam": {"pred_hidden_dim": 16},
         "mocov2": {"queue_size": 64}}
NAMES = sorted(METHODS)


def _build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_method(method_cfg(name, **SMALL_HEADS, **EXTRA.get(name, {}), **overrides),
                        TINY_BACKBONE)


def _views(batch: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 3, 16, 16, generator=g)


def test_every_registered_method_has_a_recipe_per_regime_naming_it() -> None:
    """conf/recipe/<method>_<regime>.yaml for every method of the registry and every regime,
    and each file's method block builds that method's config (no other recipe files)."""
    files = sorted((REPO_ROOT / "conf" / "recipe").glob("*.yaml"))
    expected = {f"{name}_{regime}" for name in METHODS for regime in ("cifar", "imagenet")}
    assert {f.stem for f in files} == expected
    for name in METHODS:
        for regime in ("cifar", "imagenet"):
            block = method_cfg(name, regime)
            assert block.name == name
            METHODS[name].config_class.from_mapping(block)
    assert method_cfg("byol", "imagenet").tau_base == 0.996


@pytest.mark.parametrize("name", NAMES)
def test_training_step_contract(name: str) -> None:
    method = _build(name)
    method.train()
    v1, v2 = _views()
    loss, metrics = method.training_step([v1, v2])
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    emb = metrics["embeddings"]
    assert emb.shape == (8, SMALL_HEADS["proj_output_dim"]) and not emb.requires_grad
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            assert not value.requires_grad, key
            assert key == "embeddings" or value.numel() == 1, key
        else:
            assert isinstance(value, float), key
    loss.backward()
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in method.backbone.parameters())
    # optimiser groups: every trainable parameter exactly once, LARS flag = ndim <= 1
    groups = method.parameter_groups()
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    for g in groups:
        assert all((p.ndim <= 1) == g["lars_exclude"] for p in g["params"]), g["name"]
    # momentum targets are not trainable and got no gradient
    if hasattr(method, "momentum"):
        assert all(p.grad is None and not p.requires_grad
                   for p in method.momentum.parameters())
    method.eval()
    assert method.embed(v1).shape == (8, method.feature_dim)


def test_forward_is_training_step_for_ddp() -> None:
    method = _build("simclr")
    v1, v2 = _views()
    torch.manual_seed(0)
    a, _ = method([v1, v2])
    torch.manual_seed(0)
    b, _ = method.training_step([v1, v2])
    assert torch.equal(a, b)


def test_simsiam_predictor_groups_keep_a_fixed_lr() -> None:
    groups = _build("simsiam").parameter_groups()
    assert {g["name"]: g["fixed_lr"] for g in groups} == {
        "encoder": False, "encoder/bias_norm": False, "predictor": True,
        "predictor/bias_norm": True}
    groups = _build("simsiam", fix_pred_lr=False).parameter_groups()
    assert not any(g["fixed_lr"] for g in groups)


def test_barlow_twins_bias_lr_mult() -> None:
    groups = _build("barlow_twins", bias_lr_mult=0.024).parameter_groups()
    assert [g.get("lr_mult") for g in groups] == [None, 0.024]


def test_build_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="method.name='nope'"):
        build_method({"name": "nope"}, TINY_BACKBONE)
    cfg = OmegaConf.to_container(method_cfg("byol"))
    del cfg["tau_base"]
    with pytest.raises(ValueError, match="method.tau_base"):
        build_method(cfg, TINY_BACKBONE)
    with pytest.raises(ValueError, match="method.bn"):
        _build("mocov2", bn="batch")


def test_sync_bn_wishes() -> None:
    assert _build("byol").wants_sync_bn
    assert not _build("byol", sync_bn=False).wants_sync_bn
    assert not _build("mocov2", bn="shuffle").wants_sync_bn
    assert _build("mocov2", bn="sync").wants_sync_bn


def test_byol_target_moves_only_in_after_optimizer_step() -> None:
    method = _build("byol")
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    initial = [p.clone() for p in method.momentum.parameters()]
    v1, v2 = _views()
    loss, metrics = method.training_step([v1, v2])
    assert metrics["tau"] == 0.99
    loss.backward()
    opt.step()  # the online network moved, the target did not
    assert all(torch.equal(p, q) for p, q in zip(method.momentum.parameters(), initial, strict=True))
    method.after_optimizer_step(1, 10)
    assert int(method.momentum.step) == 1
    assert not all(torch.equal(p, q) for p, q in zip(method.momentum.parameters(), initial, strict=True))
    _, metrics = method.training_step([v1, v2])
    assert metrics["tau"] == 0.99  # tau of the update just done (k = 0)


def _run(method, opt, steps: int, seed: int) -> None:
    for k in range(steps):
        v1, v2 = _views(seed=seed + k)
        loss, _ = method.training_step([v1, v2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(k + 1, 20)


@pytest.mark.parametrize(("name", "extra"), [("byol", {}), ("mocov2", {"symmetric": True}),
                                             ("simsiam", {})])
def test_resume_from_state_dict_is_bit_exact(name: str, extra: dict) -> None:
    method = _build(name, **extra)
    opt = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    _run(method, opt, 3, seed=10)
    saved = {k: v.clone() for k, v in method.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # as a checkpoint file would hold it

    resumed = _build(name, seed=7, **extra)  # different initial weights, queue, step
    resumed.load_state_dict(saved)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved_opt)
    _run(method, opt, 3, seed=20)
    _run(resumed, opt2, 3, seed=20)
    for (k, a), b in zip(method.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    if name != "simsiam":
        assert int(resumed.momentum.step) == 6
    if name == "mocov2":  # symmetric: one queue per view, 8 keys each per step
        assert int(resumed.queue.ptr) == int(resumed.queue_view1.ptr) == (6 * 8) % 64


def test_moco_enqueues_the_keys_after_using_the_old_queue() -> None:
    method = _build("mocov2", symmetric=False)
    before = method.queue.keys.clone()
    v1, v2 = _views()
    loss, _ = method.training_step([v1, v2])
    loss.backward()  # would fail if the enqueue had modified a tensor saved for backward
    assert int(method.queue.ptr) == 8
    torch.testing.assert_close(method.queue.keys[:8], method.keys(v2))
    assert torch.equal(method.queue.keys[8:], before[8:])


def _ref_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """-log softmax of [q.k, q.queue_j] / t at the positive, averaged; float64, rows normalised."""
    q, k, queue = (F.normalize(x.double(), dim=1) for x in (q, k, queue))
    total = torch.zeros((), dtype=torch.float64)
    for i in range(q.shape[0]):
        pos = torch.exp(q[i] @ k[i] / t)
        total = total - torch.log(pos / (pos + torch.exp(queue @ q[i] / t).sum()))
    return total / q.shape[0]


def test_moco_symmetric_contrasts_each_query_with_the_other_views_queue() -> None:
    """solo-learn's MoCo v2+: q1 vs k2 and the queue of past view-2 keys, q2 vs k1 and the
    queue of past view-1 keys, averaged; each view's keys go to its own queue."""
    method = _build("mocov2", symmetric=True)
    method.eval()  # BN with running statistics: the reference forward sees the same numbers
    v1, v2 = _views()
    for _ in range(2):  # fill the queues with something else than their random init
        method.training_step(list(_views(seed=5)))
    old2, old1 = method.queue.keys.clone(), method.queue_view1.keys.clone()
    assert not torch.equal(old1, old2)
    with torch.no_grad():
        q1 = method.projector(method.backbone(v1))
        q2 = method.projector(method.backbone(v2))
        k1, k2 = method.momentum(v1), method.momentum(v2)
    loss, _ = method.training_step([v1, v2])
    t = method.temperature
    expected = 0.5 * (_ref_info_nce(q1, k2, old2, t) + _ref_info_nce(q2, k1, old1, t))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    p = 16 % 64  # two earlier steps of 8 keys
    torch.testing.assert_close(method.queue.keys[p:p + 8], F.normalize(k2, dim=1))
    torch.testing.assert_close(method.queue_view1.keys[p:p + 8], F.normalize(k1, dim=1))
    assert "queue_view1.keys" in method.state_dict()
    assert _build("mocov2", symmetric=False).queue_view1 is None


def _moco_body(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # identical weights on both ranks, as DDP guarantees
    method = build_method(method_cfg("mocov2", **SMALL_HEADS, queue_size=64, symmetric=False,
                                     bn="shuffle"), TINY_BACKBONE)
    assert isinstance(method, MoCoV2)
    v1, v2 = _views(seed=100 + rank)
    out: dict[str, torch.Tensor] = {}
    # eval mode first (running statistics still identical on both ranks; a real DDP run keeps
    # them so by broadcasting buffers): BN ignores the batch, so the shuffle must be exactly
    # undone, and the enqueued keys must be exactly the plain ones
    method.eval()
    out["keys_eval"] = method.keys(v2)
    out["plain_eval"] = F.normalize(method.momentum(v2), dim=1)
    loss, _ = method.training_step([v1, v2])
    loss.backward()
    out["queue"] = method.queue.keys.clone()
    out["ptr"] = method.queue.ptr.clone()
    # train mode: the key BN statistics come from a shuffled sub-batch
    method.train()
    torch.manual_seed(1 + rank)
    out["keys_train"] = method.keys(v2)
    out["plain_train"] = F.normalize(method.momentum(v2), dim=1)
    return out


@pytest.mark.timeout(180)
def test_moco_shuffle_bn_and_queue_under_two_gloo_ranks() -> None:
    r0, r1 = run_ddp(_moco_body, world_size=2)
    for r in (r0, r1):
        torch.testing.assert_close(r["keys_eval"], r["plain_eval"], rtol=1e-5, atol=1e-6)
        # train mode: key BN statistics come from a shuffled sub-batch, not this rank's own
        assert not torch.allclose(r["keys_train"], r["plain_train"], atol=1e-4)
    # both ranks hold the same queue: rank 0's 8 keys then rank 1's, pointer past them
    assert torch.equal(r0["queue"], r1["queue"])
    assert int(r0["ptr"]) == int(r1["ptr"]) == 16
    # the enqueued keys are each rank's own keys of view 2 (unshuffled), in rank order
    torch.testing.assert_close(r0["queue"][:8], r0["plain_eval"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["queue"][8:16], r1["plain_eval"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(r0["plain_eval"], r1["plain_eval"], atol=1e-3)
    # shuffle-BN against moco/builder.py's semantics, recomputed here on one process: rank 0's
    # permutation (seed 1) of the global batch, rank r encodes slice r of it (train-mode BN
    # over that slice), the keys go back to the rank and position of their image
    torch.manual_seed(0)
    ref = build_method(method_cfg("mocov2", **SMALL_HEADS, queue_size=64, symmetric=False,
                                  bn="shuffle"), TINY_BACKBONE)
    ref.train()
    x_all = torch.cat([_views(seed=100 + r)[1] for r in range(2)])
    torch.manual_seed(1)
    perm = torch.randperm(16)
    keys = torch.empty(16, SMALL_HEADS["proj_output_dim"])
    with torch.no_grad():
        for r in range(2):
            keys[perm[r * 8:(r + 1) * 8]] = ref.momentum(x_all[perm[r * 8:(r + 1) * 8]])
    keys = F.normalize(keys, dim=1)
    torch.testing.assert_close(r0["keys_train"], keys[:8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r1["keys_train"], keys[8:], rtol=1e-4, atol=1e-5)


def _solo_learn_vicreg(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """solo-learn's vicreg_loss_func with its CIFAR weights 25/25/1, in float64: its variance
    term is relu(1 - std) averaged per branch and SUMMED over the branches (not halved)."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    inv = ((z1 - z2) ** 2).mean()
    var = sum(torch.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean() for z in (z1, z2))
    cov = 0.0
    for z in (z1, z2):
        zc = z - z.mean(dim=0)
        c = zc.T @ zc / (n - 1)
        cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d
    return 25.0 * inv + 25.0 * var + 1.0 * cov


def test_vicreg_cifar_preset_equals_solo_learn_recipe_and_imagenet_the_official_one() -> None:
    """The official loss halves the variance term; the CIFAR preset must make up for it."""
    from sslstream.models.objectives import vicreg_loss

    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 12, generator=g) * 0.3, torch.randn(16, 12, generator=g) * 0.3
    cifar = _build("vicreg")
    sim, std, cov = cifar.coeffs
    got, _ = vicreg_loss(z1.double(), z2.double(), sim, std, cov)
    torch.testing.assert_close(got, _solo_learn_vicreg(z1, z2), rtol=1e-10, atol=1e-10)
    imagenet = method_cfg("vicreg", "imagenet")
    assert (imagenet.sim_coeff, imagenet.std_coeff, imagenet.cov_coeff) == (25.0, 25.0, 1.0)


def _ref_byol_term(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i || p_i/|p_i| - z_i/|z_i| ||^2 in float64, written from the paper's Eq. 2."""
    p, z = p.double(), z.double()
    p = p / p.norm(dim=1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True)
    return ((p - z) ** 2).sum(dim=1).mean()


def test_byol_loss_is_symmetric_predictor_online_only_and_target_uses_batch_statistics() -> None:
    method = _build("byol")
    # make the target differ from the online network (as after training) so a mix-up shows
    method.after_optimizer_step(0, 10)
    with torch.no_grad():
        for p in itertools.chain(method.backbone.parameters(), method.projector.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    method.train()
    v1, v2 = _views(batch=12)
    target = copy.deepcopy(method.momentum.target).train()
    target_eval = copy.deepcopy(method.momentum.target).eval()
    online = copy.deepcopy(torch.nn.Sequential(method.backbone, method.projector)).train()
    predictor = copy.deepcopy(method.predictor).train()
    with torch.no_grad():
        p1, p2 = predictor(online(v1)), predictor(online(v2))
        t1, t2 = target(v1), target(v2)
        e1, e2 = target_eval(v1), target_eval(v2)
    loss, _ = method.training_step([v1, v2])
    expected = _ref_byol_term(p1, t2) + _ref_byol_term(p2, t1)  # the paper's symmetrised sum
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # the alternatives a bug would produce are far from it
    assert abs(float(expected) - float(_ref_byol_term(p1, e2) + _ref_byol_term(p2, e1))) > 1e-3
    assert abs(float(expected) - 2 * float(_ref_byol_term(p1, t2))) > 1e-3
    assert abs(float(expected) - float(_ref_byol_term(p1, predictor(t2).detach())
                                       + _ref_byol_term(p2, predictor(t1).detach()))) > 1e-3
    loss.backward()
    assert all(p.grad is not None for p in method.predictor.parameters())
    assert all(p.grad is None for p in method.momentum.parameters())


def test_loading_another_methods_or_shapes_checkpoint_is_a_clear_error() -> None:
    from sslstream.models.methods import CheckpointMismatchError

    byol = _build("byol")
    before = {k: v.clone() for k, v in byol.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"method 'byol'.*modules \[backbone, "
                                                      r"projector\].*another method"):
        byol.load_state_dict(_build("simclr", seed=3).state_dict())
    # nothing was half-loaded
    assert all(torch.equal(v, before[k]) for k, v in byol.state_dict().items())
    wider = build_method(method_cfg("byol", **{**SMALL_HEADS, "proj_output_dim": 32},
                                    pred_hidden_dim=32), TINY_BACKBONE).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches.*projector"):
        byol.load_state_dict(wider)
    sym = _build("mocov2", symmetric=True).state_dict()
    with pytest.raises(RuntimeError, match="queue_view1"):  # still a RuntimeError for callers
        _build("mocov2", symmetric=False).load_state_dict(sym)
    # a fitting checkpoint loads; strict=False keeps torch's lenient behaviour
    byol.load_state_dict(_build("byol", seed=4).state_dict())
    byol.load_state_dict({k: v for k, v in wider.items() if k.startswith("backbone.")},
                         strict=False)
