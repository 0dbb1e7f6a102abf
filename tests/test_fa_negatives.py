"""The negative side (pretrain/fa/negatives.py): MoCHi's generated negatives, FT's mixed queue."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.fa import (
    HardMix,
    QueueMix,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_queue_mix_is_one_mu_and_one_permutation():
    torch.manual_seed(0)
    queue = F.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    mixed = QueueMix(alpha=1.6)(queue)
    found = None
    for j in range(12):  # row 0 = mu n_0 + (1 - mu) n_pi(0): find pi(0) and mu
        if j == 0:
            continue
        mu = ((mixed[0] - queue[j]) / (queue[0] - queue[j]))[0]
        if torch.allclose(mixed[0], mu * queue[0] + (1 - mu) * queue[j]):
            found = mu
            break
    assert found is not None and 0 <= found <= 1
    # every row is a mix with the same mu of itself and one other entry, a permutation
    partners = []
    for i in range(12):
        rest = (mixed[i] - found * queue[i]) / (1 - found)
        partners.append(int(torch.cdist(rest[None], queue).argmin()))
        torch.testing.assert_close(rest, queue[partners[-1]])
    assert sorted(partners) == list(range(12))


def test_hardmix_outputs_unit_norm_detached_mixes_of_top_negatives():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(10, 8, dtype=torch.float64), dim=1)
    mix = HardMix(top_n=2, num=3, query_num=4)
    out = mix(q, queue)  # [3, 7, 8]: 3 neg-neg mixes, then 4 query-neg mixes
    assert out.shape == (3, 7, 8) and not out.requires_grad and out.dtype == torch.float64
    torch.testing.assert_close(out.norm(dim=2), torch.ones(3, 7, dtype=torch.float64))
    # float64 least squares on two unit 8-vectors: residuals ~ cond * eps64, far below tol
    tol = 1e-10
    top2 = (q.detach() @ queue.t()).topk(2, dim=1).indices
    for i in range(3):
        basis = queue[top2[i]].t()  # [8, 2]: the two hardest negatives
        for h in out[i, :3]:  # neg-neg: in their span, with non-negative weights
            coef = torch.linalg.lstsq(basis, h[:, None]).solution[:, 0]
            torch.testing.assert_close(basis @ coef, h, atol=tol, rtol=0)
            assert (coef >= -tol).all()
        for h in out[i, 3:]:  # query-neg: beta q + (1 - beta) n, beta <= 1/2
            fits = []
            for c in range(2):
                basis_qc = torch.stack([q[i].detach(), queue[top2[i, c]]], dim=1)
                a, b = torch.linalg.lstsq(basis_qc, h[:, None]).solution[:, 0]
                if torch.allclose(basis_qc @ torch.stack([a, b]), h, rtol=0, atol=tol):
                    fits.append((a / (a + b)).item())
            assert any(-tol <= beta <= 0.5 + tol for beta in fits)


def test_hardmix_closed_form_similarities_match_the_built_negatives():
    """``similarities`` = q·h of ``forward``'s h, in value and in gradient (h a constant)."""
    mix = HardMix(top_n=5, num=4, query_num=5)
    g = torch.Generator().manual_seed(1)
    f64 = dict(generator=g, dtype=torch.float64)  # the same algebra both ways: float64
    queue = torch.randn(40, 16, **f64) * 0.7  # not unit: the norms must be exact too
    q0 = F.normalize(torch.randn(6, 16, **f64), dim=1)
    w = torch.randn(6, 9, **f64)  # a random upstream gradient
    q_ref, q_new = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    torch.manual_seed(7)
    ref = torch.einsum("nc,nmc->nm", q_ref, mix(q_ref, queue))  # [6, 9]
    torch.manual_seed(7)
    new = mix.similarities(q_new, queue)
    assert new.dtype == torch.float64
    # sums of 16 products of values <= 3 in another order: within 1e-12, 100x float64's rounding
    torch.testing.assert_close(new, ref, atol=1e-12, rtol=0)
    (ref * w).sum().backward()
    (new * w).sum().backward()
    torch.testing.assert_close(q_new.grad, q_ref.grad, atol=1e-12, rtol=0)

