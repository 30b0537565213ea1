"""Running a network over multi-crop views: one forward per crop size.

DINO and SwAV see two global crops and N smaller local crops. Their official code (DINO's
``MultiCropWrapper``, SwAV's ``ResNet.forward`` over ``idx_crops``) concatenates the crops
of one size and runs the backbone once per size, then the head once over all of them: the
global crops share one forward (and, on a ResNet, one set of BN batch statistics), the
local crops another. :func:`forward_by_size` does the same, so a multi-crop method sees the
statistics the papers trained with and pays one backbone call per size, not per crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["forward_by_size"]


def forward_by_size(network: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """``network`` over every view, one call per run of consecutive views of one size.

    Returns the outputs of all views concatenated in the order of ``views`` (view ``i``'s
    rows are ``[i * B, (i + 1) * B)``, every view holding the same B images).

    Example:
        >>> net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # two calls here
        >>> views = [torch.randn(2, 3, 8, 8)] * 2 + [torch.randn(2, 3, 4, 4)] * 3
        >>> forward_by_size(net, views).shape
        torch.Size([10, 3])
    """
    if not views:
        raise ValueError("forward_by_size: no views")
    outputs: list[torch.Tensor] = []
    start = 0
    for end in range(1, len(views) + 1):
        if end == len(views) or views[end].shape[-2:] != views[start].shape[-2:]:
            batch = views[start] if end - start == 1 else torch.cat(list(views[start:end]))
            outputs.append(network(batch))
            start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
