"""The FA branch of SimSiam / BYOL: augmented predictions p̃, and where FA sits relative to the
predictor (FA.ARCH, one class per architecture in ``FA_ARCH_REGISTRY``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..utils.registry import Registry, lookup, register_as
from .base import FA_REGISTRY, Augmented
from .branch import FABranch

FA_ARCH_REGISTRY = Registry("FA_ARCH")
FA_ARCH_REGISTRY.__doc__ = "Where FA sits relative to the predictor, by FA.ARCH name."


class Pair(NamedTuple):
    """What the method scores with its loss: the (augmented) prediction ``p`` [M, C] against
    ``target`` [M, C], per-row ``weight`` [M] (None: 1), and ``target_grad``: whether the loss
    lets gradient into the target (only ``parallel_predictor_grad``)."""

    p: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None = None
    target_grad: bool = False


class SiameseView(NamedTuple):
    """One view as the method has it: ``h`` [N, F], ``z`` [N, C], ``p`` [N, C] its pooled,
    projected and predicted features; ``h_pos`` [N, F], ``z_pos`` [N, C] the other view's features
    from the network that provides the targets (the operator's positives, constants);
    ``target`` [N, C] what this view's prediction is scored against."""

    h: torch.Tensor
    z: torch.Tensor
    p: torch.Tensor
    h_pos: torch.Tensor
    z_pos: torch.Tensor
    target: torch.Tensor


class SiameseInputs(NamedTuple):
    """Both views, and the method's projector and predictor as functions (FA at POSITION
    backbone goes through the projector; ARCH pre_predictor through the predictor)."""

    views: tuple[SiameseView, SiameseView]
    project: Callable[[torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor], torch.Tensor]


class FAArch:
    """An FA architecture: where FA sits relative to the predictor, for one view.

    ``predictions(branch, view, heads) -> (p̃ [NUM*N, C], Augmented)``: the augmented
    predictions (``heads`` has the method's ``project`` and ``predict``); ``pairs`` turns them into
    what the method scores. ``OWN_PREDICTOR``: the branch builds its own predictor
    (``branch.predictor``). ``AUGMENTED_TARGET``: a two-sided operator's augmented positive
    replaces the target. ``TARGET_SIDE``: FA acts on the target, the prediction (MoCo: the
    query) stays plain. ``CONTRASTIVE``: MoCo (no predictor) takes it too. ``TARGET_GRAD``:
    the target is not a constant (the loss lets gradient into it).
    """

    OWN_PREDICTOR = False
    AUGMENTED_TARGET = True
    TARGET_SIDE = False
    CONTRASTIVE = False
    TARGET_GRAD = False

    @classmethod
    def check(cls, cfg, branch: type) -> None:
        """Raise ConfigError for FA settings this architecture cannot run in ``branch``."""

    def predictions(self, branch: PredictorFA, view: SiameseView, heads: SiameseInputs
                    ) -> tuple[torch.Tensor, Augmented]:
        raise NotImplementedError

    def pairs(self, branch: PredictorFA, view: SiameseView, heads: SiameseInputs) -> list[Pair]:
        """``[(p̃, target, weight)]``: the view's target repeated NUM times; with POSITION
        projector and ``AUGMENTED_TARGET``, a two-sided operator's augmented target (a
        constant); for a mixing operator, the targets of the sample and of its partner
        weighted λ and 1 − λ (Un-Mix's soft target)."""
        p_aug, aug = self.predictions(branch, view, heads)
        num = p_aug.shape[0] // view.z.shape[0]
        if aug.partner is not None:
            lam = aug.lam.float()
            return [Pair(p_aug, view.target.repeat(num, 1), lam),
                    Pair(p_aug, view.target[aug.partner], 1 - lam)]
        if aug.positive is not None and branch.position == "projector" and self.AUGMENTED_TARGET:
            return [Pair(p_aug, aug.positive.detach())]
        return [Pair(p_aug, view.target.repeat(num, 1))]


@register_as(FA_ARCH_REGISTRY, "basic")
class Basic(FAArch):
    CONTRASTIVE = True  # MoCo: FA on the query, q̃ against its key (FA.ROLE)

    """p̃ = FA(z) (backbone: projector(FA(h))), compared with the target directly: a
    predictor-free Siamese term, known to collapse — a negative control, not a candidate."""

    def predictions(self, branch, view, heads):
        aug, x = branch.at_position(view.h, view.h_pos, view.z, view.z_pos, heads.project)
        return x, aug


@register_as(FA_ARCH_REGISTRY, "pre_predictor")
class PrePredictor(FAArch):
    """FA before the (shared) predictor: p̃ = pred(FA(z)) (backbone: pred(projector(FA(h))))."""

    def predictions(self, branch, view, heads):
        aug, x = branch.at_position(view.h, view.h_pos, view.z, view.z_pos, heads.project)
        return heads.predict(x), aug


@register_as(FA_ARCH_REGISTRY, "post_predictor")
class PostPredictor(FAArch):
    """FA on the predictor output: p̃ = FA(p), with the target as the positive (needs POSITION
    projector: p has the projector's width); the operator's other side is not used."""

    AUGMENTED_TARGET = False

    @classmethod
    def check(cls, cfg, branch):
        if cfg.FA.POSITION != "projector":
            raise ConfigError(
                "FA.ARCH post_predictor acts on the predictor output: set FA.POSITION projector"
            )

    def predictions(self, branch, view, heads):
        aug = branch.augment(view.p, view.z_pos)
        return aug.z, aug


@register_as(FA_ARCH_REGISTRY, "separate_predictor")
class SeparatePredictor(FAArch):
    """Like ``pre_predictor`` with the FA branch's own predictor: p̃ = pred_fa(FA(z))."""

    OWN_PREDICTOR = True

    def predictions(self, branch, view, heads):
        aug, x = branch.at_position(view.h, view.h_pos, view.z, view.z_pos, heads.project)
        return branch.predictor(x), aug


@register_as(FA_ARCH_REGISTRY, "parallel_predictor")
class ParallelPredictor(FAArch):
    """FA and the predictor on different views: the prediction stays plain and FA acts on the
    other view's projection, the target (MoCo: on the key), under stop-gradient.

        SimSiam: L_fa = ½ D(p1, FA(sg(z2))) + ½ D(p2, FA(sg(z1)))
        BYOL:    L_fa = ℓ(p1, FA(z′2)) + ℓ(p2, FA(z′1))      (z′: the target network's)
        MoCo:    L_fa = InfoNCE(q, FA(k), negatives)          (q plain; FA.ROLE positive)

    The operator's positive is what the target is scored against (p; MoCo: q): extrapolation
    moves the target away from the prediction, λ t + (1 − λ) p. A mixing operator's target is
    the mixed feature itself, λ t_i + (1 − λ) t_j (no soft target: the prediction is not mixed).
    Needs POSITION projector (the target is a projection); in SimSiam / BYOL an operator with
    parameters of its own (``generator``) is refused: the losses do not differentiate the
    target, so they would never learn.

    Source: the paper's "Parallel-predictor-FA, where FA and the predictor are applied to
    different views"; only a summary of the paper was available, so this is our reading of it.
    """

    AUGMENTED_TARGET = False
    TARGET_SIDE = True
    CONTRASTIVE = True

    @classmethod
    def check(cls, cfg, branch):
        fa, name = cfg.FA, cfg.FA.ARCH
        if fa.POSITION != "projector":
            raise ConfigError(f"FA.ARCH {name} augments the target, a projection: set "
                              "FA.POSITION projector")
        if branch.HAS_NEGATIVES and fa.ROLE != "positive":
            raise ConfigError(f"FA.ARCH {name} augments the key: FA.ROLE '{fa.ROLE}' "
                              "has no augmented query to use (use positive)")
        if not cls.TARGET_GRAD and not branch.HAS_NEGATIVES and FA_REGISTRY.get(fa.OP).LEARNED:
            raise ConfigError(f"FA.OP {fa.OP} learns from the FA term through its output; with "
                              f"FA.ARCH {name} that is the target, which the loss does not "
                              f"differentiate in MODEL.METHOD {cfg.MODEL.METHOD} (use "
                              "parallel_predictor_grad)")

    def pairs(self, branch, view, heads):
        aug = branch.augment(view.target, view.p)  # FA(sg(z⁺)), the prediction as its positive
        num = aug.z.shape[0] // view.p.shape[0]
        return [Pair(view.p.repeat(num, 1), aug.z.detach())]


@register_as(FA_ARCH_REGISTRY, "parallel_predictor_grad")
class ParallelPredictorGrad(ParallelPredictor):
    """``parallel_predictor`` with the stop-gradient removed (the paper's gradient-flow axis):
    the augmented target is the other view's *online* projection, and the FA term's gradient
    reaches the other view's encoder through it.

        SimSiam: L_fa = ½ D′(p1, FA(z2)) + ½ D′(p2, FA(z1))
        BYOL:    L_fa = ℓ′(p1, FA(z2)) + ℓ′(p2, FA(z1))   (z: the online network's projections)
        MoCo:    L_fa = InfoNCE(q1, FA(q2), negatives)   (q2: the online encoder's unit
                                                          projection of the key view)

    D′ / ℓ′: the method's loss without its stop-gradient on the target. BYOL's target network
    and MoCo's key encoder take no gradient, so the online network supplies the target here;
    in MoCo that costs one more forward and backward of the key view through the query
    encoder (its BatchNorm statistics see that view too). Needs FA.STOP_GRAD none, which is
    what lets the gradient through the operator. A learned operator (``generator``) is allowed:
    its output now reaches the loss with gradient.

    Source: the paper's summary says "a stop-gradient strategy on projected features is crucial
    for preventing overfitting"; this is the variant without it, our reading of that axis.
    """

    TARGET_GRAD = True

    @classmethod
    def check(cls, cfg, branch):
        super().check(cfg, branch)
        if cfg.FA.STOP_GRAD != "none":
            raise ConfigError(f"FA.ARCH {cfg.FA.ARCH} lets the gradient through the augmented "
                              f"target; FA.STOP_GRAD {cfg.FA.STOP_GRAD} stops it (use none)")

    def pairs(self, branch, view, heads):
        other = heads.views[1] if view is heads.views[0] else heads.views[0]
        aug = branch.augment(other.z, view.p)  # FA(z⁺), z⁺ the online projection, with gradient
        num = aug.z.shape[0] // view.p.shape[0]
        return [Pair(view.p.repeat(num, 1), aug.z, target_grad=True)]


class PredictorFA(FABranch):
    """The FA branch of SimSiam / BYOL: augmented predictions p̃ of each view, paired with the
    other view's target; the method scores the pairs with its own loss.

    | FA.ARCH             | POSITION projector | POSITION backbone          |
    |---------------------|--------------------|----------------------------|
    | basic               | FA(z)              | projector(FA(h))           |
    | pre_predictor       | pred(FA(z))        | pred(projector(FA(h)))     |
    | separate_predictor  | pred_fa(FA(z))     | pred_fa(projector(FA(h)))  |
    | post_predictor      | FA(p)              | (refused)                  |

    | parallel_predictor  | (p, FA(sg(z⁺)))    | (refused)                  |
    | parallel_predictor_grad | (p, FA(z⁺)), z⁺ online, with gradient | (refused) |

    ``forward`` returns the pairs ``[(p̃, target, weight)]`` of both views (view 1's first), as
    the architecture's ``pairs`` makes them.
    """

    def __init__(self, op, *, arch: FAArch, make_predictor: Callable[[], nn.Module] | None = None,
                 **kw):
        super().__init__(op, **kw)
        self.arch = arch
        # pred_fa: this branch's own predictor (a module, so it is trained and checkpointed)
        self.predictor = make_predictor() if arch.OWN_PREDICTOR else None

    @classmethod
    def from_config(cls, cfg, dim: int, make_predictor: Callable[[], nn.Module] | None = None
                    ) -> dict:
        arch = lookup(FA_ARCH_REGISTRY, cfg.FA.ARCH, "FA.ARCH")()
        return dict(super().from_config(cfg, dim), arch=arch, make_predictor=make_predictor)

    @classmethod
    def check(cls, cfg) -> None:
        fa, method = cfg.FA, cfg.MODEL.METHOD
        if fa.ROLE != "positive":
            raise ConfigError(
                f"FA.ROLE '{fa.ROLE}' needs negatives; MODEL.METHOD {method} has none (use positive)"
            )
        if fa.QUEUE_MIX:
            raise ConfigError(f"FA.QUEUE_MIX mixes MoCo's queue; MODEL.METHOD {method} has none")
        FA_ARCH_REGISTRY.get(fa.ARCH).check(cfg, cls)

    def forward(self, x: SiameseInputs) -> list[Pair]:
        return [pair for view in x.views for pair in self.arch.pairs(self, view, x)]
