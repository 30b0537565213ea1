"""DINO's self-distillation loss and teacher temperature schedule (Caron et al. 2021).

- [0]: Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294
- [1]: https://github.com/facebookresearch/dino (``main_dino.py``: ``DINOLoss``)

The loss is local per rank (a mean over this rank's images), so the mean over ranks is the
full-batch loss and DDP's gradient average is exact. The one cross-rank quantity, the
teacher center, is state: :class:`sslstream.models.state.DINOCenter` updates it from the
all-reduced batch mean after each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sslstream.models.objectives._common import (
    LossParts,
    check_positive,
    full_precision,
    upcast,
)

__all__ = ["dino_loss", "teacher_temperature"]


def teacher_temperature(epoch: int, teacher_temp: float, warmup_teacher_temp: float,
                        warmup_epochs: int) -> float:
    """The teacher temperature of ``epoch`` (0-based): linear warm-up, then constant.

    As the official ``np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)``
    followed by ``teacher_temp``: epoch ``e < warmup_epochs`` gets
    ``warmup + (teacher - warmup) * e / (warmup_epochs - 1)`` (the last warm-up epoch already
    reaches ``teacher_temp``; one warm-up epoch gives ``warmup_teacher_temp``), later epochs
    ``teacher_temp``. Paper values: 0.04 -> 0.04 (ViT-S/16 default) or 0.04 -> 0.07 over 30
    epochs.

    Example:
        >>> teacher_temperature(0, 0.07, 0.04, 30), teacher_temperature(29, 0.07, 0.04, 30)
        (0.04, 0.07)
    """
    check_positive("teacher_temperature", "teacher_temp", teacher_temp)
    check_positive("teacher_temperature", "warmup_teacher_temp", warmup_teacher_temp)
    if warmup_epochs < 0 or epoch < 0:
        raise ValueError(
            f"teacher_temperature: epoch and warmup_epochs must be >= 0, got {epoch}, "
            f"{warmup_epochs}")
    if epoch >= warmup_epochs:
        return float(teacher_temp)
    if warmup_epochs == 1:
        return float(warmup_teacher_temp)
    return float(warmup_teacher_temp
                 + (teacher_temp - warmup_teacher_temp) * epoch / (warmup_epochs - 1))


def _check_crops(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                 center: torch.Tensor) -> None:
    if not teacher or len(student) < len(teacher):
        raise ValueError(
            f"dino_loss: needs >= 1 teacher crop and at least as many student crops (the "
            f"first len(teacher) student crops are the same images), got {len(teacher)} "
            f"teacher and {len(student)} student crops")
    if len(student) < 2:
        raise ValueError("dino_loss: needs >= 2 crops in all (same-crop pairs are excluded)")
    first = teacher[0]
    for label, crops in (("teacher", teacher), ("student", student)):
        for i, t in enumerate(crops):
            if t.ndim != 2 or t.shape != first.shape or not t.is_floating_point():
                raise ValueError(
                    f"dino_loss: {label} crop {i} must be a floating (B, K) tensor shaped "
                    f"like teacher crop 0 {tuple(first.shape)}, got {tuple(t.shape)} {t.dtype}")
    if center.numel() != first.shape[1]:
        raise ValueError(
            f"dino_loss: center must hold K={first.shape[1]} values, got {tuple(center.shape)}")


def dino_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    center: torch.Tensor,
    *,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
) -> LossParts:
    """Cross-entropy of the student's crops against the centred, sharpened teacher.

    With s_v the student head outputs of crop v (all crops: the globals first, then the
    locals), t_g the teacher outputs of global crop g and c the center::

        P_t(g) = softmax((t_g - c) / teacher_temp)             (no gradient)
        log P_s(v) = log_softmax(s_v / student_temp)
        loss = mean over pairs (g, v), v != g, of  mean_i  -sum_k P_t(g)_ik log P_s(v)_ik

    Pairs: every teacher (global) crop g with every student crop v except the same crop
    (``v == g``), ``G * (V - 1)`` pairs for G globals and V crops; each pair is averaged over
    the batch, then the pairs are averaged (the official code and lightly's ``DINOLoss``).

    Args:
        student: V tensors (B, K): the student head outputs, crop ``i < len(teacher)`` is the
            same image crop as ``teacher[i]``.
        teacher: G tensors (B, K): the teacher head outputs of the global crops (detached
            here).
        center: (K,) or (1, K) running center (:class:`~sslstream.models.state.DINOCenter`).
        teacher_temp: teacher temperature (see :func:`teacher_temperature`).
        student_temp: student temperature (0.1).

    Returns:
        ``LossParts(loss, parts)`` with ``parts = {"teacher_entropy", "kl"}`` (detached):
        the teacher distributions' mean entropy and ``loss - teacher_entropy`` (the mean KL
        divergence); a teacher entropy near log K (uniform) or 0 (one-hot) warns of collapse.

    Example:
        >>> s = [torch.randn(8, 64) for _ in range(4)]     # 2 global + 2 local crops
        >>> t = [torch.randn(8, 64) for _ in range(2)]     # teacher: the globals only
        >>> loss, parts = dino_loss(s, t, torch.zeros(64), teacher_temp=0.04)
    """
    _check_crops(student, teacher, center)
    check_positive("dino_loss", "teacher_temp", teacher_temp)
    check_positive("dino_loss", "student_temp", student_temp)
    crops = upcast(*student, *(t.detach() for t in teacher), center.detach())
    student_up, teacher_up, c = crops[:len(student)], crops[len(student):-1], crops[-1]
    with full_precision(c.device):
        c = c.reshape(1, -1).to(teacher_up[0].dtype)
        targets = [F.softmax((t - c) / teacher_temp, dim=1) for t in teacher_up]
        log_preds = [F.log_softmax(s / student_temp, dim=1) for s in student_up]
        total = log_preds[0].new_zeros(())
        for g, p_t in enumerate(targets):
            for v, log_p_s in enumerate(log_preds):
                if v != g:
                    total = total + (-(p_t * log_p_s).sum(dim=1)).mean()
        loss = total / (len(targets) * (len(log_preds) - 1))
        entropy = torch.stack(
            [-(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=1).mean()
             for p in targets]).mean()
    parts = {"teacher_entropy": entropy.detach(), "kl": (loss - entropy).detach()}
    return LossParts(loss, parts)
