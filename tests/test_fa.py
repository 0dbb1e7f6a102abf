"""Feature-augmentation operators and the FA keys, each against an independent truth."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build, head_tol, tiny_cfg, views

from pretrain.fa import FA_REGISTRY, FeatureAugmenter, HardMix, QueueMix

OPS = ("identity", "noise", "dropout", "extrapolate", "interpolate", "hardmix", "generator")


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
        # its published source: authors and year (identity, the control, has none)
        assert name == "identity" or re.search(r"\b(19|20)\d\d\b", doc), name


# ----------------------------------------------------------------------------- operators
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


def test_queue_mix_is_one_mu_and_one_permutation():
    torch.manual_seed(0)
    queue = F.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    mixed = QueueMix(fa_cfg(queue_alpha=1.6))(queue)
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
    import pretrain.fa as fa

    monkeypatch.setattr(fa._ReverseGrad, "apply", staticmethod(lambda x: x))
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


def test_hardmix_outputs_unit_norm_detached_mixes_of_top_negatives():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(10, 8, dtype=torch.float64), dim=1)
    mix = HardMix(fa_cfg(op="hardmix", hardmix_topn=2, hardmix_num=3, hardmix_query_num=4), 8)
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
    mix = HardMix(fa_cfg(op="hardmix", hardmix_topn=5, hardmix_num=4, hardmix_query_num=5), 16)
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


def test_hardmix_negatives_are_only_negatives():
    x1, x2 = views()
    base = build(fa_cfg("moco", enabled=False))
    hard = build(fa_cfg("moco", op="hardmix", role="negative", loss_mode="replace"))
    out_base, out_hard = base(x1, x2), hard(x1, x2)
    torch.testing.assert_close(out_hard["loss_ssl"], out_base["loss"])  # the plain problem
    assert out_hard["loss"] == out_hard["loss_fa"] > out_base["loss"]  # more negatives
    assert torch.equal(hard.queue, base.queue)  # never enqueued: only the keys went in


# ----------------------------------------------------------------------------- NUM and ROLE
def test_num_copies_are_stacked_copy_major():
    torch.manual_seed(0)
    fa = FeatureAugmenter(fa_cfg(op="extrapolate", num=3), 8)
    z, z_pos = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    out = fa(z, z_pos).z
    assert out.shape == (15, 8)
    lam = (out - z_pos.repeat(3, 1)) / (z - z_pos).repeat(3, 1)  # row c*N + i is copy c of i
    torch.testing.assert_close(lam, lam[:, :1].expand_as(lam))
    assert lam[:5, 0].tolist() != lam[5:10, 0].tolist()  # fresh randomness per copy


def _by_hand_role_terms(model, x1, x2):
    """With the identity operator (q~_j = q_j): the plain InfoNCE, and the negative-role term
    whose negatives are the queue and the other images' queries, each per sample, by hand."""
    q, k, queue = _moco_by_hand(model, x1, x2)
    T = model.T
    plain, negative = [], []
    for i in range(q.shape[0]):
        others = torch.cat([q[:i], q[i + 1 :]])
        logits = torch.cat([(q[i] @ k[i])[None], queue @ q[i]]) / T
        plain.append(torch.logsumexp(logits, 0) - logits[0])
        logits = torch.cat([logits, others @ q[i] / T])
        negative.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(plain).mean(), torch.stack(negative).mean()


def test_role_negative_appends_other_images_and_never_enqueues():
    model = build(fa_cfg("moco", op="identity", role="negative", loss_mode="replace"))
    base = build(fa_cfg("moco", enabled=False))
    x1, x2 = views()
    _, negative = _by_hand_role_terms(model, x1, x2)
    out = model(x1, x2)
    base(x1, x2)
    torch.testing.assert_close(out["loss"], negative)
    assert torch.equal(model.queue, base.queue)


def test_role_both_is_the_mean_of_the_positive_and_negative_terms():
    model = build(fa_cfg("moco", op="identity", role="both", loss_mode="replace"))
    x1, x2 = views()
    plain, negative = _by_hand_role_terms(model, x1, x2)  # identity: the positive term is plain
    assert abs(plain - negative) > 1e-3  # the two terms differ, so dropping either shows
    out = model(x1, x2)
    torch.testing.assert_close(out["loss"], (plain + negative) / 2)


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


# ----------------------------------------------------------------------------- published forms
def _moco_by_hand(model, x1, x2):
    """q, k and the queue a fresh MoCo forward sees (after its momentum update)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for pk, pq in zip(ref._key_params(), ref._query_params(), strict=True):
            pk.copy_(ref.m * pk + (1 - ref.m) * pq)
        q = F.normalize(ref.projector(ref.backbone(x1)), dim=1)
        k = F.normalize(ref.projector_k(ref.backbone_k(x2)), dim=1)
    return q, k, ref.queue.clone()


def test_feature_transformation_replace_is_the_published_logits(monkeypatch):
    """FT (ICCV 2021): q^ = lq + (1-l)k, k^ = lk + (1-l)q, n^ = mu n + (1-mu) n_perm, one loss
    over [q^.k^, q^.n^] / T. lambda, mu and the permutation are fixed by hand here."""
    import pretrain.fa as fa

    cfg = fa_cfg("moco", op="extrapolate", both_sides=True, lambda_per="batch", queue_mix=True,
                 loss_mode="replace")
    model = build(cfg)
    x1, x2 = views()
    q, k, queue = _moco_by_hand(model, x1, x2)
    beta = iter([0.25, 0.5])  # first mu (queue mix), then b (lambda = 1 + b)
    monkeypatch.setattr(fa, "_beta", lambda alpha, n, like: torch.full((n, 1), next(beta)))
    perm = torch.arange(cfg.MODEL.MOCO.K).flip(0)
    monkeypatch.setattr(fa.torch, "randperm", lambda n, device=None: perm)
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
    import pretrain.fa as fa

    model = build(fa_cfg("moco", op="interpolate", lambda_per="batch", loss_mode="replace"))
    x1, x2 = views()
    q, k, queue = _moco_by_hand(model, x1, x2)
    monkeypatch.setattr(fa, "_beta", lambda alpha, n, like: torch.full((n, 1), 0.7))
    torch.manual_seed(5)
    out = model(x1, x2)
    torch.manual_seed(5)
    shift = int(torch.randint(1, 4, ()))
    j = (torch.arange(4) + shift) % 4
    q_mix = 0.7 * q + 0.3 * q[j]
    logp = F.log_softmax(torch.cat([q_mix @ k.t(), q_mix @ queue.t()], dim=1) / model.T, dim=1)
    expected = -(0.7 * logp[torch.arange(4), torch.arange(4)] + 0.3 * logp[torch.arange(4), j]).mean()
    torch.testing.assert_close(out["loss_fa"], expected)


def _grads(model, x1, x2):
    out = model(x1, x2)
    params = [p for p in model.backbone.parameters()]
    return out, torch.autograd.grad(out["loss"], params)


def _float64(cfg):
    """The tiny model in float64, but for MoCo's queue: the losses run in float32 by design (the
    methods score ``z.float()``), so the queue they are scored against stays float32."""
    model = build(cfg).double()
    if hasattr(model, "queue"):
        model.queue = model.queue.float()
    return model


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_mean_keeps_and_add_doubles_the_step_of_a_duplicated_term(method):
    """OP identity makes L_fa = L_ssl: ``add`` (w 1) doubles every gradient — the loss-scale
    control — ``mean`` leaves it unchanged."""
    arch = "basic" if method == "moco" else "post_predictor"
    cfg = fa_cfg(method, enabled=False)
    x1, x2 = (x.double() for x in views())
    _, g_off = _grads(_float64(cfg), x1, x2)
    tol = head_tol(cfg)  # exact algebra in float64, but for the float32 loss head
    for mode, factor in (("add", 2.0), ("mean", 1.0)):
        out, g = _grads(_float64(fa_cfg(method, op="identity", arch=arch, loss_mode=mode)), x1, x2)
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
    out_off, g_off = _grads(off, x1, x2)
    rng_off = torch.get_rng_state()
    model.before_step(0.49)
    torch.manual_seed(11)
    out, g = _grads(model, x1, x2)
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


def test_siamese_two_sided_extrapolation_extrapolates_the_target(monkeypatch):
    import pretrain.fa as fa

    monkeypatch.setattr(fa, "_beta", lambda alpha, n, like: torch.full((n, 1), 0.5))
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


def test_fa_config_refusals_name_the_key():
    from pretrain.build import check_cfg
    from pretrain.errors import ConfigError

    for fa, match in ((dict(loss_mode="replace", loss_weight=0.5), "FA.LOSS_WEIGHT 0.5 has no effect"),
                      (dict(loss_mode="sum"), "FA.LOSS_MODE 'sum'"),
                      (dict(lambda_per="image"), "FA.LAMBDA_PER 'image'"),
                      (dict(start=1.5), "FA.START must be in"),
                      (dict(op="interpolate", role="negative"), "soft targets")):
        with pytest.raises(ConfigError, match=match):
            check_cfg(fa_cfg("moco", **fa))
    with pytest.raises(ConfigError, match="FA.QUEUE_MIX"):
        check_cfg(fa_cfg("simsiam", arch="pre_predictor", queue_mix=True))


def test_hardmix_reusing_the_plain_logits_is_the_same_infonce():
    """MoCo hands hardmix the plain logits; the FA term equals InfoNCE(q, k⁺, queue ∪ {h})
    computed from scratch with the same mixes, in value and in gradient."""
    from pretrain.fa import ContrastiveFA
    from pretrain.losses import info_nce

    fa = ContrastiveFA(fa_cfg("moco", op="hardmix", role="negative", hardmix_topn=6,
                              hardmix_num=5, hardmix_query_num=3), 16)
    g = torch.Generator().manual_seed(3)
    f64 = dict(generator=g, dtype=torch.float64)  # the same algebra both ways: float64
    queue = F.normalize(torch.randn(30, 16, **f64), dim=1)
    q0 = F.normalize(torch.randn(4, 16, **f64), dim=1)
    k = F.normalize(torch.randn(4, 16, **f64), dim=1)
    q_ref, q_new = q0.clone().requires_grad_(), q0.clone().requires_grad_()
    torch.manual_seed(11)
    extra = fa.augment.op.similarities(q_ref, queue)
    ref = info_nce(q_ref, k, queue, 0.2, extra)[0]
    torch.manual_seed(11)
    _, logits = info_nce(q_new, k, queue, 0.2)
    new = fa(q_new, k, queue, 0.2, None, None, None, logits)
    assert new.dtype == torch.float64
    # reused logits (q·n/T)*T/T differ from q·n/T by a few eps64 of |logits| <= 1/T = 5: the
    # loss and its gradient within 1e-12
    torch.testing.assert_close(new, ref, atol=1e-12, rtol=0)
    ref.backward()
    new.backward()
    torch.testing.assert_close(q_new.grad, q_ref.grad, atol=1e-12, rtol=0)
    assert ref > info_nce(q0, k, queue, 0.2)[0]  # the mixes are real extra negatives
