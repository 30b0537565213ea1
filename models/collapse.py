"""Collapse monitors for a batch of embeddings ``z`` of shape (B, D).

* :func:`embedding_std` -- the SimSiam paper's monitor (its Fig. 2): the per-dimension standard
  deviation of the L2-normalised embeddings, averaged over dimensions. Embeddings spread
  isotropically on the unit sphere give ~``1/sqrt(D)``; a complete collapse (every sample
  mapped to the same vector) gives 0.
* :func:`effective_rank` -- Roy & Vetterli (2007): ``exp(H(p))`` with ``p_k = s_k / sum(s)``
  the normalised singular values of ``z``. It is D-ish for well spread embeddings and 1 for
  embeddings on a line: it also catches the *dimensional* collapse that the std misses.

Both return Python floats (one host synchronisation): call them at monitoring frequency,
not every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["embedding_std", "effective_rank"]


def _check(z: torch.Tensor, fn: str) -> torch.Tensor:
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"{fn}: expected embeddings of shape (B >= 2, D), got {tuple(z.shape)}")
    return z.detach().float()


def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the (unbiased) batch std of ``normalize(z, dim=1)``."""
    z = F.normalize(_check(z, "embedding_std"), dim=1)
    return float(z.std(dim=0).mean())


def effective_rank(z: torch.Tensor, *, eps: float = 1e-12) -> float:
    """Roy & Vetterli's effective rank of ``z`` (not centred), in ``[1, min(B, D)]``.

    Singular values are computed in float32 on ``z``'s device; the entropy in float64.
    Returns 0.0 for an all-zero matrix (no direction at all).
    """
    s = torch.linalg.svdvals(_check(z, "effective_rank")).double()
    total = s.sum()
    if float(total) <= 0.0:
        return 0.0
    p = s / total
    entropy = -(p * torch.log(p.clamp_min(eps))).sum()
    return float(math.exp(float(entropy)))
