"""What every FA branch shares (pretrain/fa/branch.py): copies, stop-gradient, schedule, loss modes."""

from __future__ import annotations

import pytest
import torch
from fa_helpers import (
    fa_cfg,
    fa_term_grads,
    float64_model,
    loss_and_grads,
)
from tiny_models import build, head_tol, views

from pretrain.fa import (
    Extrapolate,
    FeatureAugmenter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_num_copies_are_stacked_copy_major():
    torch.manual_seed(0)
    fa = FeatureAugmenter(Extrapolate(), num=3)
    z, z_pos = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    out = fa(z, z_pos).z
    assert out.shape == (15, 8)
    lam = (out - z_pos.repeat(3, 1)) / (z - z_pos).repeat(3, 1)  # row c*N + i is copy c of i
    torch.testing.assert_close(lam, lam[:, :1].expand_as(lam))
    assert lam[:5, 0].tolist() != lam[5:10, 0].tolist()  # fresh randomness per copy


@pytest.mark.parametrize("method", ["moco", "simsiam", "byol"])
@pytest.mark.parametrize("stop_grad", ["none", "input", "all"])
def test_stop_grad_with_autograd(method, stop_grad):
    arch = "basic" if method == "moco" else "separate_predictor"
    fa_op = "noise" if stop_grad == "all" else "generator"  # generator + all is refused
    model = build(fa_cfg(method, op=fa_op, stop_grad=stop_grad, arch=arch))
    reached = fa_term_grads(model, model(*views())["loss_fa"])
    encoder = reached["backbone"] or reached["projector"]
    if stop_grad == "none":  # the FA term reaches the encoder and FA's parameters
        assert encoder and reached["fa"]
    elif stop_grad == "input":  # only FA's own parameters (generator, separate predictor)
        assert not encoder and reached["fa"] and not reached.get("predictor")
    else:  # augmented features are constants: nothing before them learns from the FA term
        assert not encoder and not reached.get("predictor")
        assert reached["fa"] == (method != "moco")  # only the separate predictor, after FA
    if stop_grad == "all" and method == "moco":
        assert not model(*views())["loss_fa"].requires_grad


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_mean_keeps_and_add_doubles_the_step_of_a_duplicated_term(method):
    """OP identity makes L_fa = L_ssl: ``add`` (w 1) doubles every gradient — the loss-scale
    control — ``mean`` leaves it unchanged."""
    arch = "basic" if method == "moco" else "post_predictor"
    cfg = fa_cfg(method, enabled=False)
    x1, x2 = (x.double() for x in views())
    _, g_off = loss_and_grads(float64_model(cfg), x1, x2)
    tol = head_tol(cfg)  # exact algebra in float64, but for the float32 loss head
    for mode, factor in (("add", 2.0), ("mean", 1.0)):
        out, g = loss_and_grads(float64_model(fa_cfg(method, op="identity", arch=arch, loss_mode=mode)), x1, x2)
        torch.testing.assert_close(out["loss_fa"], out["loss_ssl"])
        for a, b in zip(g, g_off, strict=True):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, factor * b, rtol=0, atol=tol * float(b.abs().max()) * factor)


@pytest.mark.parametrize("method", ["moco", "simsiam"])
def test_before_start_fa_is_exactly_off(method):
    """While the schedule factor is 0 no FA runs: loss, gradients and the RNG equal FA off."""
    arch = "basic" if method == "moco" else "pre_predictor"
    x1, x2 = views()
    off = build(fa_cfg(method, enabled=False))
    model = build(fa_cfg(method, op="extrapolate", arch=arch, start=0.5))
    torch.manual_seed(11)
    out_off, g_off = loss_and_grads(off, x1, x2)
    rng_off = torch.get_rng_state()
    model.before_step(0.49)
    torch.manual_seed(11)
    out, g = loss_and_grads(model, x1, x2)
    assert torch.equal(torch.get_rng_state(), rng_off)  # not one random number drawn
    assert "loss_fa" not in out
    torch.testing.assert_close(out["loss"], out_off["loss"], rtol=0, atol=0)
    for a, b in zip(g, g_off, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.before_step(0.5)
    assert "loss_fa" in model(x1, x2)


def test_schedule_and_loss_modes_by_hand():
    aug = build(fa_cfg("moco", op="identity", start=0.2, ramp=0.4, loss_weight=0.5,
                       loss_mode="add")).fa
    assert [aug.factor(p) for p in (0.0, 0.19, 0.2, 0.4, 0.5, 0.6, 0.9)] == \
        pytest.approx([0, 0, 0, 0.5, 0.75, 1, 1])
    ssl, fa_term = torch.tensor(2.0), torch.tensor(6.0)
    aug.progress = 0.4  # s = 0.5, w = 0.5: s w = 0.25
    assert float(aug.combine(ssl, fa_term)) == pytest.approx(2 + 0.25 * 6)
    aug.mode = "mean"
    assert float(aug.combine(ssl, fa_term)) == pytest.approx((2 + 0.25 * 6) / 1.25)
    aug.mode, aug.weight = "replace", 1.0
    assert float(aug.combine(ssl, fa_term)) == pytest.approx(0.5 * 2 + 0.5 * 6)

