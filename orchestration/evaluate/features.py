"""Feature extraction from a frozen encoder over an eval loader, gathered over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from orchestration.runtime.distributed import all_reduce_max, gather_rows

PROGRESS_EVERY_S = 15.0  # feature extraction over a large bank takes minutes: say so


@torch.no_grad()
def extract_features(
    embed: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    gather: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample the loader yields, gathered over ranks.
    `progress(samples so far)` is called after every batch (this rank's count)."""
    feats, labels = [], []
    seen = 0
    for x, y in batches:
        if device.type == "cuda":
            # channels_last like the trained model (a layout mismatch costs a conversion per conv)
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f = embed(x)
        else:
            f = embed(x.to(device))
        feats.append(f.float().flatten(1))
        labels.append(y.to(device).long())
        seen += int(y.shape[0])
        if progress is not None:
            progress(seen)
    lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if not gather:
        return (torch.cat(feats) if feats else torch.zeros(0, 0, device=device)), lab
    # A rank may have seen no sample at all (tiny split, many ranks): agree on the width.
    dim = int(all_reduce_max(float(feats[0].shape[1]) if feats else 0.0, device))
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    return gather_rows(f), gather_rows(lab)
