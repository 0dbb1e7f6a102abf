"""Feature augmentation (FA): make features *similar to* the encoder's, in feature space.

Every operator is one small class in ``FA_REGISTRY`` (name = ``FA.OP``) with its formula in its
docstring; adding an operator is adding a class. Notation: ``z`` [N, D] the features at the FA
position, ``z⁺`` [N, D] the positive of each row (the other view's feature from the network that
provides the targets: MoCo's key encoder, BYOL's target network, SimSiam's own encoder; always
treated as a constant), ``ε`` standard normal noise.

How the keys combine (``FA.ENABLED False`` builds no FA module at all: the baseline, exactly):

``FA.POSITION``
    ``projector``: FA acts on the projector output (before L2 normalisation).
    ``backbone``: FA acts on the pooled trunk feature; the result goes through the projector.
``FA.ARCH`` (SimSiam / BYOL; MoCo has no predictor and takes ``basic`` only)
    ``basic``: the augmented feature is compared with the target directly, no predictor.
    ``pre_predictor``: FA before the (shared) predictor: ``p̃ = pred(FA(.))``.
    ``post_predictor``: FA on the predictor output: ``p̃ = FA(p)`` (needs POSITION ``projector``).
    ``separate_predictor``: like ``pre_predictor`` with the FA branch's own predictor.
``FA.STOP_GRAD`` — where the gradient of the FA term stops
    ``none``: nowhere; it reaches FA's parameters and the encoder.
    ``input``: FA's input is detached; FA's own parameters and whatever the branch applies after
    FA (projector at POSITION ``backbone``, the predictor of ``pre_predictor``) learn from it, the
    encoder before FA does not.
    ``all``: FA's output is detached: augmented features are constants; only modules applied after
    FA learn from the FA term (``generator`` is refused with ``all``: it would never learn).
``FA.ROLE``
    MoCo ``positive``: augmented queries q̃ get their own InfoNCE term against the same key and
    the queue. ``negative``: augmented queries of the *other* images in the batch are appended to
    every query's negatives (its own image masked out). ``both``: the two at once. Augmented
    features are never enqueued. SimSiam / BYOL: ``positive`` only — extra prediction pairs
    ``(p̃1, target2)`` and ``(p̃2, target1)``.
``FA.NUM``: augmented copies per sample (each with fresh randomness), stacked copy-major:
    row ``c*N + i`` is copy ``c`` of sample ``i``.
``FA.LOSS_WEIGHT`` w: ``loss = loss_ssl + w * loss_fa`` (the FA term has the method's own form
    and scale). Extra negatives (ROLE negative, ``hardmix``) enter the InfoNCE denominator as is.

``hardmix`` is special: it synthesises negatives only (MoCo, ROLE ``negative``, POSITION
``projector``), always detached, with ``FA.HARDMIX_NUM`` per query; FA.NUM and FA.STOP_GRAD do not
apply to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .utils.registry import Registry, lookup, register_as

FA_REGISTRY = Registry("FA_OP")
FA_REGISTRY.__doc__ = "Feature-augmentation operators, by FA.OP name; built as ``cls(cfg, dim)``."

POSITIONS = ("backbone", "projector")
ARCHS = ("basic", "pre_predictor", "post_predictor", "separate_predictor")
STOP_GRADS = ("none", "input", "all")
ROLES = ("positive", "negative", "both")


def _beta(alpha: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``n`` samples of Beta(alpha, alpha), shaped [n, 1], on ``like``'s device and dtype."""
    a = torch.full((n, 1), float(alpha), device=like.device)
    # validate_args=False: argument checks would synchronise with the GPU on every call
    return torch.distributions.Beta(a, a, validate_args=False).sample().to(like.dtype)


class FAOp(nn.Module):
    """Base class: ``forward(z [N, D], positive [N, D] | None) -> z̃ [N, D]``."""

    def __init__(self, cfg, dim: int):
        super().__init__()


@register_as(FA_REGISTRY, "noise")
class Noise(FAOp):
    """Gaussian noise scaled by the batch spread of each dimension.

        z̃ = z + σ · s ⊙ ε,   s_d = std_i z_{i,d} (over the batch, a constant),   σ = FA.NOISE_STD

    Property: E[z̃] = z; the noise on dimension d has standard deviation σ·s_d.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.sigma = cfg.FA.NOISE_STD

    def forward(self, z, positive=None):
        s = z.detach().std(dim=0, correction=0, keepdim=True)  # [1, D]
        return z + self.sigma * s * torch.randn_like(z)


@register_as(FA_REGISTRY, "dropout")
class Dropout(FAOp):
    """Feature dropout, rescaled.

        z̃ = m ⊙ z / (1 − p),   m_{i,d} ~ Bernoulli(1 − p),   p = FA.DROPOUT_P

    Property: E[z̃] = z; a fraction p of the entries is zero, the rest are z / (1 − p).
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.p = cfg.FA.DROPOUT_P

    def forward(self, z, positive=None):
        return F.dropout(z, self.p, training=True)


@register_as(FA_REGISTRY, "extrapolate")
class Extrapolate(FAOp):
    """Positive extrapolation: move each feature away from its positive.

        z̃ = λ z + (1 − λ) z⁺,   λ = 1 + b,   b ~ Beta(α, α) per sample,   α = FA.ALPHA

    Property: λ ∈ [1, 2]; z̃ lies on the line through z⁺ and z, beyond z; z⁺ gets no gradient.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.alpha = cfg.FA.ALPHA

    def forward(self, z, positive=None):
        lam = 1 + _beta(self.alpha, z.shape[0], z)  # [N, 1]
        return lam * z + (1 - lam) * positive.detach()


@register_as(FA_REGISTRY, "interpolate")
class Interpolate(FAOp):
    """Mix each feature with another sample of the batch, the original dominating.

        z̃_i = λ_i z_i + (1 − λ_i) z_j,   j = (i + s) mod N,   s ~ U{1, …, N−1} (one per call),
        λ = max(b, 1 − b),   b ~ Beta(α, α) per sample,   α = FA.ALPHA

    Property: a convex combination, λ ∈ [1/2, 1], of z_i and a *different* sample z_j (the
    partner is a constant). With N = 1 it returns z.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.alpha = cfg.FA.ALPHA

    def forward(self, z, positive=None):
        n = z.shape[0]
        if n < 2:
            return z
        b = _beta(self.alpha, n, z)
        lam = torch.maximum(b, 1 - b)  # [N, 1]
        shift = int(torch.randint(1, n, ()))
        return lam * z + (1 - lam) * z.detach().roll(shift, dims=0)


@register_as(FA_REGISTRY, "generator")
class Generator(FAOp):
    """A learnable generator trained jointly with the encoder.

        z̃ = z + g([z, ε]),   g = Linear(D+E, H) → ReLU → Linear(H, D),   ε ~ N(0, I_E)

    with E = FA.GEN_NOISE_DIM, H = FA.GEN_HIDDEN_DIM. Property: g has parameters and they receive
    the gradient of the FA term (unless FA.STOP_GRAD is ``all``, which is refused).
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.noise_dim = cfg.FA.GEN_NOISE_DIM
        hidden = cfg.FA.GEN_HIDDEN_DIM
        self.g = nn.Sequential(
            nn.Linear(dim + self.noise_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def forward(self, z, positive=None):
        eps = torch.randn(z.shape[0], self.noise_dim, device=z.device, dtype=z.dtype)
        return z + self.g(torch.cat([z, eps], dim=1))


@register_as(FA_REGISTRY, "hardmix")
class HardMix(FAOp):
    """Hard negatives synthesised from the queue (MoCo only; extra negatives, never positives).

    For each query q (unit) take its N_top = FA.HARDMIX_TOPN most similar queue entries, then
        neg–neg mixes (⌊M/2⌋):   h = normalize(α n_a + (1 − α) n_b),  α ~ U(0, 1)
        query–neg mixes (⌈M/2⌉): h = normalize(β q + (1 − β) n_c),    β ~ U(0, 1/2)
    with n_a, n_b, n_c drawn uniformly from the top N_top and M = FA.HARDMIX_NUM.

    ``forward(q [N, D], queue [K, D]) -> [N, M, D]``. Property: outputs are unit-norm and
    detached; MoCo appends them to the negatives and never enqueues them.

    ``similarities(q, queue) -> [N, M]`` gives q·h, what InfoNCE needs, without building h: with
    s_j = q·n_j,
        q·h_ab = (α s_a + (1 − α) s_b) / ‖α n_a + (1 − α) n_b‖
        q·h_c  = (β q·q + (1 − β) s_c) / ‖β q + (1 − β) n_c‖
    where ‖u + v‖² = ‖u‖² + ‖v‖² + 2 u·v; only n_a·n_b needs the vectors. The norms are
    constants (h is detached), so the gradient w.r.t. q is h, as for the einsum of ``forward``.
    For the same random state both methods draw the same mixes.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.top_n = cfg.FA.HARDMIX_TOPN
        self.num = cfg.FA.HARDMIX_NUM

    @torch.no_grad()
    def _draw(self, q: torch.Tensor, sim: torch.Tensor):
        """Queue indices a, b [N, ⌊M/2⌋], c [N, ⌈M/2⌉] among each query's top N_top, α, β."""
        n, top_n = q.shape[0], min(self.top_n, sim.shape[1])
        s_nn = self.num // 2
        top = sim.topk(top_n, dim=1, sorted=False).indices  # [N, top_n], any order
        alpha = torch.rand(n, s_nn, device=q.device, dtype=q.dtype)
        beta = 0.5 * torch.rand(n, self.num - s_nn, device=q.device, dtype=q.dtype)

        def pick(s):  # s random top-N queue indices per query -> [N, s]
            return top.gather(1, torch.randint(top_n, (n, s), device=q.device))

        return pick(s_nn), pick(s_nn), pick(self.num - s_nn), alpha, beta

    @staticmethod
    def _rows(queue: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """queue[idx] [N, s, D] (index_select: much faster than advanced indexing on CPUs)."""
        return queue.index_select(0, idx.flatten()).view(*idx.shape, queue.shape[1])

    @torch.no_grad()
    def forward(self, q, queue):
        q = q.detach()
        a, b, c, alpha, beta = self._draw(q, torch.einsum("nc,kc->nk", q, queue))
        alpha, beta = alpha.unsqueeze(2), beta.unsqueeze(2)  # [N, s, 1]
        neg_neg = alpha * self._rows(queue, a) + (1 - alpha) * self._rows(queue, b)  # [N, s_nn, D]
        query_neg = beta * q.unsqueeze(1) + (1 - beta) * self._rows(queue, c)  # [N, s_qn, D]
        return F.normalize(torch.cat([neg_neg, query_neg], dim=1), dim=2)  # [N, M, D]

    def similarities(self, q: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        sim = torch.einsum("nc,kc->nk", q, queue)  # [N, K] s_j, differentiable in q
        s_d, qd = sim.detach(), q.detach()
        a, b, c, alpha, beta = self._draw(qd, s_d)
        with torch.no_grad():
            sq = queue.pow(2).sum(1)  # [K] ‖n_j‖²
            ab = torch.einsum("nsd,nsd->ns", self._rows(queue, a), self._rows(queue, b))  # [N, s_nn] n_a·n_b
            norm_ab = (alpha**2 * sq[a] + (1 - alpha) ** 2 * sq[b]
                       + 2 * alpha * (1 - alpha) * ab).sqrt().clamp_min(1e-12)  # [N, s_nn]
            qq = qd.pow(2).sum(1, keepdim=True)  # [N, 1]
            norm_c = (beta**2 * qq + (1 - beta) ** 2 * sq[c]
                      + 2 * beta * (1 - beta) * s_d.gather(1, c)).sqrt().clamp_min(1e-12)
        q_qd = torch.einsum("nc,nc->n", q, qd).unsqueeze(1)  # [N, 1] q·q (gradient: q)
        neg_neg = (alpha * sim.gather(1, a) + (1 - alpha) * sim.gather(1, b)) / norm_ab
        query_neg = (beta * q_qd + (1 - beta) * sim.gather(1, c)) / norm_c
        return torch.cat([neg_neg, query_neg], dim=1)  # [N, M]


class FeatureAugmenter(nn.Module):
    """Applies FA.OP ``FA.NUM`` times with FA.STOP_GRAD: ``[N, D] -> [NUM*N, D]`` (copy-major)."""

    def __init__(self, cfg, dim: int):
        super().__init__()
        self.op_name = cfg.FA.OP
        self.op = lookup(FA_REGISTRY, cfg.FA.OP, "FA.OP")(cfg, dim)
        self.num = cfg.FA.NUM
        self.stop_grad = cfg.FA.STOP_GRAD

    def forward(self, z: torch.Tensor, positive: torch.Tensor | None = None) -> torch.Tensor:
        if self.stop_grad == "input":
            z = z.detach()
        out = torch.cat([self.op(z, positive) for _ in range(self.num)], dim=0)
        return out.detach() if self.stop_grad == "all" else out


class PredictorFA(nn.Module):
    """The FA branch of SimSiam / BYOL: augmented predictions p̃ [NUM*N, D] for one view.

    With h, z, p the view's pooled / projected / predicted features and FA(.) the augmenter:

    | FA.ARCH             | POSITION projector | POSITION backbone          |
    |---------------------|--------------------|----------------------------|
    | basic               | FA(z)              | projector(FA(h))           |
    | pre_predictor       | pred(FA(z))        | pred(projector(FA(h)))     |
    | separate_predictor  | pred_fa(FA(z))     | pred_fa(projector(FA(h)))  |
    | post_predictor      | FA(p)              | (refused)                  |

    ``pred_fa`` (``self.predictor``) is this branch's own predictor, built by ``make_predictor``.
    The caller pairs p̃ with the other view's target, repeated NUM times.
    """

    def __init__(self, cfg, dim: int, make_predictor: Callable[[], nn.Module]):
        super().__init__()
        self.arch = cfg.FA.ARCH
        self.position = cfg.FA.POSITION
        self.augment = FeatureAugmenter(cfg, dim)
        self.predictor = make_predictor() if self.arch == "separate_predictor" else None

    def forward(
        self,
        online: Sequence[torch.Tensor],
        positive: Sequence[torch.Tensor],
        projector: nn.Module,
        predictor: nn.Module,
    ) -> torch.Tensor:
        """``online`` = (h, z, p) of this view; ``positive`` = (h⁺, z⁺) of the other view."""
        (h, z, p), (h_pos, z_pos) = online, positive
        if self.arch == "post_predictor":
            return self.augment(p, z_pos)
        if self.position == "backbone":
            x = projector(self.augment(h, h_pos))
        else:
            x = self.augment(z, z_pos)
        if self.arch == "basic":
            return x
        return (self.predictor or predictor)(x)


def fa_dim(cfg, feat_dim: int, proj_dim: int) -> int:
    """Width of the features FA acts on."""
    return (
        feat_dim if cfg.FA.POSITION == "backbone" and cfg.FA.ARCH != "post_predictor" else proj_dim
    )


def check_fa_cfg(cfg) -> None:
    """Raise ConfigError for an unknown FA value or a combination that cannot work."""
    fa, method = cfg.FA, cfg.MODEL.METHOD
    lookup(FA_REGISTRY, fa.OP, "FA.OP")
    for key, value, valid in (
        ("FA.POSITION", fa.POSITION, POSITIONS),
        ("FA.ARCH", fa.ARCH, ARCHS),
        ("FA.STOP_GRAD", fa.STOP_GRAD, STOP_GRADS),
        ("FA.ROLE", fa.ROLE, ROLES),
    ):
        if value not in valid:
            raise ConfigError(f"{key} '{value}' is not one of: {', '.join(valid)}")
    if fa.NUM < 1:
        raise ConfigError(f"FA.NUM must be >= 1, got {fa.NUM}")
    if fa.LOSS_WEIGHT < 0:
        raise ConfigError(f"FA.LOSS_WEIGHT must be >= 0, got {fa.LOSS_WEIGHT}")
    if not fa.ENABLED:
        return
    if method == "moco" and fa.ARCH != "basic":
        raise ConfigError(
            f"FA.ARCH '{fa.ARCH}' needs a predictor; MODEL.METHOD moco has none (use basic)"
        )
    if method != "moco" and fa.ROLE != "positive":
        raise ConfigError(
            f"FA.ROLE '{fa.ROLE}' needs negatives; MODEL.METHOD {method} has none (use positive)"
        )
    if fa.ARCH == "post_predictor" and fa.POSITION != "projector":
        raise ConfigError(
            "FA.ARCH post_predictor acts on the predictor output: set FA.POSITION projector"
        )
    if fa.OP == "hardmix" and (
        method != "moco" or fa.ROLE != "negative" or fa.POSITION != "projector"
    ):
        raise ConfigError(
            "FA.OP hardmix synthesises negatives from the queue: it needs MODEL.METHOD moco, "
            f"FA.ROLE negative and FA.POSITION projector (got {method}, {fa.ROLE}, {fa.POSITION})"
        )
    if fa.OP == "hardmix" and min(fa.HARDMIX_NUM, fa.HARDMIX_TOPN) < 1:
        raise ConfigError("FA.HARDMIX_NUM and FA.HARDMIX_TOPN must be >= 1")
    if fa.OP == "generator" and fa.STOP_GRAD == "all":
        raise ConfigError("FA.OP generator with FA.STOP_GRAD all: the generator would never learn")
