"""The feature operators (pretrain/fa/ops.py), each against an independent truth."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from fa_helpers import (
    fa_cfg,
    op,
)
from tiny_models import build, views

import pretrain.fa as fa
from pretrain.fa import (
    FA_REGISTRY,
)

pytestmark = pytest.mark.usefixtures("one_thread")


OPS = ("identity", "noise", "dropout", "extrapolate", "interpolate", "hardmix", "generator")


def test_every_operator_is_registered_with_its_formula():
    assert {name for name, _ in FA_REGISTRY} == set(OPS)
    for name, cls in FA_REGISTRY:
        doc = cls.__doc__
        assert "=" in doc and "Property" in doc, name
        # its published source: authors and year (identity, the control, has none)
        assert name == "identity" or re.search(r"\b(19|20)\d\d\b", doc), name


def test_noise_is_unbiased_with_batch_relative_std():
    torch.manual_seed(0)
    z = torch.randn(8, 16) * torch.linspace(0.5, 3.0, 16)  # per-dimension spread differs
    noise = op("noise", dim=16, noise_std=0.5)
    draws = torch.stack([noise(z).z for _ in range(4000)])  # [4000, 8, 16]
    s = z.std(dim=0, correction=0)  # [16]
    tol = 5 * 0.5 * s / 4000**0.5
    assert ((draws.mean(0) - z).abs() <= tol).all()  # E[z~] = z
    # a sample std of 4000 normal draws is off by 1/sqrt(2 * 4000) relative, its mean over 8
    # rows by 1/sqrt(2 * 4000 * 8): 5 sigma of that
    torch.testing.assert_close(draws.std(0).mean(0), 0.5 * s, rtol=5 / (2 * 4000 * 8) ** 0.5, atol=0)


def test_dropout_rescales_and_keeps_the_mean():
    torch.manual_seed(0)
    z = torch.rand(8, 16) + 0.5  # no exact zeros
    drop = op("dropout", dim=16, dropout_p=0.25)
    draws = torch.stack([drop(z).z for _ in range(4000)])
    kept = draws != 0
    torch.testing.assert_close(
        draws[kept], (z / 0.75).expand_as(draws)[kept]
    )  # survivors / (1 - p)
    # 5 sigma: of the drop rate over all draws (binomial), of a mean of 4000 draws z/(1-p) or 0
    # (variance z^2 p/(1-p))
    assert abs(1 - kept.float().mean().item() - 0.25) <= 5 * (0.25 * 0.75 / kept.numel()) ** 0.5
    assert ((draws.mean(0) - z).abs() <= 5 * z * (0.25 / 0.75 / 4000) ** 0.5).all()


@pytest.mark.parametrize("per", ["batch", "sample"])
def test_extrapolate_pushes_both_sides_apart_with_lambda_in_1_2(per):
    torch.manual_seed(0)
    z = torch.randn(256, 8, dtype=torch.float64, requires_grad=True)
    z_pos = torch.randn(256, 8, dtype=torch.float64, requires_grad=True)
    out = op("extrapolate", alpha=2.0, lambda_per=per)(z, z_pos)
    lam = (out.z - z_pos) / (z - z_pos)  # z~ - z+ = lam (z - z+)
    torch.testing.assert_close(lam, lam[:, :1].expand_as(lam))  # one lam per row
    lam = lam[:, :1].detach()
    # the positive side with the same lam: z~+ = lam z+ + (1 - lam) z
    torch.testing.assert_close(out.positive, lam * z_pos + (1 - lam) * z)
    assert (lam >= 1).all() and (lam <= 2).all()
    if per == "batch":  # the published form: one lam for the whole batch
        assert torch.unique(lam.round(decimals=12)).numel() == 1
    else:
        # 1 + Beta(2, 2) has mean 1.5 and variance 1/20: 5 sigma of a mean of 256 draws
        assert abs(lam.mean().item() - 1.5) <= 5 * (0.05 / lam.numel()) ** 0.5
    out.z.sum().backward()
    assert z_pos.grad is None and z.grad is not None
    one_sided = op("extrapolate", both_sides=False)(z, z_pos)
    assert one_sided.positive is None


def test_interpolate_is_convex_with_another_sample_and_says_which():
    torch.manual_seed(0)
    z = torch.randn(16, 8, dtype=torch.float64)
    out = op("interpolate", alpha=2.0, lambda_per="sample")(z)
    lam = out.lam[:, None]
    torch.testing.assert_close(out.z, lam * z + (1 - lam) * z[out.partner])
    assert ((out.lam >= 0) & (out.lam <= 1)).all()
    shifts = {int((j - i) % 16) for i, j in enumerate(out.partner.tolist())}
    assert len(shifts) == 1 and 0 not in shifts  # one partner shift per call, never itself
    torch.testing.assert_close(op("interpolate")(z[:1]).z, z[:1])


def test_generator_is_adversarial_and_bounded(monkeypatch):
    model = build(fa_cfg("moco", op="generator"))
    twin_start = copy.deepcopy(model)
    gen = model.fa.augment.op
    assert gen.g[0].in_features == 32 + 4  # [z, eps] at the projector output
    x1, x2 = views()
    torch.manual_seed(3)
    loss_fa = model(x1, x2)["loss_fa"]
    grads = torch.autograd.grad(loss_fa, list(gen.parameters()))
    # the same term without the gradient reversal: the generator's gradient flips sign
    monkeypatch.setattr(fa.ops._ReverseGrad, "apply", staticmethod(lambda x: x))
    torch.manual_seed(3)
    twin = twin_start
    loss_plain = twin(x1, x2)["loss_fa"]
    plain = torch.autograd.grad(loss_plain, list(twin.fa.augment.op.parameters()))
    torch.testing.assert_close(loss_plain, loss_fa)
    for g, p in zip(grads, plain, strict=True):
        assert p.abs().sum() > 0
        torch.testing.assert_close(g, -p)
    # the perturbation stays inside the ball of radius rho ||z||
    z = torch.randn(64, 32) * 3
    out = gen(z).z
    assert ((out - z).norm(dim=1) < 0.1 * z.norm(dim=1)).all()
    assert build(fa_cfg("moco", op="generator", position="backbone")).fa.augment.op.g[0].in_features \
        == 512 + 4

