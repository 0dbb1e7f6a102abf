"""MoCo's FA term (pretrain/fa/contrastive.py) against InfoNCE computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fa_helpers import (
    assert_grads_match,
    fa_cfg,
    fa_term_grads,
    moco_by_hand,
    role_terms_by_hand,
)
from tiny_models import build, views

import pretrain.fa as fa
from pretrain.fa import (
    ContrastiveFA,
    ContrastiveInputs,
    build_fa,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hardmix_negatives_are_only_negatives():
    x1, x2 = views()
    base = build(fa_cfg("moco", enabled=False))
    hard = build(fa_cfg("moco", op="hardmix", role="negative", loss_mode="replace"))
    out_base, out_hard = base(x1, x2), hard(x1, x2)
    torch.testing.assert_close(out_hard["loss_ssl"], out_base["loss"])  # the plain problem
    assert out_hard["loss"] == out_hard["loss_fa"] > out_base["loss"]  # more negatives
    assert torch.equal(hard.queue, base.queue)  # never enqueued: only the keys went in


def test_role_negative_appends_other_images_and_never_enqueues():
    model = build(fa_cfg("moco", op="identity", role="negative", loss_mode="replace"))
    base = build(fa_cfg("moco", enabled=False))
    x1, x2 = views()
    _, negative = role_terms_by_hand(model, x1, x2)
    out = model(x1, x2)
    base(x1, x2)
    torch.testing.assert_close(out["loss"], negative)
    assert torch.equal(model.queue, base.queue)


def test_role_both_is_the_mean_of_the_positive_and_negative_terms():
    model = build(fa_cfg("moco", op="identity", role="both", loss_mode="replace"))
    x1, x2 = views()
    plain, negative = role_terms_by_hand(model, x1, x2)  # identity: the positive term is plain
    assert abs(plain - negative) > 1e-3  # the two terms differ, so dropping either shows
    out = model(x1, x2)
    torch.testing.assert_close(out["loss"], (plain + negative) / 2)


def test_feature_transformation_replace_is_the_published_logits(monkeypatch):
    """FT (ICCV 2021): q^ = lq + (1-l)k, k^ = lk + (1-l)q, n^ = mu n + (1-mu) n_perm, one loss
    over [q^.k^, q^.n^] / T. lambda, mu and the permutation are fixed by hand here."""
    cfg = fa_cfg("moco", op="extrapolate", both_sides=True, lambda_per="batch", queue_mix=True,
                 loss_mode="replace")
    model = build(cfg)
    x1, x2 = views()
    q, k, queue = moco_by_hand(model, x1, x2)
    beta = iter([0.25, 0.5])  # first mu (queue mix), then b (lambda = 1 + b)
    monkeypatch.setattr(fa.base, "beta", lambda alpha, n, like: torch.full((n, 1), next(beta)))
    perm = torch.arange(cfg.MODEL.MOCO.K).flip(0)
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: perm)
    out = model(x1, x2)
    lam, mu, T = 1.5, 0.25, cfg.MODEL.MOCO.T
    q_hat, k_hat = lam * q + (1 - lam) * k, lam * k + (1 - lam) * q
    n_hat = mu * queue + (1 - mu) * queue[perm]
    logits = torch.cat([(q_hat * k_hat).sum(1, keepdim=True), q_hat @ n_hat.t()], dim=1) / T
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["loss_fa"], expected)
    torch.testing.assert_close(model.queue[:4], k)  # the plain keys were enqueued


def test_interpolate_soft_target_info_nce_by_hand(monkeypatch):
    """i-Mix: q~_i = l q_i + (1-l) q_j scored against the batch keys and the queue with the
    target l at k_i and 1 - l at k_j."""
    model = build(fa_cfg("moco", op="interpolate", lambda_per="batch", loss_mode="replace"))
    x1, x2 = views()
    q, k, queue = moco_by_hand(model, x1, x2)
    monkeypatch.setattr(fa.base, "beta", lambda alpha, n, like: torch.full((n, 1), 0.7))
    torch.manual_seed(5)
    out = model(x1, x2)
    torch.manual_seed(5)
    shift = int(torch.randint(1, 4, ()))
    j = (torch.arange(4) + shift) % 4
    q_mix = 0.7 * q + 0.3 * q[j]
    logp = F.log_softmax(torch.cat([q_mix @ k.t(), q_mix @ queue.t()], dim=1) / model.T, dim=1)
    expected = -(0.7 * logp[torch.arange(4), torch.arange(4)] + 0.3 * logp[torch.arange(4), j]).mean()
    torch.testing.assert_close(out["loss_fa"], expected)


def test_hardmix_reusing_the_plain_logits_is_the_same_infonce():
    """MoCo hands hardmix the plain logits; the FA term equals InfoNCE(q, k⁺, queue ∪ {h})
    computed from scratch with the same mixes, in value and in gradient."""
    from pretrain.losses import info_nce

    branch = build_fa(fa_cfg("moco", op="hardmix", role="negative", hardmix_topn=6,
                             hardmix_num=5, hardmix_query_num=3), ContrastiveFA, 16)
    g = torch.Generator().manual_seed(3)
    f64 = dict(generator=g, dtype=torch.float64)  # the same algebra both ways: float64
    queue = F.normalize(torch.randn(30, 16, **f64), dim=1)
    q0 = F.normalize(torch.randn(4, 16, **f64), dim=1)
    k = F.normalize(torch.randn(4, 16, **f64), dim=1)
    q_ref, q_new = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    torch.manual_seed(11)
    extra = branch.generators[0].similarities(q_ref, queue)
    ref = info_nce(q_ref, k, queue, 0.2, extra)[0]
    torch.manual_seed(11)
    _, logits = info_nce(q_new, k, queue, 0.2)
    new = branch(ContrastiveInputs(q_new, k, queue, 0.2, logits, None, None, None))
    assert new.dtype == torch.float64
    # reused logits (q·n/T)*T/T differ from q·n/T by a few eps64 of |logits| <= 1/T = 5: the
    # loss and its gradient within 1e-12
    torch.testing.assert_close(new, ref, atol=1e-12, rtol=0)
    ref.backward()
    new.backward()
    torch.testing.assert_close(q_new.grad, q_ref.grad, atol=1e-12, rtol=0)
    assert ref > info_nce(q0, k, queue, 0.2)[0]  # the mixes are real extra negatives



def test_parallel_predictor_is_infonce_of_the_plain_query_against_the_augmented_key(monkeypatch):
    """MoCo's parallel_predictor: InfoNCE(q, λ k + (1 − λ) q, queue), λ fixed by hand."""
    monkeypatch.setattr(fa.base, "beta", lambda alpha, n, like: torch.full((n, 1), 0.25))
    model = build(fa_cfg("moco", op="extrapolate", arch="parallel_predictor",
                         loss_mode="replace"))
    x1, x2 = views()
    q, k, queue = moco_by_hand(model, x1, x2)
    out = model(x1, x2)
    lam = 1.25
    k_hat = lam * k + (1 - lam) * q
    logits = torch.cat([(q * k_hat).sum(1, keepdim=True), q @ queue.t()], dim=1) / model.T
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out["loss_fa"], expected)
    gen = build(fa_cfg("moco", op="generator", arch="parallel_predictor"))
    reached = fa_term_grads(gen, gen(x1, x2)["loss_fa"])
    assert reached["fa"] and reached["backbone"]  # the generator learns through the key


def test_parallel_predictor_grad_is_infonce_against_the_online_key_with_its_gradient(monkeypatch):
    """MoCo's parallel_predictor_grad: InfoNCE(q1, λ q2 + (1 − λ) q1, queue) with q2 the query
    encoder's unit projection of the key view, differentiated (autograd of the formula)."""
    monkeypatch.setattr(fa.base, "beta", lambda alpha, n, like: torch.full((n, 1), 0.25))
    model = build(fa_cfg("moco", op="extrapolate", arch="parallel_predictor_grad",
                         loss_mode="replace"))
    x1, x2 = views()
    _, _, queue = moco_by_hand(model, x1, x2)
    ref = copy.deepcopy(model)
    out = model(x1, x2)
    q1 = F.normalize(ref.projector(ref.backbone(x1)), dim=1)
    q2 = F.normalize(ref.projector(ref.backbone(x2)), dim=1)
    lam = 1.25
    k_hat = lam * q2 + (1 - lam) * q1.detach()  # the positive of the extrapolation: a constant
    logits = torch.cat([(q1 * k_hat).sum(1, keepdim=True), q1 @ queue.t()], dim=1) / model.T
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(out["loss_fa"], expected)
    params, ref_params = list(model.backbone.parameters()), list(ref.backbone.parameters())
    got = torch.autograd.grad(out["loss_fa"], params)
    want = torch.autograd.grad(expected, ref_params, retain_graph=True)
    assert_grads_match(got, want)
    # the key through the momentum encoder (no gradient) would give another gradient
    sg = torch.autograd.grad(F.cross_entropy(torch.cat(
        [(q1 * k_hat.detach()).sum(1, keepdim=True), q1 @ queue.t()], dim=1) / model.T,
        torch.zeros(4, dtype=torch.long)), ref_params)
    with pytest.raises(AssertionError):
        assert_grads_match(got, sg)
