"""Evaluation math: weighted kNN against a float64 reference loop, the linear probe."""

from __future__ import annotations

import math

import pytest
import torch
from sslstream.orchestration.evaluate.knn import knn_accuracy, knn_predict
from sslstream.orchestration.evaluate.probe import linear_probe


def reference_knn(query, bank, bank_labels, num_classes, k, t):
    """InstDisc / lightly weighted kNN written out per query in float64."""
    preds = []
    q64, b64 = query.double(), bank.double()
    for qi in q64:
        sims = []
        for j, bj in enumerate(b64):
            cos = float(qi @ bj) / (math.sqrt(float(qi @ qi)) * math.sqrt(float(bj @ bj)))
            sims.append((cos, j))
        sims.sort(reverse=True)
        votes = [0.0] * num_classes
        for cos, j in sims[:k]:
            votes[int(bank_labels[j])] += math.exp(cos / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,t", [(200, 0.1), (5, 0.07), (1, 0.5)])
def test_knn_matches_float64_reference(k, t):
    g = torch.Generator().manual_seed(k)
    num_classes = 4
    centers = torch.randn(num_classes, 8, generator=g)
    bank_y = torch.randint(0, num_classes, (60,), generator=g)
    bank = centers[bank_y] + 1.2 * torch.randn(60, 8, generator=g)
    q_y = torch.randint(0, num_classes, (25,), generator=g)
    query = centers[q_y] + 1.2 * torch.randn(25, 8, generator=g)
    expected = reference_knn(query, bank, bank_y, num_classes, min(k, 60), t)
    got = knn_predict(query, bank, bank_y, num_classes, k=k, t=t, chunk=7)
    assert torch.equal(got, expected)
    acc = knn_accuracy(bank, bank_y, query, q_y, num_classes, k=k, t=t)
    assert acc == pytest.approx(float((expected == q_y).float().mean()))


def test_knn_weights_votes_by_exp_similarity_not_counts():
    # two class-0 neighbours far away (cos ~0.1), one class-1 neighbour close (cos 0.9):
    # a majority vote says 0; exp(cos / 0.1) weighting says 1
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.1, math.sqrt(1 - 0.01)], [0.1, -math.sqrt(1 - 0.01)], [0.9, math.sqrt(1 - 0.81)]])
    labels = torch.tensor([0, 0, 1])
    assert knn_predict(q, bank, labels, 2, k=3, t=0.1).item() == 1
    assert knn_predict(q, bank, labels, 2, k=3, t=100.0).item() == 0  # t -> inf: plain counts


def test_knn_rejects_empty_bank():
    with pytest.raises(ValueError, match="data.bank"):
        knn_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, dtype=torch.long))


def test_linear_probe_learns_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 5, 32
    w = torch.randn(dim, num_classes, generator=g)
    x = torch.randn(3000, dim, generator=g)
    logits = x @ w
    top2 = logits.topk(2, dim=1).values
    x = x[top2[:, 0] - top2[:, 1] > 1.0][:1200] * 50.0 + 3.0  # a margin; scale standardised away
    y = (((x - 3.0) / 50.0) @ w).argmax(1)
    assert x.shape[0] == 1200
    acc = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], num_classes, epochs=30, lr=0.1, batch_size=128)
    assert acc >= 0.98
    # and it is deterministic for a seed
    assert acc == linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], num_classes, epochs=30, lr=0.1, batch_size=128)


def test_linear_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 16, generator=g)
    y = torch.randint(0, 4, (600,), generator=g)
    acc = linear_probe(x[:400], y[:400], x[400:], y[400:], 4, epochs=10)
    assert acc < 0.45  # chance is 0.25; a leak of test labels would show here
