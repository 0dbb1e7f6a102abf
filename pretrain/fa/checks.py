"""``check_fa_cfg``: the FA keys' own values here; every rule that ties FA to a method, an
architecture or an operator lives on that class (``check``)."""

from __future__ import annotations

from ..errors import ConfigError
from ..utils.registry import lookup
from .base import FA_REGISTRY
from .branch import LOSS_MODES, POSITIONS, STOP_GRADS
from .contrastive import ROLES
from .ops import LAMBDA_PERS
from .siamese import FA_ARCH_REGISTRY


def check_fa_cfg(cfg, branch: type | None = None) -> None:
    """Raise ConfigError for an unknown FA value or a combination that cannot work;
    ``branch``: the method's FA class (``ContrastiveFA`` or ``PredictorFA``)."""
    fa = cfg.FA
    op_cls = lookup(FA_REGISTRY, fa.OP, "FA.OP")
    for key, value, valid in (
        ("FA.POSITION", fa.POSITION, POSITIONS),
        ("FA.ARCH", fa.ARCH, tuple(name for name, _ in FA_ARCH_REGISTRY)),
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
    if branch is None:
        raise ConfigError(f"FA.ENABLED: MODEL.METHOD {cfg.MODEL.METHOD} has no FA branch "
                          "(its class sets no FA_BRANCH)")
    branch.check(cfg)
    op_cls.check(cfg, branch)
    branch.check_op(cfg, op_cls)
