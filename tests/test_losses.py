"""``pretrain.losses``: InfoNCE, SimSiam's negative cosine and BYOL's regression loss.

Truths: hand computations in plain Python floats on small vectors whose dot products are known
(3-4-5 triangles), and the stop-gradient read off ``.grad``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.losses import info_nce, negative_cosine, regression_loss


def test_info_nce_equals_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0]]), dim=1)
    queue = F.normalize(torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]), dim=1)
    T = 0.5

    def hand(i, extra=()):
        dot = lambda a, b: sum(float(x) * float(y) for x, y in zip(a, b, strict=True))  # noqa: E731
        pos = dot(q[i], k[i]) / T
        negs = [dot(q[i], n) / T for n in queue] + [e / T for e in extra]
        return -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs))

    loss, logits = info_nce(q, k, queue, T)
    assert logits.shape == (2, 4)
    assert math.isclose(float(loss), (hand(0) + hand(1)) / 2, rel_tol=1e-6)
    # extra negatives join the denominator; -inf entries are ignored
    extra = torch.tensor([[0.3, float("-inf")], [float("-inf"), -0.2]])
    loss, logits = info_nce(q, k, queue, T, extra)
    assert logits.shape == (2, 6)
    assert math.isclose(float(loss), (hand(0, [0.3]) + hand(1, [-0.2])) / 2, rel_tol=1e-6)


def test_simsiam_and_byol_losses_equal_their_formulas():
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[4.0, 3.0], [0.0, 2.0]], requires_grad=True)
    # cos = 24/25 and 0
    assert math.isclose(float(negative_cosine(p, z)), -(0.96 + 0.0) / 2, rel_tol=1e-6)
    assert math.isclose(float(regression_loss(p, z)), ((2 - 2 * 0.96) + 2) / 2, rel_tol=1e-6)
    (negative_cosine(p, z) + regression_loss(p, z)).backward()
    assert z.grad is None and p.grad is not None  # stop-gradient on the target
