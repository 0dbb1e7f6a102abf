"""Feature-augmentation operators and the FA keys, each against an independent truth."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build, tiny_cfg, views

from pretrain.fa import FA_REGISTRY, FeatureAugmenter, HardMix

OPS = ("noise", "dropout", "extrapolate", "interpolate", "hardmix", "generator")


pytestmark = pytest.mark.usefixtures("one_thread")


def fa_cfg(method: str = "moco", **fa):
    """The tiny model with FA on (unless ``enabled=False``) and the given FA keys."""
    fa.setdefault("enabled", True)
    return tiny_cfg(method, **fa)


def op(name: str, dim: int = 8, **fa):
    return FA_REGISTRY.get(name)(fa_cfg(op=name, **fa), dim)


# ----------------------------------------------------------------------------- registry
def test_every_operator_is_registered_with_its_formula():
    assert {name for name, _ in FA_REGISTRY} == set(OPS)
    for name, cls in FA_REGISTRY:
        doc = cls.__doc__
        assert "=" in doc and "Property" in doc, name


# ----------------------------------------------------------------------------- operators
def test_noise_is_unbiased_with_batch_relative_std():
    torch.manual_seed(0)
    z = torch.randn(8, 16) * torch.linspace(0.5, 3.0, 16)  # per-dimension spread differs
    noise = op("noise", dim=16, noise_std=0.5)
    draws = torch.stack([noise(z) for _ in range(4000)])  # [4000, 8, 16]
    s = z.std(dim=0, correction=0)  # [16]
    tol = 5 * 0.5 * s / 4000**0.5
    assert ((draws.mean(0) - z).abs() <= tol).all()  # E[z~] = z
    torch.testing.assert_close(draws.std(0).mean(0), 0.5 * s, rtol=0.05, atol=0)


def test_dropout_rescales_and_keeps_the_mean():
    torch.manual_seed(0)
    z = torch.rand(8, 16) + 0.5  # no exact zeros
    drop = op("dropout", dim=16, dropout_p=0.25)
    draws = torch.stack([drop(z) for _ in range(4000)])
    kept = draws != 0
    torch.testing.assert_close(
        draws[kept], (z / 0.75).expand_as(draws)[kept]
    )  # survivors / (1 - p)
    assert abs(1 - kept.float().mean().item() - 0.25) < 0.01
    assert ((draws.mean(0) - z).abs() < 0.05).all()


def test_extrapolate_lambda_in_1_2_and_positive_is_constant():
    torch.manual_seed(0)
    z = torch.randn(256, 8, dtype=torch.float64, requires_grad=True)
    z_pos = torch.randn(256, 8, dtype=torch.float64, requires_grad=True)
    out = op("extrapolate", alpha=2.0)(z, z_pos)
    lam = (out - z_pos) / (z - z_pos)  # z~ - z+ = lam (z - z+)
    torch.testing.assert_close(lam, lam[:, :1].expand_as(lam))  # one lam per sample
    lam = lam[:, 0].detach()
    assert (lam >= 1).all() and (lam <= 2).all()
    assert abs(lam.mean().item() - 1.5) < 0.05  # 1 + Beta(2, 2) has mean 1.5
    out.sum().backward()
    assert z_pos.grad is None and z.grad is not None


def test_interpolate_is_convex_with_another_sample():
    torch.manual_seed(0)
    z = torch.randn(16, 8, dtype=torch.float64)
    out = op("interpolate", alpha=2.0)(z)
    shifts = set()
    for i in range(16):
        for j in range(16):
            lam = ((out[i] - z[j]) / (z[i] - z[j]))[0] if j != i else None
            if lam is not None and torch.allclose(out[i], lam * z[i] + (1 - lam) * z[j], atol=1e-5):
                assert 0.5 <= lam <= 1
                shifts.add((j - i) % 16)
                break
        else:
            raise AssertionError(f"row {i} is not a mix with another sample")
    assert len(shifts) == 1 and 0 not in shifts  # one partner shift per call, never itself
    torch.testing.assert_close(op("interpolate")(z[:1]), z[:1])


def test_generator_has_parameters_that_learn():
    model = build(fa_cfg("moco", op="generator"))
    gen = model.fa.op
    assert sum(p.numel() for p in gen.parameters()) > 0
    assert gen.g[0].in_features == 32 + 4  # [z, eps] at the projector output
    model(*views())["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    # POSITION backbone: the generator works on the pooled 512-d trunk feature
    assert (
        build(fa_cfg("moco", op="generator", position="backbone")).fa.op.g[0].in_features == 512 + 4
    )


def test_hardmix_outputs_unit_norm_detached_mixes_of_top_negatives():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(10, 8), dim=1)
    mix = HardMix(fa_cfg(op="hardmix", hardmix_topn=2, hardmix_num=7), 8)
    out = mix(q, queue)  # [3, 7, 8]: 3 neg-neg mixes, then 4 query-neg mixes
    assert out.shape == (3, 7, 8) and not out.requires_grad
    torch.testing.assert_close(out.norm(dim=2), torch.ones(3, 7))
    top2 = (q.detach() @ queue.t()).topk(2, dim=1).indices
    for i in range(3):
        basis = queue[top2[i]].t()  # [8, 2]: the two hardest negatives
        for h in out[i, :3]:  # neg-neg: in their span, with non-negative weights
            coef = torch.linalg.lstsq(basis, h[:, None]).solution[:, 0]
            torch.testing.assert_close(basis @ coef, h, atol=1e-5, rtol=0)
            assert (coef >= -1e-5).all()
        for h in out[i, 3:]:  # query-neg: beta q + (1 - beta) n, beta <= 1/2
            fits = []
            for c in range(2):
                basis_qc = torch.stack([q[i].detach(), queue[top2[i, c]]], dim=1)
                a, b = torch.linalg.lstsq(basis_qc, h[:, None]).solution[:, 0]
                if torch.allclose(basis_qc @ torch.stack([a, b]), h, atol=1e-5):
                    fits.append((a / (a + b)).item())
            assert any(-1e-5 <= beta <= 0.5 + 1e-5 for beta in fits)


def test_hardmix_closed_form_similarities_match_the_built_negatives():
    """``similarities`` = q·h of ``forward``'s h, in value and in gradient (h a constant)."""
    mix = HardMix(fa_cfg(op="hardmix", hardmix_topn=5, hardmix_num=9), 16)
    g = torch.Generator().manual_seed(1)
    queue = torch.randn(40, 16, generator=g) * 0.7  # not unit: the norms must be exact too
    q0 = F.normalize(torch.randn(6, 16, generator=g), dim=1)
    w = torch.randn(6, 9, generator=g)  # a random upstream gradient
    q_ref, q_new = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    torch.manual_seed(7)
    ref = torch.einsum("nc,nmc->nm", q_ref, mix(q_ref, queue))  # [6, 9]
    torch.manual_seed(7)
    new = mix.similarities(q_new, queue)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=0)
    (ref * w).sum().backward()
    (new * w).sum().backward()
    torch.testing.assert_close(q_new.grad, q_ref.grad, atol=1e-5, rtol=0)


def test_hardmix_negatives_are_only_negatives():
    x1, x2 = views()
    base = build(fa_cfg("moco", enabled=False))
    hard = build(fa_cfg("moco", op="hardmix", role="negative"))
    out_base, out_hard = base(x1, x2), hard(x1, x2)
    assert "loss_fa" not in out_hard  # no positive term for them
    assert out_hard["loss_ssl"] > out_base["loss"]  # more negatives in the denominator
    assert torch.equal(hard.queue, base.queue)  # never enqueued: only the keys went in


# ----------------------------------------------------------------------------- NUM and ROLE
def test_num_copies_are_stacked_copy_major():
    torch.manual_seed(0)
    fa = FeatureAugmenter(fa_cfg(op="extrapolate", num=3), 8)
    z, z_pos = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    out = fa(z, z_pos)
    assert out.shape == (15, 8)
    lam = (out - z_pos.repeat(3, 1)) / (z - z_pos).repeat(3, 1)  # row c*N + i is copy c of i
    torch.testing.assert_close(lam, lam[:, :1].expand_as(lam))
    assert lam[:5, 0].tolist() != lam[5:10, 0].tolist()  # fresh randomness per copy


def test_role_negative_appends_other_images_and_never_enqueues():
    # noise with sigma 0 is the identity, so q~_j = q_j: the truth is computable by hand
    cfg = fa_cfg("moco", op="noise", noise_std=0.0, role="negative")
    model = build(cfg)
    base = build(fa_cfg("moco", enabled=False))
    ref = copy.deepcopy(model)
    x1, x2 = views()
    out = model(x1, x2)
    base(x1, x2)
    with torch.no_grad():
        for pk, pq in zip(ref._key_params(), ref._query_params(), strict=True):
            pk.copy_(cfg.MODEL.MOCO.M * pk + (1 - cfg.MODEL.MOCO.M) * pq)
        q = F.normalize(ref.projector(ref.backbone(x1)), dim=1)
        k = F.normalize(ref.projector_k(ref.backbone_k(x2)), dim=1)
        T = cfg.MODEL.MOCO.T
        losses = []
        for i in range(4):
            others = torch.cat([q[:i], q[i + 1 :]])
            logits = torch.cat([(q[i] @ k[i])[None], ref.queue @ q[i], others @ q[i]]) / T
            losses.append(torch.logsumexp(logits, 0) - logits[0])
    torch.testing.assert_close(out["loss"], torch.stack(losses).mean())
    assert "loss_fa" not in out
    assert torch.equal(model.queue, base.queue)


def test_role_both_adds_the_positive_term():
    model = build(fa_cfg("moco", op="dropout", role="both", num=2, loss_weight=0.3))
    out = model(*views())
    torch.testing.assert_close(out["loss"], out["loss_ssl"] + 0.3 * out["loss_fa"])


# ----------------------------------------------------------------------------- STOP_GRAD via autograd
def fa_term_grads(model, loss_fa):
    """Per module: does the FA term reach any of its parameters with a non-zero gradient?"""
    groups = {"backbone": model.backbone, "projector": model.projector, "fa": model.fa}
    if hasattr(model, "predictor"):
        groups["predictor"] = model.predictor
    if not loss_fa.requires_grad:
        return dict.fromkeys(groups, False)
    named = [(g, p) for g, m in groups.items() for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fa, [p for _, p in named], allow_unused=True)
    reached = dict.fromkeys(groups, False)
    for (g, _), grad in zip(named, grads, strict=True):
        reached[g] |= grad is not None and bool(grad.abs().sum() > 0)
    return reached


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
