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

Pair = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


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
    query) stays plain. ``CONTRASTIVE``: MoCo (no predictor) takes it too.
    """

    OWN_PREDICTOR = False
    AUGMENTED_TARGET = True
    TARGET_SIDE = False
    CONTRASTIVE = False

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
            return [(p_aug, view.target.repeat(num, 1), lam),
                    (p_aug, view.target[aug.partner], 1 - lam)]
        if aug.positive is not None and branch.position == "projector" and self.AUGMENTED_TARGET:
            return [(p_aug, aug.positive.detach(), None)]
        return [(p_aug, view.target.repeat(num, 1), None)]


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
        fa = cfg.FA
        if fa.POSITION != "projector":
            raise ConfigError("FA.ARCH parallel_predictor augments the target, a projection: set "
                              "FA.POSITION projector")
        if branch.HAS_NEGATIVES and fa.ROLE != "positive":
            raise ConfigError(f"FA.ARCH parallel_predictor augments the key: FA.ROLE '{fa.ROLE}' "
                              "has no augmented query to use (use positive)")
        if not branch.HAS_NEGATIVES and FA_REGISTRY.get(fa.OP).LEARNED:
            raise ConfigError(f"FA.OP {fa.OP} learns from the FA term through its output; with "
                              "FA.ARCH parallel_predictor that is the target, which the loss "
                              f"does not differentiate in MODEL.METHOD {cfg.MODEL.METHOD}")

    def pairs(self, branch, view, heads):
        aug = branch.augment(view.target, view.p)  # FA(sg(z⁺)), the prediction as its positive
        num = aug.z.shape[0] // view.p.shape[0]
        return [(view.p.repeat(num, 1), aug.z.detach(), None)]


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
