"""Optimizers and the learning-rate schedule of pretraining.

lr = ``SOLVER.BASE_LR`` x ``SOLVER.BATCH_SIZE`` / 256 (linear scaling), linear warm-up for
``SOLVER.WARMUP_EPOCHS``, then cosine (or step, or constant) decay over the run. Parameter groups
come from the method (``model.param_groups()``); a group marked ``fix_lr`` keeps the base lr
(SimSiam's predictor), one marked ``lars_exclude`` takes plain SGD steps under LARS (BYOL's
biases and BN).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .utils.dist import unwrap

__all__ = ["LARS", "base_lr", "build_optimizer", "check_solver", "lr_factor", "set_lr"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each tensor is scaled by the trust ratio
    η · ‖w‖ / ‖g + wd · w‖ (You et al. 2017, "Large Batch Training of Convolutional Networks");
    groups marked ``lars_exclude`` take plain SGD steps."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                if not g["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, 1.0)
                    d = d * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def check_solver(cfg, world_size: int) -> int:
    """Validate the solver keys for ``world_size`` processes; returns the per-process batch."""
    s = cfg.SOLVER
    if s.OPTIMIZER not in ("sgd", "lars"):
        raise ConfigError(f"SOLVER.OPTIMIZER '{s.OPTIMIZER}' is not one of: sgd, lars")
    if s.SCHEDULE not in ("cosine", "step", "constant"):
        raise ConfigError(f"SOLVER.SCHEDULE '{s.SCHEDULE}' is not one of: cosine, step, constant")
    if s.BATCH_SIZE <= 0 or s.BATCH_SIZE % world_size:
        raise ConfigError(f"SOLVER.BATCH_SIZE {s.BATCH_SIZE} must be a positive multiple of the "
                          f"{world_size} processes")
    if s.EPOCHS <= 0 and s.MAX_ITER <= 0:
        raise ConfigError("set SOLVER.EPOCHS or SOLVER.MAX_ITER to a positive number")
    if cfg.MODEL.METHOD == "moco" and cfg.MODEL.MOCO.K < s.BATCH_SIZE:
        raise ConfigError(f"MODEL.MOCO.K {cfg.MODEL.MOCO.K} is smaller than the global batch "
                          f"SOLVER.BATCH_SIZE {s.BATCH_SIZE}: the queue must hold one batch of keys")
    return s.BATCH_SIZE // world_size


def base_lr(cfg) -> float:
    """``SOLVER.BASE_LR`` x ``SOLVER.BATCH_SIZE`` / 256."""
    return cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or LARS over ``model.param_groups()``, every group at :func:`base_lr`."""
    groups = unwrap(model).param_groups()
    kw = dict(lr=base_lr(cfg), momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    if cfg.SOLVER.OPTIMIZER == "lars":
        return LARS(groups, **kw)
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    return torch.optim.SGD(groups, **kw)


def lr_factor(it: int, total: int, warmup: int, schedule: str = "cosine",
              steps: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr for iteration ``it`` (0-based) of ``total``.

    Linear warm-up (it + 1) / warmup for the first ``warmup`` iterations, then
    cosine: ½ (1 + cos(π (it − warmup) / (total − warmup))), step: gamma^(#steps ≤ it),
    or constant 1.
    """
    if it < warmup:
        return (it + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))
    if schedule == "step":
        return gamma ** sum(it >= s for s in steps)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float, factor: float) -> float:
    """Apply ``lr * factor`` to every group except ``fix_lr`` ones (they keep ``lr``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr if g.get("fix_lr") else lr * factor
    return lr * factor
