"""Optimisers and learning-rate schedules for SSL pre-training.

* :class:`LARS` -- SGD with momentum whose per-tensor step is scaled by the trust ratio
  ``eta * ||w|| / (||g|| + wd * ||w||)`` (You et al. 2017, Eq. 6; solo-learn's LARS, which its
  CIFAR recipes were tuned with) or ``eta * ||w|| / ||g + wd * w||`` (``trust_ratio="update"``:
  the official VICReg / Barlow Twins code and BYOL's optax LARS). Groups flagged ``lars_exclude`` (biases and norm-layer parameters, i.e. every tensor
  with ``ndim <= 1``, and a ViT's position embedding and tokens; see
  ``Method.parameter_groups``) get neither adaptation nor weight decay: the rule of BYOL,
  SimCLR, VICReg and Barlow Twins (and timm's for ViTs).
* :class:`LARSConfig`, :class:`SGDConfig`, :class:`AdamWConfig` -- the ``optim.*`` keys of each
  optimiser (typed, with ranges and defaults); ``OPTIMIZERS`` maps ``optim.name`` to them.
* :func:`build_optimizer` -- LARS / SGD / AdamW from such a config, the base lr scaled by the
  global batch (:func:`scale_lr`), per-group ``lr_mult``.
* :class:`WarmupCosine` -- per-step linear warmup then cosine decay; groups flagged
  ``fixed_lr`` (SimSiam's predictor) keep their initial lr. With ``weight_decay_end``
  (``optim.weight_decay_end``) it also moves the decaying groups' weight decay along a cosine
  from ``optim.weight_decay`` to that value over the run (DINO's 0.04 -> 0.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from sslstream.conf.typed import (
    Check,
    ConfigValueError,
    Ge,
    Gt,
    Interval,
    Typed,
    build,
    did_you_mean,
)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LARS", "OPTIMIZERS", "AdamWConfig", "LARSConfig", "OptimConfig", "SGDConfig",
           "WarmupCosine", "build_optimizer", "optim_config", "scale_lr"]


@dataclass(frozen=True, kw_only=True)
class OptimConfig(Typed):
    """The keys every optimiser has; ``name`` is the registry name (``optim.name``)."""

    name: ClassVar[str] = ""
    config_key: ClassVar[str] = "optim"
    lr: Annotated[float, Ge(0)] = 1.0          # at base_batch; 0 freezes the weights (warm-start checks)
    base_batch: Annotated[int, Ge(1)] = 256
    scaling: Literal["linear", "sqrt", "none"] = "linear"  # lr = lr x (global batch / base_batch)^(1 | 1/2 | 0)
    weight_decay: Annotated[float, Ge(0)] = 1.0e-4
    # the weight decay at the last step, reached by a cosine from weight_decay (DINO: 0.04 ->
    # 0.4); null: constant. Groups without decay (biases, norms) keep none.
    weight_decay_end: Annotated[float, Ge(0)] | None = None
    warmup_epochs: Annotated[float, Ge(0)] | None = None  # null: trainer.warmup_epochs


@dataclass(frozen=True, kw_only=True)
class LARSConfig(OptimConfig):
    """LARS (You et al. 2017) over SGD momentum; biases and norm parameters get neither
    trust-ratio adaptation nor weight decay. Defaults: BYOL's CIFAR recipe (solo-learn)."""

    name = "lars"
    lr: Annotated[float, Ge(0)] = 1.0
    weight_decay: Annotated[float, Ge(0)] = 1.0e-5
    momentum: Annotated[float, Interval(ge=0, le=1)] = 0.9
    eta: Annotated[float, Gt(0)] = 0.02          # trust coefficient (papers at batch 4096: 0.001)
    clip_lr: bool = True                          # LARC clipping: per-tensor lr = min(eta|w|/|g|, lr)
    trust_ratio: Literal["paper", "update"] = "paper"  # paper: eta|w|/(|g| + wd|w|); update: eta|w|/|g + wd w|


@dataclass(frozen=True, kw_only=True)
class SGDConfig(OptimConfig):
    """SGD with momentum (MoCo v2, SimSiam): weight decay on every parameter, as their code."""

    name = "sgd"
    lr: Annotated[float, Ge(0)] = 0.05
    momentum: Annotated[float, Interval(ge=0, le=1)] = 0.9
    nesterov: bool = False
    exclude_bias_and_norm_wd: bool = False


def _betas_ok(betas: tuple[float, float]) -> bool:
    return all(0 <= b < 1 for b in betas)


@dataclass(frozen=True, kw_only=True)
class AdamWConfig(OptimConfig):
    """AdamW: the ViT recipes (DINO, MoCo v3) and lightly's short-run CIFAR SwAV (Adam with a
    tiny weight decay); biases and norms undecayed."""

    name = "adamw"
    lr: Annotated[float, Ge(0)] = 1.0e-3
    weight_decay: Annotated[float, Ge(0)] = 0.05
    betas: Annotated[tuple[float, float], Check(_betas_ok, "each in [0, 1)")] = (0.9, 0.999)
    exclude_bias_and_norm_wd: bool = True


# The registry: `optim.name` (and `optim=<name>` on the command line) picks one of these.
OPTIMIZERS: dict[str, type[OptimConfig]] = {c.name: c for c in (LARSConfig, SGDConfig, AdamWConfig)}


def optim_class(optim_cfg: Mapping[str, Any]) -> type[OptimConfig]:
    """The config class named by ``optim_cfg["name"]`` (ConfigValueError naming the choices)."""
    name = optim_cfg.get("name")
    if name not in OPTIMIZERS:
        raise ConfigValueError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}"
                               f"{did_you_mean(str(name), list(OPTIMIZERS))}", "optim.name")
    return OPTIMIZERS[str(name)]


def optim_config(optim_cfg: OptimConfig | Mapping[str, Any]) -> OptimConfig:
    """``cfg.optim`` as its typed config (a ready one is returned as is)."""
    if isinstance(optim_cfg, OptimConfig):
        return optim_cfg
    return build(optim_class(optim_cfg), optim_cfg, "optim")


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling over SGD with momentum.

    For every parameter ``w`` with gradient ``g`` in a group without ``lars_exclude``::

        d = g + weight_decay * w
        q = eta * ||w|| / (||g|| + weight_decay * ||w|| + eps)     trust_ratio="paper"
        q = eta * ||w|| / ||d||                                     trust_ratio="update"
        (q = 1 when ||w|| == 0, or when the denominator's norm is 0)
        buf = momentum * buf + q * d          (buf = q * d at the first step)
        w = w - lr * buf

    ``paper`` is You et al.'s Eq. 6 and solo-learn's LARS (its CIFAR recipes, our CIFAR
    presets); ``update`` is the official VICReg / Barlow Twins code and BYOL's optax LARS (the
    ImageNet presets). By the triangle inequality the two differ only when ``wd * ||w||`` is
    comparable to ``||g||``; at the papers' wd = 1e-6 they agree to a few parts in 10^6.
    The momentum semantics are PyTorch SGD's (lr outside the buffer), as both references.

    In a group with ``lars_exclude=True``: ``d = g`` (no weight decay), ``q = 1``. The trust
    ratio is computed with ``torch.where`` on the device: no host synchronisation.

    ``clip=True`` is solo-learn's ``clip_lr`` (LARC clipping, used by its CIFAR recipes with
    eta = 0.02): ``q <- min(q / lr, 1)``, so the effective per-tensor lr is
    ``min(eta * ||w|| / ||d||, lr)`` -- the schedule's lr becomes a cap.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.001, clip: bool = False,
                 trust_ratio: str = "paper", eps: float = 1e-8) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0 or eps < 0:
            raise ValueError(
                f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"eta={eta}, eps={eps}"
            )
        if trust_ratio not in ("paper", "update"):
            raise ValueError(f"optim.trust_ratio must be paper or update, got {trust_ratio!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        clip=clip, lars_exclude=False, trust_ratio=trust_ratio, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            # Multi-tensor (torch._foreach_*) ops: a few kernels per group instead of a few
            # per tensor, which matters on a GPU where a ResNet has 60-160 tensors.
            updates = grads if group["lars_exclude"] else self._scaled(params, grads, group)
            fresh, old_bufs, old_updates = [], [], []
            for p, d in zip(params, updates, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                    fresh.append(p)
                else:
                    old_bufs.append(state["momentum_buffer"])
                    old_updates.append(d)
            if old_bufs:
                torch._foreach_mul_(old_bufs, group["momentum"])
                torch._foreach_add_(old_bufs, old_updates)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss

    @staticmethod
    def _scaled(params: list[torch.Tensor], grads: list[torch.Tensor],
                group: dict[str, Any]) -> list[torch.Tensor]:
        """``q * (g + wd * w)`` for every tensor of a group that LARS adapts."""
        wd, eta, lr = group["weight_decay"], group["eta"], group["lr"]
        w_norm = _stack(torch._foreach_norm(params))
        g_norm = _stack(torch._foreach_norm(grads))
        d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else list(grads)
        if group["trust_ratio"] == "paper":
            denom = g_norm + wd * w_norm + group["eps"]
            valid = (w_norm > 0) & (g_norm > 0)
        else:
            denom = _stack(torch._foreach_norm(d))
            valid = (w_norm > 0) & (denom > 0)
        q = torch.where(valid, eta * w_norm / denom, torch.ones_like(w_norm))
        if group["clip"] and lr > 0:
            q = torch.clamp(q / lr, max=1.0)
        return list(torch._foreach_mul(d, list(q.unbind(0))))


def _stack(norms: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor norms as one vector (float32 when the group mixes dtypes)."""
    if len({(n.dtype, n.device) for n in norms}) == 1:
        return torch.stack(list(norms))
    return torch.stack([n.float().to(norms[0].device) for n in norms])


def scale_lr(base_lr: float, global_batch: int, rule: str = "linear", base_batch: int = 256) -> float:
    """The lr for ``global_batch`` from the lr at ``base_batch``.

    ``linear``: ``base_lr * global_batch / base_batch`` (Goyal et al.; SimCLR, BYOL, MoCo,
    SimSiam); ``sqrt``: ``base_lr * sqrt(global_batch / base_batch)`` (SimCLR's small-batch
    alternative); ``none``: ``base_lr``.
    """
    if global_batch < 1 or base_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got global={global_batch} base={base_batch}")
    if rule == "linear":
        return base_lr * global_batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / base_batch)
    if rule == "none":
        return float(base_lr)
    raise ValueError(f"optim.scaling must be linear, sqrt or none, got {rule!r}")


def build_optimizer(param_groups: list[dict[str, Any]], optim_cfg: OptimConfig | Mapping[str, Any],
                    global_batch_size: int) -> Optimizer:
    """An optimiser over ``Method.parameter_groups()`` configured by ``optim_cfg``
    (``cfg.optim`` or a ready :class:`OptimConfig`; its keys: the config classes above).

    The lr is ``lr`` at ``base_batch`` scaled to ``global_batch_size`` by ``scaling``.
    Groups flagged ``lars_exclude`` get no weight decay under LARS (always) and under SGD /
    AdamW with ``exclude_bias_and_norm_wd``. Group keys honoured: ``lr_mult`` (multiplies the
    scaled lr), ``lars_exclude``, ``fixed_lr`` (read by :class:`WarmupCosine`). Extra keys
    stay in the group.
    """
    c = optim_config(optim_cfg)
    lr = scale_lr(c.lr, int(global_batch_size), c.scaling, c.base_batch)
    exclude_wd = c.exclude_bias_and_norm_wd if isinstance(c, SGDConfig | AdamWConfig) else True
    groups: list[dict[str, Any]] = []
    for i, g in enumerate(param_groups):
        if "params" not in g:
            raise ValueError(f"parameter group {i} has no 'params'")
        group = dict(g)
        group["params"] = list(g["params"])
        group.setdefault("lars_exclude", False)
        group.setdefault("fixed_lr", False)
        group["lr"] = lr * float(group.get("lr_mult", 1.0))
        group["weight_decay"] = 0.0 if (exclude_wd and group["lars_exclude"]) else c.weight_decay
        if group["params"]:
            groups.append(group)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    if isinstance(c, LARSConfig):
        return LARS(groups, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay, eta=c.eta,
                    clip=c.clip_lr, trust_ratio=c.trust_ratio)
    # The LARS flag means nothing to torch's optimisers: keep it only as group metadata.
    if isinstance(c, SGDConfig):
        return torch.optim.SGD(groups, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay,
                               nesterov=c.nesterov)
    assert isinstance(c, AdamWConfig)
    return torch.optim.AdamW(groups, lr=lr, betas=c.betas, weight_decay=c.weight_decay)


class WarmupCosine(LRScheduler):
    """Per-step schedule: linear warmup, then cosine decay to ``final_lr_ratio * base``.

    The lr of optimizer step ``k`` (0-based; ``scheduler.step()`` after each optimizer step)::

        k <  W:       base * (start + (1 - start) * (k + 1) / W)
        W <= k < T:   final + (base - final) * (1 + cos(pi * (k - W) / (T - W))) / 2
        k >= T:       final

    with ``start = warmup_start_ratio``, ``final = final_lr_ratio * base``. Groups flagged
    ``fixed_lr`` keep ``base`` throughout (SimSiam's predictor, "fix_pred_lr"). State
    (``last_epoch`` = steps taken) is in ``state_dict``.

    ``weight_decay_end`` (None: the weight decay stays as built) schedules the weight decay
    of every group built with one (``wd > 0``; biases and norms have none) as the official
    DINO ``wd_schedule``, a cosine over all steps without warmup::

        wd_k = end + (wd - end) * (1 + cos(pi * min(k, T) / T)) / 2

    The group's ``weight_decay`` holds the current value (the optimiser reads it, and its
    ``state_dict`` saves it: a resumed run continues exactly); ``initial_weight_decay`` the
    built one.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, *,
                 warmup_start_ratio: float = 0.0, final_lr_ratio: float = 0.0,
                 weight_decay_end: float | None = None, last_epoch: int = -1) -> None:
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"WarmupCosine: need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                f"got warmup_steps={warmup_steps} total_steps={total_steps}"
            )
        if weight_decay_end is not None and weight_decay_end < 0:
            raise ValueError(f"optim.weight_decay_end must be >= 0, got {weight_decay_end}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.warmup_start_ratio = float(warmup_start_ratio)
        self.final_lr_ratio = float(final_lr_ratio)
        self.weight_decay_end = None if weight_decay_end is None else float(weight_decay_end)
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
        super().__init__(optimizer, last_epoch)  # sets the lr (and wd) of step 0

    def factor(self, k: int) -> float:
        """The multiplier of the base lr at optimizer step ``k``."""
        w, t = self.warmup_steps, self.total_steps
        if k < w:
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * (k + 1) / w
        if k >= t:
            return self.final_lr_ratio
        progress = (k - w) / (t - w)
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(self.last_epoch)
        return [
            base if group.get("fixed_lr", False) else base * f
            for base, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)
        ]

    def weight_decay(self, base: float, k: int) -> float:
        """The weight decay at optimizer step ``k`` of a group built with ``base``."""
        end = self.weight_decay_end
        if end is None or base == 0:
            return base
        progress = min(max(k, 0), self.total_steps) / self.total_steps
        return end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        """The lr of the next step (``LRScheduler.step``), then its weight decay."""
        super().step(epoch)
        if self.weight_decay_end is not None:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = self.weight_decay(group["initial_weight_decay"],
                                                          self.last_epoch)

