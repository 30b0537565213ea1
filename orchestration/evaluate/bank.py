"""Bank budgets: a deterministic, class-balanced subset of the bank, the same for any
rank count (periodic evaluation of a 1 M-image split need not score every image).

Which samples are kept depends only on (labels, global indices, seed): each sample gets a
priority from a hash of its index, each class keeps its lowest-priority samples up to
`max_per_class`, and a total budget `samples` is met by water-filling: every class gets
the same quota q (or all it has), the last round filled in priority order. Every rank
computes the same selection from the gathered (label, index) pairs (16 bytes a sample)
and keeps its own rows.
"""

from __future__ import annotations

import torch
from sslstream.orchestration.runtime.distributed import gather_rows

_P = 2_147_483_647  # 2^31 - 1, prime
_A = 16_807 * 1_000_003  # < 2^35: index (< 2^39) * _A stays in int64 after the mod below


def priority(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random order of samples, a pure function of (global index, seed)."""
    x = (index.long() % _P + (seed * 7919) % _P) % _P
    return (x * (_A % _P)) % _P  # < 2^31 * 2^31: fits int64


def _lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """Order by keys[0], then keys[1], ... (stable sorts, last key first)."""
    order = torch.arange(keys[0].numel(), device=keys[0].device)
    for k in reversed(keys):
        order = order[k[order].sort(stable=True).indices]
    return order


def select_balanced(labels: torch.Tensor, index: torch.Tensor, *, max_per_class: int = 0,
                    samples: int = 0, seed: int = 0) -> torch.Tensor:
    """Bool mask over the given rows (all rows of the bank): the balanced subset."""
    n = labels.numel()
    if n == 0 or (max_per_class <= 0 and (samples <= 0 or samples >= n)):
        return torch.ones(n, dtype=torch.bool, device=labels.device)
    labels, prio = labels.long(), priority(index, seed)
    order = _lexsort(labels, prio, index.long())
    sl = labels[order]
    _, counts = torch.unique_consecutive(sl, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank_in_class = torch.empty_like(labels)
    rank_in_class[order] = torch.arange(n, device=labels.device) - starts
    cap = int(max_per_class) if max_per_class > 0 else n
    keep = rank_in_class < cap
    if 0 < samples < int(keep.sum()):
        avail = counts.clamp(max=cap)
        q = 0  # the largest quota with sum(min(avail, q)) < samples
        lo, hi = 0, int(avail.max())
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(avail.clamp(max=mid).sum()) < samples:
                lo = mid
            else:
                hi = mid - 1
        q = lo
        keep = rank_in_class < q
        rest = samples - int(keep.sum())
        last = (rank_in_class == q).nonzero().flatten()  # one more from some classes
        last = last[_lexsort(prio[last], index[last].long())][:rest]
        keep[last] = True
    return keep


def select_local(labels: torch.Tensor, index: torch.Tensor, *, max_per_class: int = 0,
                 samples: int = 0, seed: int = 0) -> torch.Tensor:
    """This rank's part of the balanced subset of the bank held over all ranks."""
    if max_per_class <= 0 and samples <= 0:
        return torch.ones(labels.numel(), dtype=torch.bool, device=labels.device)
    every_y, every_i = gather_rows(labels.long()), gather_rows(index.long())
    keep = select_balanced(every_y, every_i, max_per_class=max_per_class, samples=samples, seed=seed)
    return torch.isin(index.long(), every_i[keep])
