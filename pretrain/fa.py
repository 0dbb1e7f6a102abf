"""Feature augmentation (FA): make features *similar to* the encoder's, in feature space.

One concern: feature augmentation. Every FA decision is in this file. Operators are small classes in ``FA_REGISTRY`` (name =
``FA.OP``), each with its formula and its published source in the docstring; adding an
operator is adding a class. ``ContrastiveFA`` (MoCo) and ``PredictorFA`` (SimSiam, BYOL) wire an
operator into a method's loss; the methods only call them.

Notation: ``z`` [N, D] the features at the FA position, ``z⁺`` [N, D] the positive of each row
(the other view's feature from the network that provides the targets: MoCo's key encoder, BYOL's
target network, SimSiam's own encoder), ``ε`` standard normal noise, ``w`` = FA.LOSS_WEIGHT.

``FA.ENABLED False`` builds no FA module: the baseline, exactly. The keys:

``FA.OP``
    ``identity`` (z̃ = z: the loss-scale control where the FA term then equals the base term,
    see ``Identity``), ``noise``, ``dropout``, ``extrapolate``, ``interpolate``, ``generator``,
    ``hardmix``.
``FA.POSITION``
    ``projector``: MoCo: the L2-normalised projector outputs q, k (as published); SimSiam/BYOL:
    the projector output. ``backbone``: the pooled trunk feature; the result goes through the
    projector (MoCo then normalises it; a two-sided operator's key side is not used there).
``FA.ARCH`` (SimSiam / BYOL; MoCo has no predictor and takes ``basic`` only)
    ``basic``: the augmented feature is compared with the target directly, no predictor: a
    predictor-free Siamese term, known to collapse — a negative control, not a candidate.
    ``pre_predictor``: FA before the (shared) predictor: ``p̃ = pred(FA(.))``.
    ``post_predictor``: FA on the predictor output: ``p̃ = FA(p)`` (needs POSITION ``projector``).
    ``separate_predictor``: like ``pre_predictor`` with the FA branch's own predictor.
``FA.STOP_GRAD`` — where the gradient of the FA term stops
    ``none``: nowhere. ``input``: FA's input is detached: FA's own parameters and what the branch
    applies after FA learn from it, the encoder before FA does not. ``all``: FA's output is
    detached: augmented features are constants (``generator`` is refused: it would never learn).
``FA.ROLE`` (MoCo)
    ``positive``: augmented queries q̃ against their (augmented) key and the negatives.
    ``negative``: the q̃ of the *other* images in the batch join every query's negatives.
    ``both``: the mean of the two terms. Augmented features are never enqueued.
    SimSiam / BYOL: ``positive`` only — prediction pairs ``(p̃1, target2)``, ``(p̃2, target1)``.
``FA.NUM``: augmented copies per sample (fresh randomness each), stacked copy-major: row
    ``c*N + i`` is copy ``c`` of sample ``i``.
``FA.LOSS_MODE`` with s the schedule factor below:
    ``add``: L = L_ssl + s·w·L_fa.  ``mean``: L = (L_ssl + s·w·L_fa) / (1 + s·w).
    ``replace``: L = (1 − s)·L_ssl + s·L_fa — the augmented problem replaces the plain one, as
    in the published recipes (Feature Transformation, MoCHi); w must be 1 there.
``FA.START`` / ``FA.RAMP`` (fractions of the run): s = 0 before START, then grows linearly to 1
    over RAMP (at once when RAMP is 0). While s = 0 no FA is computed at all: the loss, its
    gradients and every random draw equal FA off.
``FA.QUEUE_MIX`` (MoCo): the negatives of the FA term are ``QueueMix``'s interpolated queue.
``FA.RENORM`` (MoCo, POSITION projector): L2-normalise augmented features again (the published
    extrapolation does not; ``hardmix`` always does, as MoCHi).

The published Feature Transformation recipe for MoCo v2 (Zhu et al., ICCV 2021, "Improving
Contrastive Learning by Visualizing Feature Transformation") is ``OP extrapolate``,
``BOTH_SIDES True``, ``LAMBDA_PER batch``, ``ALPHA 2``, ``QUEUE_MIX True``, ``QUEUE_ALPHA 1.6``,
``ROLE positive``, ``LOSS_MODE replace``, ``POSITION projector``, T = 0.2:
L = InfoNCE over the logits [q̂·k̂, q̂·n̂] / T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .losses import info_nce, info_nce_from_logits
from .utils.registry import Registry, lookup, register_as

FA_REGISTRY = Registry("FA_OP")
FA_REGISTRY.__doc__ = "Feature-augmentation operators, by FA.OP name; built as ``cls(cfg, dim)``."

POSITIONS = ("backbone", "projector")
ARCHS = ("basic", "pre_predictor", "post_predictor", "separate_predictor")
STOP_GRADS = ("none", "input", "all")
ROLES = ("positive", "negative", "both")
LOSS_MODES = ("add", "mean", "replace")
LAMBDA_PERS = ("batch", "sample")


class Augmented(NamedTuple):
    """An operator's output. ``z`` [M, D] the augmented features; ``positive`` [M, D] augmented
    positives (two-sided operators) or None; ``partner`` [M] the sample mixed into each row and
    ``lam`` [M] the row's own share (mixing operators: soft targets), else None."""

    z: torch.Tensor
    positive: torch.Tensor | None = None
    partner: torch.Tensor | None = None
    lam: torch.Tensor | None = None


def _beta(alpha: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``n`` samples of Beta(alpha, alpha), shaped [n, 1], on ``like``'s device and dtype."""
    a = torch.full((n, 1), float(alpha), device=like.device)
    # validate_args=False: argument checks would synchronise with the GPU on every call
    return torch.distributions.Beta(a, a, validate_args=False).sample().to(like.dtype)


def _draw(alpha: float, n: int, like: torch.Tensor, per: str) -> torch.Tensor:
    """Beta(alpha, alpha) per sample [n, 1], or one draw for the batch broadcast to [n, 1]."""
    return _beta(alpha, n, like) if per == "sample" else _beta(alpha, 1, like).expand(n, 1)


class FAOp(nn.Module):
    """Base class: ``forward(z [N, D], positive [N, D] | None) -> Augmented`` (one copy)."""

    def __init__(self, cfg, dim: int):
        super().__init__()


# ----------------------------------------------------------------------------- operators
@register_as(FA_REGISTRY, "identity")
class Identity(FAOp):
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
class Noise(FAOp):
    """Gaussian noise scaled by the batch spread of each dimension.

        z̃ = z + σ · s ⊙ ε,   s_d = std_i z_{i,d} (over the batch, a constant),   σ = FA.NOISE_STD

    Property: E[z̃] = z; the noise on dimension d has standard deviation σ·s_d.

    Source: DeVries & Taylor 2017, "Dataset Augmentation in Feature Space" (ICLR workshop):
    Gaussian noise in a learned feature space, each dimension's noise scaled by that dimension's
    spread over the data and a factor. Here the spread is the current batch's (no pass over the
    data set), and the features are those of the contrastive encoder being trained.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.sigma = cfg.FA.NOISE_STD

    def forward(self, z, positive=None):
        s = z.detach().std(dim=0, correction=0, keepdim=True)  # [1, D]
        return Augmented(z + self.sigma * s * torch.randn_like(z))


@register_as(FA_REGISTRY, "dropout")
class Dropout(FAOp):
    """Feature dropout, rescaled.

        z̃ = m ⊙ z / (1 − p),   m_{i,d} ~ Bernoulli(1 − p),   p = FA.DROPOUT_P

    Property: E[z̃] = z; a fraction p of the entries is zero, the rest are z / (1 − p).

    Source: Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from
    Overfitting" (JMLR), in its inverted form (rescaled while training). As the augmentation of
    a contrastive objective: SimCSE (Gao et al., EMNLP 2021), where the masks act inside the
    encoder; here one mask acts on the feature at FA.POSITION.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.p = cfg.FA.DROPOUT_P

    def forward(self, z, positive=None):
        return Augmented(F.dropout(z, self.p, training=True))


@register_as(FA_REGISTRY, "extrapolate")
class Extrapolate(FAOp):
    """Positive extrapolation (Feature Transformation, Zhu et al. ICCV 2021): push each feature
    and its positive apart along the line through them.

        z̃ = λ z + (1 − λ) z⁺,   z̃⁺ = λ z⁺ + (1 − λ) z,   λ = 1 + b,   b ~ Beta(α, α)

    α = FA.ALPHA (published: 2); one λ per batch (FA.LAMBDA_PER batch, published) or per sample;
    z̃⁺ only with FA.BOTH_SIDES (published). No re-normalisation. Property: λ ∈ [1, 2]; z̃ lies
    beyond z, z̃⁺ beyond z⁺; z⁺ is a constant, but z̃⁺ carries z's gradient through (1 − λ) z,
    as in the published code.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.alpha, self.per, self.both = cfg.FA.ALPHA, cfg.FA.LAMBDA_PER, cfg.FA.BOTH_SIDES

    def forward(self, z, positive=None):
        lam = 1 + _draw(self.alpha, z.shape[0], z, self.per)  # [N, 1]
        pos = positive.detach()
        return Augmented(lam * z + (1 - lam) * pos,
                         lam * pos + (1 - lam) * z if self.both else None)


@register_as(FA_REGISTRY, "interpolate")
class Interpolate(FAOp):
    """Mix each feature with another sample of the batch, trained with a soft target (i-Mix,
    Lee et al. ICLR 2021; Un-Mix, Shen et al. AAAI 2022).

        z̃_i = λ_i z_i + (1 − λ_i) z_j,   j = (i + s) mod N,   s ~ U{1, …, N−1} (one per call),
        λ_i ~ Beta(α, α) per sample (FA.LAMBDA_PER), α = FA.ALPHA

    The loss of z̃_i is λ_i · loss(target of i) + (1 − λ_i) · loss(target of j). Property: a
    convex combination of z_i and a *different* sample (the partner is a constant). With N = 1
    it returns z.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.alpha, self.per = cfg.FA.ALPHA, cfg.FA.LAMBDA_PER

    def forward(self, z, positive=None):
        n = z.shape[0]
        idx = torch.arange(n, device=z.device)
        if n < 2:
            return Augmented(z, None, idx, torch.ones(n, device=z.device, dtype=z.dtype))
        lam = _draw(self.alpha, n, z, self.per)  # [N, 1]
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
class Generator(FAOp):
    """A learned, adversarial, bounded perturbation: the generator makes the FA term *harder*
    while the encoder learns to solve it (adversarial feature augmentation, as in Volpi et al.
    2018 and AdCo, Hu et al. CVPR 2021, rather than a helper trained by the loss it feeds).

        z̃ = z + R(δ),   δ = ρ ‖sg(z)‖ · u / √(1 + ‖u‖²),   u = g([sg(z), ε])
        g = Linear(D+E, H) → ReLU → Linear(H, D),   ε ~ N(0, I_E)

    R is a gradient reversal: g's parameters receive −∇L_fa (they ascend the FA term), the
    encoder +∇L_fa through z. E = FA.GEN_NOISE_DIM, H = FA.GEN_HIDDEN_DIM, ρ = FA.GEN_BOUND. Property:
    ‖z̃ − z‖ < ρ‖z‖ (z̃ stays similar to z).
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.noise_dim, self.bound = cfg.FA.GEN_NOISE_DIM, cfg.FA.GEN_BOUND
        hidden = cfg.FA.GEN_HIDDEN_DIM
        self.g = nn.Sequential(
            nn.Linear(dim + self.noise_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def forward(self, z, positive=None):
        eps = torch.randn(z.shape[0], self.noise_dim, device=z.device, dtype=z.dtype)
        u = self.g(torch.cat([z.detach(), eps], dim=1))  # [N, D]
        scale = self.bound * z.detach().norm(dim=1, keepdim=True)  # [N, 1]
        delta = scale * u / (1 + u.pow(2).sum(1, keepdim=True)).sqrt()
        return Augmented(z + _ReverseGrad.apply(delta))


@register_as(FA_REGISTRY, "hardmix")
class HardMix(FAOp):
    """Hard negatives synthesised from the queue (MoCHi, Kalantidis et al. NeurIPS 2020; MoCo
    only; extra negatives, never positives, never enqueued).

    For each query q (unit) take its N_top = FA.HARDMIX_TOPN most similar queue entries, then
        s neg–neg mixes:    h = normalize(α n_a + (1 − α) n_b),  α ~ U(0, 1)
        s′ query–neg mixes: h = normalize(β q + (1 − β) n_c),    β ~ U(0, 1/2)
    with n_a, n_b, n_c drawn uniformly from the top N_top, s = FA.HARDMIX_NUM and
    s′ = FA.HARDMIX_QUERY_NUM (MoCHi's (N, s, s′)). Mixing waits for FA.START (MoCHi's warm-up).

    ``forward(q [N, D], queue [K, D]) -> [N, s+s′, D]`` builds h (the reference form);
    ``similarities(q, queue) -> [N, s+s′]`` gives q·h, what InfoNCE needs, without building h:
    with s_j = q·n_j,
        q·h_ab = (α s_a + (1 − α) s_b) / ‖α n_a + (1 − α) n_b‖
        q·h_c  = (β q·q + (1 − β) s_c) / ‖β q + (1 − β) n_c‖
    where ‖u + v‖² = ‖u‖² + ‖v‖² + 2 u·v; only n_a·n_b needs the vectors. The norms are
    constants (h is detached), so the gradient w.r.t. q is h, as for the einsum of ``forward``.
    For the same random state both draw the same mixes. Property: h is unit-norm and detached.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        self.top_n = cfg.FA.HARDMIX_TOPN
        self.s, self.s_query = cfg.FA.HARDMIX_NUM, cfg.FA.HARDMIX_QUERY_NUM

    @torch.no_grad()
    def _draw(self, q: torch.Tensor, sim: torch.Tensor):
        """Queue indices a, b [N, s], c [N, s′] among each query's top N_top, and α, β."""
        n, top_n = q.shape[0], min(self.top_n, sim.shape[1])
        top = sim.topk(top_n, dim=1, sorted=False).indices  # [N, top_n], any order
        alpha = torch.rand(n, self.s, device=q.device, dtype=q.dtype)
        beta = 0.5 * torch.rand(n, self.s_query, device=q.device, dtype=q.dtype)

        def pick(s):  # s random top-N queue indices per query -> [N, s]
            return top.gather(1, torch.randint(top_n, (n, s), device=q.device))

        return pick(self.s), pick(self.s), pick(self.s_query), alpha, beta

    @staticmethod
    def _rows(queue: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """queue[idx] [N, s, D] (index_select: much faster than advanced indexing on CPUs)."""
        return queue.index_select(0, idx.flatten()).view(*idx.shape, queue.shape[1])

    @staticmethod
    def _dots(queue: torch.Tensor, a: torch.Tensor, b: torch.Tensor, chunk: int = 4096):
        """n_a·n_b [N, s], a product and a sum over chunks of 4096 pairs: not an einsum, which
        runs as N·s tiny matrix products, and never the whole [N, s, D] at once, whose fresh
        pages cost more than the products (together 4× faster in a CPU training step)."""
        shape, a, b = a.shape, a.flatten(), b.flatten()
        parts = [(queue.index_select(0, a[i:i + chunk]) * queue.index_select(0, b[i:i + chunk])).sum(1)
                 for i in range(0, a.numel(), chunk)]
        return torch.cat(parts).view(shape)

    @torch.no_grad()
    def forward(self, q, queue):
        q = q.detach()
        sim = torch.einsum("nc,kc->nk", q, queue)  # [N, K]
        a, b, c, alpha, beta = self._draw(q, sim)
        alpha, beta = alpha.unsqueeze(2), beta.unsqueeze(2)  # [N, s, 1]
        neg_neg = alpha * self._rows(queue, a) + (1 - alpha) * self._rows(queue, b)  # [N, s, D]
        query_neg = beta * q.unsqueeze(1) + (1 - beta) * self._rows(queue, c)  # [N, s′, D]
        return F.normalize(torch.cat([neg_neg, query_neg], dim=1), dim=2)  # [N, s+s′, D]

    def similarities(self, q: torch.Tensor, queue: torch.Tensor,
                     sim: torch.Tensor | None = None) -> torch.Tensor:
        """``sim``: q·queue [N, K] when the caller has it already (differentiable in q)."""
        if sim is None:
            sim = torch.einsum("nc,kc->nk", q, queue)  # [N, K] s_j, differentiable in q
        s_d, qd = sim.detach(), q.detach()
        a, b, c, alpha, beta = self._draw(qd, s_d)
        with torch.no_grad():
            sq = queue.pow(2).sum(1)  # [K] ‖n_j‖²
            ab = self._dots(queue, a, b)  # [N, s] n_a·n_b
            norm_ab = (alpha**2 * sq[a] + (1 - alpha) ** 2 * sq[b]
                       + 2 * alpha * (1 - alpha) * ab).sqrt().clamp_min(1e-12)  # [N, s]
            qq = qd.pow(2).sum(1, keepdim=True)  # [N, 1]
            norm_c = (beta**2 * qq + (1 - beta) ** 2 * sq[c]
                      + 2 * beta * (1 - beta) * s_d.gather(1, c)).sqrt().clamp_min(1e-12)
        q_qd = torch.einsum("nc,nc->n", q, qd).unsqueeze(1)  # [N, 1] q·q (gradient: q)
        neg_neg = (alpha * sim.gather(1, a) + (1 - alpha) * sim.gather(1, b)) / norm_ab
        query_neg = (beta * q_qd + (1 - beta) * sim.gather(1, c)) / norm_c
        return torch.cat([neg_neg, query_neg], dim=1)  # [N, s+s′]


class QueueMix(nn.Module):
    """Negative interpolation in the queue (Feature Transformation, Zhu et al. ICCV 2021).

        n̂_j = μ n_j + (1 − μ) n_π(j),   π a random permutation of the K entries,
        μ ~ Beta(α_n, α_n) once per batch,   α_n = FA.QUEUE_ALPHA (published: 1.6)

    No re-normalisation. Property: n̂ are convex mixes of two queue entries; the stored queue is
    unchanged (only the FA term sees n̂).
    """

    def __init__(self, cfg):
        super().__init__()
        self.alpha = cfg.FA.QUEUE_ALPHA

    @torch.no_grad()
    def forward(self, queue: torch.Tensor) -> torch.Tensor:
        mu = _beta(self.alpha, 1, queue)  # [1, 1]
        perm = torch.randperm(queue.shape[0], device=queue.device)
        return mu * queue + (1 - mu) * queue.index_select(0, perm)  # [K, C]


class FeatureAugmenter(nn.Module):
    """Applies FA.OP ``FA.NUM`` times with FA.STOP_GRAD; copies stacked copy-major."""

    def __init__(self, cfg, dim: int):
        super().__init__()
        self.op_name = cfg.FA.OP
        self.op = lookup(FA_REGISTRY, cfg.FA.OP, "FA.OP")(cfg, dim)
        self.num = cfg.FA.NUM
        self.stop_grad = cfg.FA.STOP_GRAD

    def forward(self, z: torch.Tensor, positive: torch.Tensor | None = None) -> Augmented:
        if self.stop_grad == "input":
            z = z.detach()
        copies = [self.op(z, positive) for _ in range(self.num)]
        out = Augmented(*(None if parts[0] is None else torch.cat(parts, dim=0)
                          for parts in zip(*copies, strict=True)))
        if self.stop_grad == "all":
            out = out._replace(z=out.z.detach(),
                               positive=None if out.positive is None else out.positive.detach())
        return out


# ----------------------------------------------------------------------------- schedule, loss
class FeatureAugmentation(nn.Module):
    """What every method's FA shares: the operator, the schedule and the loss combination.

    ``progress`` (iteration / iterations, set by the method before each step) gives the factor
    s (FA.START, FA.RAMP); ``active`` is False while s = 0; ``combine`` applies FA.LOSS_MODE.
    """

    def __init__(self, cfg, dim: int):
        super().__init__()
        fa = cfg.FA
        self.mode, self.weight, self.start, self.ramp = fa.LOSS_MODE, fa.LOSS_WEIGHT, fa.START, fa.RAMP
        self.augment = FeatureAugmenter(cfg, dim)
        self.progress = 0.0

    def factor(self, progress: float | None = None) -> float:
        """s: 0 before START, then linear to 1 over RAMP (1 at once without a ramp)."""
        p = self.progress if progress is None else progress
        if p < self.start:
            return 0.0
        return 1.0 if self.ramp <= 0 else min(1.0, (p - self.start) / self.ramp)

    @property
    def active(self) -> bool:
        return self.factor() > 0

    def same_graph_every_step(self) -> bool:
        """False when the schedule leaves FA's own trainable parameters unused in some steps."""
        scheduled = self.start > 0 or self.ramp > 0
        return not (scheduled and any(p.requires_grad for p in self.parameters()))

    def combine(self, loss_ssl: torch.Tensor, loss_fa: torch.Tensor) -> torch.Tensor:
        s = self.factor()
        if self.mode == "replace":  # at s = 1 the plain term is only logged: no backward through it
            return loss_fa if s == 1 else (1 - s) * loss_ssl + s * loss_fa
        sw = s * self.weight
        loss = loss_ssl + sw * loss_fa
        return loss / (1 + sw) if self.mode == "mean" else loss


class ContrastiveFA(FeatureAugmentation):
    """MoCo's FA term: the InfoNCE of the augmented problem (queries, keys and negatives after
    FA), to be combined with the plain InfoNCE by ``combine``.

    - OP ``hardmix``: L_fa = InfoNCE(q, k⁺, queue ∪ {h}) with MoCHi's negatives h.
    - ROLE positive: L_fa = InfoNCE(q̃, k̃⁺, negatives); ``interpolate`` scores q̃ against the
      batch keys and the negatives with the soft target λ at its own key, 1 − λ at its partner's
      (i-Mix). k̃⁺ = k⁺ unless the operator is two-sided.
    - ROLE negative: L_fa = InfoNCE(q, k⁺, negatives ∪ {q̃ of the other images}).
    - ROLE both: the mean of the two.
    negatives = the queue, or ``QueueMix``'s n̂ with FA.QUEUE_MIX.
    """

    def __init__(self, cfg, dim: int):
        super().__init__(cfg, dim)
        fa = cfg.FA
        self.position, self.role, self.renorm = fa.POSITION, fa.ROLE, fa.RENORM
        self.queue_mix = QueueMix(cfg) if fa.QUEUE_MIX else None

    def forward(self, q, k, queue, T: float, h, h_k, projector: nn.Module,
                logits: torch.Tensor) -> torch.Tensor:
        """q, k [N, C] unit queries and keys; queue [K, C]; h, h_k [N, F] pooled trunk features;
        ``logits`` [N, 1+K]: the plain InfoNCE's [q·k⁺, q·queue]/T, which hardmix extends."""
        negatives = self.queue_mix(queue) if self.queue_mix is not None else queue
        if self.augment.op_name == "hardmix":
            if self.queue_mix is not None:  # the FA term's negatives are not the plain ones
                extra = self.augment.op.similarities(q, queue)  # [N, s+s′] q·h, h never built
                return info_nce(q, k, negatives, T, extra)[0]
            # the same InfoNCE with the plain problem's products reused: [q·k⁺, q·n, q·h]/T
            extra = self.augment.op.similarities(q, queue, logits[:, 1:] * T)  # [N, s+s′]
            return info_nce_from_logits(torch.cat([logits, extra / T], dim=1))
        if self.position == "backbone":
            aug = self.augment(h, h_k)
            q_aug = F.normalize(projector(aug.z).float(), dim=1)  # [NUM*N, C]
            k_aug = None
        else:
            aug = self.augment(q, k)
            q_aug, k_aug = aug.z, aug.positive
            if self.renorm:
                q_aug = F.normalize(q_aug, dim=1)
                k_aug = None if k_aug is None else F.normalize(k_aug, dim=1)
        num = q_aug.shape[0] // q.shape[0]
        terms = []
        if self.role in ("positive", "both"):
            if aug.partner is not None:  # soft target over the batch keys (i-Mix)
                own = torch.arange(q.shape[0], device=q.device).repeat(num)  # [NUM*N]
                targets = torch.zeros(q_aug.shape[0], q.shape[0], device=q.device)
                targets[torch.arange(len(own)), own] += aug.lam.float()
                targets[torch.arange(len(own)), aug.partner] += 1 - aug.lam.float()
                terms.append(info_nce(q_aug, k, negatives, T, targets=targets)[0])
            else:
                terms.append(info_nce(q_aug, k_aug if k_aug is not None else k.repeat(num, 1),
                                      negatives, T)[0])
        if self.role in ("negative", "both"):
            terms.append(info_nce(q, k, negatives, T, _other_images(q, q_aug))[0])
        return sum(terms) / len(terms)


def _other_images(q: torch.Tensor, q_aug: torch.Tensor) -> torch.Tensor:
    """q·q̃ for augmented queries of *other* images [N, NUM*N]; own-image entries are ``-inf``."""
    n = q.shape[0]
    sim = torch.einsum("nc,mc->nm", q, q_aug)  # [N, NUM*N]
    rows = torch.arange(n, device=q.device)
    source = torch.arange(q_aug.shape[0], device=q.device) % n  # image of each augmented row
    return sim.masked_fill(rows[:, None] == source[None, :], float("-inf"))


class PredictorFA(FeatureAugmentation):
    """The FA branch of SimSiam / BYOL: augmented predictions p̃ [NUM*N, C] for one view.

    With h, z, p the view's pooled / projected / predicted features and FA(.) the augmenter:

    | FA.ARCH             | POSITION projector | POSITION backbone          |
    |---------------------|--------------------|----------------------------|
    | basic               | FA(z)              | projector(FA(h))           |
    | pre_predictor       | pred(FA(z))        | pred(projector(FA(h)))     |
    | separate_predictor  | pred_fa(FA(z))     | pred_fa(projector(FA(h)))  |
    | post_predictor      | FA(p)              | (refused)                  |

    ``pred_fa`` (``self.predictor``) is this branch's own predictor, built by ``make_predictor``.
    ``forward`` returns the pairs the method scores: ``[(p̃, target, weight)]`` with target the
    other view's target repeated NUM times — or, with POSITION projector and an ARCH other
    than post_predictor, a two-sided operator's augmented target (a constant; at POSITION
    backbone and after the predictor the operator's other side is not used) — or, for a mixing
    operator, the targets of the sample and of its partner weighted λ and 1 − λ (Un-Mix's soft
    target).
    """

    def __init__(self, cfg, dim: int, make_predictor: Callable[[], nn.Module]):
        super().__init__(cfg, dim)
        self.arch = cfg.FA.ARCH
        self.position = cfg.FA.POSITION
        self.predictor = make_predictor() if self.arch == "separate_predictor" else None

    def forward(
        self,
        online: Sequence[torch.Tensor],
        positive: Sequence[torch.Tensor],
        target: torch.Tensor,
        projector: nn.Module,
        predictor: nn.Module,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``online`` = (h, z, p) of this view; ``positive`` = (h⁺, z⁺) of the other view (the
        operator's z⁺); ``target`` [N, C] what this view's prediction is scored against."""
        (h, z, p), (h_pos, z_pos) = online, positive
        if self.arch == "post_predictor":
            aug = self.augment(p, z_pos)
            p_aug = aug.z
        else:
            aug = self.augment(h, h_pos) if self.position == "backbone" else self.augment(z, z_pos)
            x = projector(aug.z) if self.position == "backbone" else aug.z
            p_aug = x if self.arch == "basic" else (self.predictor or predictor)(x)
        num = p_aug.shape[0] // z.shape[0]
        if aug.partner is not None:
            lam = aug.lam.float()
            return [(p_aug, target.repeat(num, 1), lam), (p_aug, target[aug.partner], 1 - lam)]
        if aug.positive is not None and self.position == "projector" and self.arch != "post_predictor":
            return [(p_aug, aug.positive.detach(), None)]
        return [(p_aug, target.repeat(num, 1), None)]


def fa_dim(cfg, feat_dim: int, proj_dim: int) -> int:
    """Width of the features FA acts on: the trunk's at POSITION backbone, else the projector's
    (ARCH post_predictor needs POSITION projector; the predictor's output has that width too)."""
    return feat_dim if cfg.FA.POSITION == "backbone" else proj_dim


def check_fa_cfg(cfg) -> None:
    """Raise ConfigError for an unknown FA value or a combination that cannot work."""
    fa, method = cfg.FA, cfg.MODEL.METHOD
    lookup(FA_REGISTRY, fa.OP, "FA.OP")
    for key, value, valid in (
        ("FA.POSITION", fa.POSITION, POSITIONS),
        ("FA.ARCH", fa.ARCH, ARCHS),
        ("FA.STOP_GRAD", fa.STOP_GRAD, STOP_GRADS),
        ("FA.ROLE", fa.ROLE, ROLES),
        ("FA.LOSS_MODE", fa.LOSS_MODE, LOSS_MODES),
        ("FA.LAMBDA_PER", fa.LAMBDA_PER, LAMBDA_PERS),
    ):
        if value not in valid:
            raise ConfigError(f"{key} '{value}' is not one of: {', '.join(valid)}")
    if fa.NUM < 1:
        raise ConfigError(f"FA.NUM must be >= 1, got {fa.NUM}")
    if fa.LOSS_WEIGHT < 0:
        raise ConfigError(f"FA.LOSS_WEIGHT must be >= 0, got {fa.LOSS_WEIGHT}")
    if not (0 <= fa.START <= 1 and fa.RAMP >= 0):
        raise ConfigError(f"FA.START must be in [0, 1] and FA.RAMP >= 0, got {fa.START}, {fa.RAMP}")
    if not fa.ENABLED:
        return
    if fa.LOSS_MODE == "replace" and fa.LOSS_WEIGHT != 1:
        raise ConfigError(f"FA.LOSS_WEIGHT {fa.LOSS_WEIGHT} has no effect with FA.LOSS_MODE "
                          "replace (the FA term replaces the base term): leave it at 1")
    if method == "moco" and fa.ARCH != "basic":
        raise ConfigError(
            f"FA.ARCH '{fa.ARCH}' needs a predictor; MODEL.METHOD moco has none (use basic)"
        )
    if method != "moco" and fa.ROLE != "positive":
        raise ConfigError(
            f"FA.ROLE '{fa.ROLE}' needs negatives; MODEL.METHOD {method} has none (use positive)"
        )
    if method != "moco" and fa.QUEUE_MIX:
        raise ConfigError(f"FA.QUEUE_MIX mixes MoCo's queue; MODEL.METHOD {method} has none")
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
    if fa.OP == "hardmix" and (fa.HARDMIX_TOPN < 1 or fa.HARDMIX_NUM + fa.HARDMIX_QUERY_NUM < 1):
        raise ConfigError("FA.HARDMIX_TOPN must be >= 1 and FA.HARDMIX_NUM + "
                          "FA.HARDMIX_QUERY_NUM >= 1")
    if fa.OP == "interpolate" and fa.ROLE != "positive":
        raise ConfigError("FA.OP interpolate is trained with soft targets: it needs FA.ROLE positive")
    if fa.OP == "generator" and fa.STOP_GRAD == "all":
        raise ConfigError("FA.OP generator with FA.STOP_GRAD all: the generator would never learn")
