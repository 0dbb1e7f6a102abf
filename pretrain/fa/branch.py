"""What every method's FA branch shares: copies and stop-gradient (``FeatureAugmenter``), the
position FA acts at, the schedule and the loss combination (``FABranch``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import Augmented, FeatureOp, NegativeGenerator, build_op

POSITIONS = ("backbone", "projector")
STOP_GRADS = ("none", "input", "all")
LOSS_MODES = ("add", "mean", "replace")


class FeatureAugmenter(nn.Module):
    """Applies a feature operator ``num`` times (fresh randomness each), copies stacked
    copy-major (row ``c*N + i`` is copy ``c`` of sample ``i``), with FA.STOP_GRAD:
    ``input`` detaches the operator's input, ``all`` its output."""

    def __init__(self, op: FeatureOp, num: int = 1, stop_grad: str = "none"):
        super().__init__()
        self.op, self.num, self.stop_grad = op, num, stop_grad

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


class FABranch(nn.Module):
    """Base of the methods' FA branches (``ContrastiveFA``, ``PredictorFA``).

    ``op``: a feature operator (applied by ``self.augment``) or a negative generator
    (``self.generators``; only a branch with negatives takes one, ``HAS_NEGATIVES``).
    ``position``: FA acts on the pooled trunk feature h (``backbone``; the result goes through
    the method's projector) or on the projector output z (``projector``).
    Schedule: ``progress`` (iteration / iterations, set by the method before each step) gives
    s = 0 before ``start``, then linear to 1 over ``ramp`` (at once when ``ramp`` is 0); while
    s = 0 the method computes no FA at all (``active``). ``combine`` applies ``loss_mode`` with
    w = ``loss_weight``: add L_ssl + s·w·L_fa; mean (L_ssl + s·w·L_fa) / (1 + s·w);
    replace (1 − s)·L_ssl + s·L_fa.
    """

    HAS_NEGATIVES = False

    def __init__(self, op: FeatureOp | NegativeGenerator, *, num: int = 1, stop_grad: str = "none",
                 position: str = "projector", loss_mode: str = "mean", loss_weight: float = 1.0,
                 start: float = 0.0, ramp: float = 0.0):
        super().__init__()
        self.mode, self.weight, self.start, self.ramp = loss_mode, loss_weight, start, ramp
        self.position = position
        feature_op = isinstance(op, FeatureOp)
        self.augment = FeatureAugmenter(op, num, stop_grad) if feature_op else None
        self.generators = [] if feature_op else [op]  # no parameters: a plain list
        self.progress = 0.0

    @classmethod
    def from_config(cls, cfg, dim: int) -> dict:
        """The constructor's keyword arguments; ``dim``: the width of the features FA acts on."""
        fa = cfg.FA
        return dict(op=build_op(cfg, dim), num=fa.NUM, stop_grad=fa.STOP_GRAD,
                    position=fa.POSITION, loss_mode=fa.LOSS_MODE, loss_weight=fa.LOSS_WEIGHT,
                    start=fa.START, ramp=fa.RAMP)

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError for FA settings this branch cannot run (FA on)."""

    @classmethod
    def check_op(cls, cfg, op_cls: type) -> None:
        """Raise ConfigError when this branch cannot take the FA.OP operator's kind."""
        if issubclass(op_cls, NegativeGenerator) and not cls.HAS_NEGATIVES:
            raise ConfigError(f"FA.OP {cfg.FA.OP} makes negatives; MODEL.METHOD "
                              f"{cfg.MODEL.METHOD} has none")

    # ------------------------------------------------------------------ schedule and loss
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

    # ------------------------------------------------------------------ position
    def at_position(self, h: torch.Tensor, h_pos: torch.Tensor, z: torch.Tensor,
                    z_pos: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]
                    ) -> tuple[Augmented, torch.Tensor]:
        """The operator's output at ``position`` and the augmented feature in the projector's
        space: ``(FA(h, h⁺), project(FA(h)))`` at backbone, ``(FA(z, z⁺), FA(z))`` at projector."""
        if self.position == "backbone":
            aug = self.augment(h, h_pos)
            return aug, project(aug.z)
        aug = self.augment(z, z_pos)
        return aug, aug.z


def fa_dim(cfg, feat_dim: int, proj_dim: int) -> int:
    """Width of the features FA acts on: the trunk's at POSITION backbone, else the projector's
    (ARCH post_predictor needs POSITION projector; the predictor's output has that width too)."""
    return feat_dim if cfg.FA.POSITION == "backbone" else proj_dim
