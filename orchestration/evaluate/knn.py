"""Weighted kNN (InstDisc, Wu et al. 2018; lightly's benchmark): cosine similarity of
L2-normalised features against a bank, the k nearest vote with weight exp(sim / t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels of `query` (N, D) by weighted kNN over `bank` (M, D), cosine."""
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    k = min(k, b.shape[0])
    preds = []
    for s in range(0, q.shape[0], chunk):
        sim = q[s : s + chunk] @ b.T  # (n, M)
        w, idx = sim.topk(k, dim=1)
        lab = bank_labels[idx]  # (n, k)
        scores = torch.zeros(sim.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, lab, (w / t).exp())
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Top-1 accuracy of weighted kNN (k, temperature t) of `query` against `bank`."""
    if bank.shape[0] == 0 or query.shape[0] == 0:
        raise ValueError("kNN needs a non-empty bank and query set (check data.bank / data.test)")
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max()).item()) + 1
    pred = knn_predict(query, bank, bank_labels.long(), num_classes, k=k, t=t)
    return float((pred.cpu() == query_labels.cpu()).float().mean().item())
