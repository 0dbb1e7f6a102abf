"""``pretrain.evaluation``: the weighted kNN vote, by hand."""

from __future__ import annotations

import math

import torch

from pretrain.evaluation import knn_scores, knn_top1


def test_knn_weighted_vote_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    # k=3: sims 1.0 (class 0), 0.6 (class 1), 0.6 (class 1); weights exp(s / 0.1)
    scores = knn_scores(q, bank, labels, num_classes=3, k=3, t=0.1)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(10), 2 * math.exp(6), 0.0]]))
    assert scores.argmax().item() == 0  # a plain majority vote would say class 1
    # with t=1 the two class-1 neighbours outweigh: e^1 < 2 e^0.6
    assert knn_scores(q, bank, labels, 3, k=3, t=1.0).argmax().item() == 1
    assert knn_top1(bank, labels, q.repeat(2, 1), torch.tensor([0, 1]), 3, k=3) == 50.0
