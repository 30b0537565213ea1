"""Feature extraction from a frozen encoder over an eval loader.

`extract_local` keeps each rank's features on that rank (the bank stays sharded) with the
samples' split positions, and times reading (waiting for the loader) and embedding
separately; `gather_features` gathers them over ranks (the test split, small).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from sslstream.orchestration.runtime.distributed import all_reduce_max, gather_rows

PROGRESS_EVERY_S = 15.0  # feature extraction over a large bank takes minutes: say so


@dataclass
class Features:
    """One rank's features (fp32), labels and split positions, in reading order."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    read_s: float = 0.0  # time waiting for the loader (reading, decoding, transforms)
    embed_s: float = 0.0  # time in the encoder
    extra: dict = field(default_factory=dict)

    def sorted(self) -> Features:
        """Rows in split order (the same order whatever the rank count)."""
        o = self.index.argsort()
        return Features(self.x[o], self.y[o], self.index[o], self.read_s, self.embed_s, self.extra)


@torch.no_grad()
def extract_local(
    embed: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, ...]],
    device: torch.device,
    *,
    progress: Callable[[int], None] | None = None,
) -> Features:
    """This rank's features of every sample its loader yields (x, y[, index]).

    `progress(samples so far)` is called after every batch (this rank's count). Without
    an index in the batches, positions count from 0 on this rank.
    """
    feats, labels, index = [], [], []
    seen, read_s, embed_s = 0, 0.0, 0.0
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            read_s += time.perf_counter() - t0
            break
        t1 = time.perf_counter()
        read_s += t1 - t0
        x, y = batch[0], batch[1]
        ix = batch[2] if len(batch) > 2 else torch.arange(seen, seen + int(y.shape[0]))
        if device.type == "cuda":
            # channels_last like the trained model (a layout mismatch costs a conversion per conv)
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f = embed(x)
        else:
            f = embed(x.to(device))
        feats.append(f.float().flatten(1))
        labels.append(y.to(device).long())
        index.append(ix.to(device).long())
        seen += int(y.shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the time is the encoder's, not the next read's
        embed_s += time.perf_counter() - t1
        if progress is not None:
            progress(seen)
    # A rank may have seen no sample at all (tiny split, many ranks): agree on the width.
    dim = int(all_reduce_max(float(feats[0].shape[1]) if feats else 0.0, device))
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return Features(torch.cat(feats) if feats else torch.zeros(0, dim, device=device),
                    torch.cat(labels) if labels else empty,
                    torch.cat(index) if index else empty, read_s, embed_s)


def gather_features(f: Features) -> Features:
    """Every rank's rows on every rank, in split order."""
    return Features(gather_rows(f.x), gather_rows(f.y), gather_rows(f.index), f.read_s,
                    f.embed_s).sorted()
