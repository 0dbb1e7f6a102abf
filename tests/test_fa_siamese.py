"""SimSiam's / BYOL's FA branch and the FA architectures (pretrain/fa/siamese.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fa_helpers import (
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

