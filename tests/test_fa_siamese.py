"""SimSiam's / BYOL's FA branch and the FA architectures (pretrain/fa/siamese.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fa_helpers import (
    assert_grads_match,
    fa_cfg,
    fa_term_grads,
)
from tiny_models import build, views

import pretrain.fa as fa

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "arch, predictor_learns, fa_learns",
    [
        ("basic", False, False),  # FA(z) compared with the target directly
        ("pre_predictor", True, False),  # pred(FA(z))
        ("post_predictor", True, False),  # FA(pred(z))
        ("separate_predictor", False, True),  # pred_fa(FA(z))
    ],
)
def test_arch_routes_the_fa_branch(arch, predictor_learns, fa_learns):
    model = build(fa_cfg("simsiam", op="dropout", arch=arch))
    assert (model.fa.predictor is not None) == (arch == "separate_predictor")
    reached = fa_term_grads(model, model(*views())["loss_fa"])
    assert (
        reached["backbone"]
        and reached["predictor"] == predictor_learns
        and reached["fa"] == fa_learns
    )


def test_position_backbone_runs_the_projector_on_augmented_trunk_features():
    model = build(fa_cfg("byol", op="noise", noise_std=0.0, position="backbone", arch="basic"))
    x1, x2 = views()
    out = model(x1, x2)
    with torch.no_grad():  # noise 0: FA is the identity, so p~ = projector(h) = z
        z1 = model.projector(model.backbone(x1))
        z2 = model.projector(model.backbone(x2))
        t1 = model.projector_t(model.backbone_t(x1))
        t2 = model.projector_t(model.backbone_t(x2))
    expected = (2 - 2 * F.cosine_similarity(z1, t2)).mean() + (
        2 - 2 * F.cosine_similarity(z2, t1)
    ).mean()
    torch.testing.assert_close(out["loss_fa"], expected)


def test_siamese_two_sided_extrapolation_extrapolates_the_target(monkeypatch):
    monkeypatch.setattr(fa.base, "beta", lambda alpha, n, like: torch.full((n, 1), 0.5))
    model = build(fa_cfg("byol", op="extrapolate", arch="basic", loss_mode="replace"))
    x1, x2 = views()
    out = model(x1, x2)
    with torch.no_grad():
        z1, z2 = (model.projector(model.backbone(x)) for x in (x1, x2))
        t1, t2 = (model.projector_t(model.backbone_t(x)) for x in (x1, x2))
    lam = 1.5
    expected = sum((2 - 2 * F.cosine_similarity(lam * z + (1 - lam) * t, lam * t + (1 - lam) * z)).mean()
                   for z, t in ((z1, t2), (z2, t1)))
    torch.testing.assert_close(out["loss_fa"], expected)



@pytest.mark.parametrize("method", ["simsiam", "byol"])
def test_parallel_predictor_scores_the_plain_prediction_against_the_augmented_target(
        method, monkeypatch):
    """L_fa = Σ_v ℓ(p_v, λ t_v + (1 − λ) p_v) with t_v the other view's target and the
    operator's positive the prediction (two-sided extrapolation, λ fixed by hand)."""
    monkeypatch.setattr(fa.base, "beta", lambda alpha, n, like: torch.full((n, 1), 0.5))
    model = build(fa_cfg(method, op="extrapolate", arch="parallel_predictor",
                         loss_mode="replace"))
    x1, x2 = views()
    out = model(x1, x2)
    with torch.no_grad():
        z1, z2 = (model.projector(model.backbone(x)) for x in (x1, x2))
        p1, p2 = model.predictor(z1), model.predictor(z2)
        if method == "byol":
            t1, t2 = (model.projector_t(model.backbone_t(x)) for x in (x1, x2))
        else:
            t1, t2 = z1, z2
    lam = 1.5

    def cos(p, t):
        return F.cosine_similarity(p, lam * t + (1 - lam) * p).mean()

    if method == "byol":  # ℓ = 2 − 2 cos, summed over the two views
        expected = (2 - 2 * cos(p1, t2)) + (2 - 2 * cos(p2, t1))
    else:  # D = −cos, averaged over the two views
        expected = -0.5 * (cos(p1, t2) + cos(p2, t1))
    torch.testing.assert_close(out["loss_fa"], expected)


def test_parallel_predictor_with_identity_is_the_plain_loss_and_reaches_only_the_online_side():
    model = build(fa_cfg("simsiam", op="identity", arch="parallel_predictor", num=2))
    out = model(*views())
    torch.testing.assert_close(out["loss_fa"], out["loss_ssl"])  # FA(t) = t, NUM copies
    reached = fa_term_grads(model, out["loss_fa"])
    assert reached["backbone"] and reached["predictor"] and not reached["fa"]


def test_parallel_predictor_refusals_are_one_line():
    from pretrain.build import check_cfg
    from pretrain.errors import ConfigError

    for method, fa_keys, match in (
        ("simsiam", dict(op="noise", position="backbone"), "FA.POSITION projector"),
        ("byol", dict(op="generator"), "FA.OP generator learns from the FA term"),
        ("moco", dict(op="noise", role="negative"), "FA.ROLE 'negative' has no augmented query"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_cfg(fa_cfg(method, arch="parallel_predictor", **fa_keys))
    check_cfg(fa_cfg("moco", op="generator", arch="parallel_predictor"))  # InfoNCE trains it


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("method", ["simsiam", "byol"])
def test_parallel_predictor_grad_value_and_gradient_equal_the_formula_without_stop_gradient(
        method, monkeypatch):
    """L_fa = Σ_v ℓ(p_v, λ z_o + (1 − λ) p_v), z_o the other view's *online* projection, and
    its gradient (autograd of that expression, z_o not detached) reaches every online parameter
    both through the prediction and through the target."""
    monkeypatch.setattr(fa.base, "beta", lambda alpha, n, like: torch.full((n, 1), 0.5))
    model = build(fa_cfg(method, op="extrapolate", arch="parallel_predictor_grad",
                         loss_mode="replace"))
    ref = copy.deepcopy(model)
    x1, x2 = views()
    out = model(x1, x2)
    z1, z2 = (ref.projector(ref.backbone(x)) for x in (x1, x2))
    p1, p2 = ref.predictor(z1), ref.predictor(z2)
    lam = 1.5

    def cos(p, t):  # the positive of the extrapolation, p, is a constant
        return F.cosine_similarity(p, lam * t + (1 - lam) * p.detach()).mean()

    def loss(t1, t2):
        if method == "byol":  # ℓ = 2 − 2 cos, summed over the two views
            return (2 - 2 * cos(p1, t2)) + (2 - 2 * cos(p2, t1))
        return -0.5 * (cos(p1, t2) + cos(p2, t1))  # D = −cos, averaged over the two views

    expected = loss(z1, z2)
    torch.testing.assert_close(out["loss_fa"], expected)
    params = list(model.backbone.parameters()) + list(model.projector.parameters())
    ref_params = list(ref.backbone.parameters()) + list(ref.projector.parameters())
    got, want = _grads(out["loss_fa"], params), _grads(expected, ref_params)
    assert_grads_match(got, want)
    # with the stop-gradient the target is a constant: another gradient, which the check
    # above tells apart
    with pytest.raises(AssertionError):
        assert_grads_match(got, _grads(loss(z1.detach(), z2.detach()), ref_params))


def test_parallel_predictor_grad_refusals_and_generator():
    from pretrain.build import check_cfg
    from pretrain.errors import ConfigError

    for stop in ("input", "all"):
        with pytest.raises(ConfigError, match=f"FA.STOP_GRAD {stop} stops it"):
            check_cfg(fa_cfg("simsiam", op="noise", arch="parallel_predictor_grad",
                             stop_grad=stop))
    with pytest.raises(ConfigError, match="FA.POSITION projector"):
        check_cfg(fa_cfg("byol", op="noise", arch="parallel_predictor_grad", position="backbone"))
    # the generator is refused at parallel_predictor (its output is a constant there) but
    # learns here, through the differentiated target
    model = build(fa_cfg("simsiam", op="generator", arch="parallel_predictor_grad"))
    reached = fa_term_grads(model, model(*views())["loss_fa"])
    assert reached["fa"] and reached["backbone"] and reached["predictor"]
