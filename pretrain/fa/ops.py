"""Feature operators: ``forward(z [N, D], positive [N, D] | None) -> Augmented``, one copy.

Each is one class with its formula, a property a test checks, and its published source;
``from_config`` reads its ``FA.*`` keys and ``check`` says which settings it needs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..utils.registry import register_as
from .base import FA_REGISTRY, Augmented, FeatureOp, draw

LAMBDA_PERS = ("batch", "sample")  # FA.LAMBDA_PER: one λ per batch or per sample


@register_as(FA_REGISTRY, "identity")
class Identity(FeatureOp):
    """No augmentation: the loss-scale control.

        z̃ = z

    Property: where the FA branch scores z̃ exactly as the base term scores z, the FA term
    equals the base term, so ``LOSS_MODE add`` with w = 1 doubles the loss (a larger step,
    nothing else): what any FA variant must beat to be more than a scale. That holds for MoCo
    with ``ROLE positive`` and for SimSiam / BYOL with ``ARCH pre_predictor`` or
    ``post_predictor``. Elsewhere the term differs: ``ARCH basic`` scores z̃ without the
    predictor (a predictor-free Siamese term), ``separate_predictor`` through another predictor,
    and MoCo's ``ROLE negative`` / ``both`` add every other image's query as a negative.
    """

    def forward(self, z, positive=None):
        return Augmented(z)


@register_as(FA_REGISTRY, "noise")
class Noise(FeatureOp):
    """Gaussian noise scaled by the batch spread of each dimension.

        z̃ = z + σ · s ⊙ ε,   s_d = std_i z_{i,d} (over the batch, a constant),   σ = FA.NOISE_STD

    Property: E[z̃] = z; the noise on dimension d has standard deviation σ·s_d.

    Source: DeVries & Taylor 2017, "Dataset Augmentation in Feature Space" (ICLR workshop):
    Gaussian noise in a learned feature space, each dimension's noise scaled by that dimension's
    spread over the data and a factor. Here the spread is the current batch's (no pass over the
    data set), and the features are those of the contrastive encoder being trained.
    """

    def __init__(self, sigma: float = 0.1):
        super().__init__()
        self.sigma = sigma

    @classmethod
    def from_config(cls, cfg, dim):
        return {"sigma": cfg.FA.NOISE_STD}

    def forward(self, z, positive=None):
        s = z.detach().std(dim=0, correction=0, keepdim=True)  # [1, D]
        return Augmented(z + self.sigma * s * torch.randn_like(z))


@register_as(FA_REGISTRY, "dropout")
class Dropout(FeatureOp):
    """Feature dropout, rescaled.

        z̃ = m ⊙ z / (1 − p),   m_{i,d} ~ Bernoulli(1 − p),   p = FA.DROPOUT_P

    Property: E[z̃] = z; a fraction p of the entries is zero, the rest are z / (1 − p).

    Source: Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from
    Overfitting" (JMLR), in its inverted form (rescaled while training). As the augmentation of
    a contrastive objective: SimCSE (Gao et al., EMNLP 2021), where the masks act inside the
    encoder; here one mask acts on the feature at FA.POSITION.
    """

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    @classmethod
    def from_config(cls, cfg, dim):
        return {"p": cfg.FA.DROPOUT_P}

    def forward(self, z, positive=None):
        return Augmented(F.dropout(z, self.p, training=True))


@register_as(FA_REGISTRY, "extrapolate")
class Extrapolate(FeatureOp):
    """Positive extrapolation (Feature Transformation, Zhu et al. ICCV 2021): push each feature
    and its positive apart along the line through them.

        z̃ = λ z + (1 − λ) z⁺,   z̃⁺ = λ z⁺ + (1 − λ) z,   λ = 1 + b,   b ~ Beta(α, α)

    α = FA.ALPHA (published: 2); one λ per batch (FA.LAMBDA_PER batch, published) or per sample;
    z̃⁺ only with FA.BOTH_SIDES (published). No re-normalisation. Property: λ ∈ [1, 2]; z̃ lies
    beyond z, z̃⁺ beyond z⁺; z⁺ is a constant, but z̃⁺ carries z's gradient through (1 − λ) z,
    as in the published code.
    """

    def __init__(self, alpha: float = 2.0, per: str = "batch", both_sides: bool = True):
        super().__init__()
        self.alpha, self.per, self.both = alpha, per, both_sides

    @classmethod
    def from_config(cls, cfg, dim):
        fa = cfg.FA
        return {"alpha": fa.ALPHA, "per": fa.LAMBDA_PER, "both_sides": fa.BOTH_SIDES}

    def forward(self, z, positive=None):
        lam = 1 + draw(self.alpha, z.shape[0], z, self.per)  # [N, 1]
        pos = positive.detach()
        return Augmented(lam * z + (1 - lam) * pos,
                         lam * pos + (1 - lam) * z if self.both else None)


@register_as(FA_REGISTRY, "interpolate")
class Interpolate(FeatureOp):
    """Mix each feature with another sample of the batch, trained with a soft target (i-Mix,
    Lee et al. ICLR 2021; Un-Mix, Shen et al. AAAI 2022).

        z̃_i = λ_i z_i + (1 − λ_i) z_j,   j = (i + s) mod N,   s ~ U{1, …, N−1} (one per call),
        λ_i ~ Beta(α, α) per sample (FA.LAMBDA_PER), α = FA.ALPHA

    The loss of z̃_i is λ_i · loss(target of i) + (1 − λ_i) · loss(target of j). Property: a
    convex combination of z_i and a *different* sample (the partner is a constant). With N = 1
    it returns z.
    """

    def __init__(self, alpha: float = 2.0, per: str = "batch"):
        super().__init__()
        self.alpha, self.per = alpha, per

    @classmethod
    def from_config(cls, cfg, dim):
        return {"alpha": cfg.FA.ALPHA, "per": cfg.FA.LAMBDA_PER}

    @classmethod
    def check(cls, cfg, branch):
        if cfg.FA.ROLE != "positive":
            raise ConfigError("FA.OP interpolate is trained with soft targets: it needs FA.ROLE "
                              "positive")

    def forward(self, z, positive=None):
        n = z.shape[0]
        idx = torch.arange(n, device=z.device)
        if n < 2:
            return Augmented(z, None, idx, torch.ones(n, device=z.device, dtype=z.dtype))
        lam = draw(self.alpha, n, z, self.per)  # [N, 1]
        shift = int(torch.randint(1, n, ()))
        partner = (idx + shift) % n
        return Augmented(lam * z + (1 - lam) * z.detach()[partner], None, partner, lam[:, 0])


class _ReverseGrad(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


@register_as(FA_REGISTRY, "generator")
class Generator(FeatureOp):
    """A learned, adversarial, bounded perturbation: the generator makes the FA term *harder*
    while the encoder learns to solve it (adversarial feature augmentation, as in Volpi et al.
    2018 and AdCo, Hu et al. CVPR 2021, rather than a helper trained by the loss it feeds).

        z̃ = z + R(δ),   δ = ρ ‖sg(z)‖ · u / √(1 + ‖u‖²),   u = g([sg(z), ε])
        g = Linear(D+E, H) → ReLU → Linear(H, D),   ε ~ N(0, I_E)

    R is a gradient reversal: g's parameters receive −∇L_fa (they ascend the FA term), the
    encoder +∇L_fa through z. E = FA.GEN_NOISE_DIM, H = FA.GEN_HIDDEN_DIM, ρ = FA.GEN_BOUND. Property:
    ‖z̃ − z‖ < ρ‖z‖ (z̃ stays similar to z).
    """

    LEARNED = True

    def __init__(self, dim: int, noise_dim: int = 64, hidden_dim: int = 512, bound: float = 0.1):
        super().__init__()
        self.noise_dim, self.bound = noise_dim, bound
        self.g = nn.Sequential(
            nn.Linear(dim + noise_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim)
        )

    @classmethod
    def from_config(cls, cfg, dim):
        fa = cfg.FA
        return {"dim": dim, "noise_dim": fa.GEN_NOISE_DIM, "hidden_dim": fa.GEN_HIDDEN_DIM,
                "bound": fa.GEN_BOUND}

    @classmethod
    def check(cls, cfg, branch):
        if cfg.FA.STOP_GRAD == "all":
            raise ConfigError("FA.OP generator with FA.STOP_GRAD all: the generator would never "
                              "learn")

    def forward(self, z, positive=None):
        eps = torch.randn(z.shape[0], self.noise_dim, device=z.device, dtype=z.dtype)
        u = self.g(torch.cat([z.detach(), eps], dim=1))  # [N, D]
        scale = self.bound * z.detach().norm(dim=1, keepdim=True)  # [N, 1]
        delta = scale * u / (1 + u.pow(2).sum(1, keepdim=True)).sqrt()
        return Augmented(z + _ReverseGrad.apply(delta))
