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
from torch.optim.sgd import sgd as sgd_update

from .errors import ConfigError
from .utils.dist import unwrap

__all__ = ["LARS", "SGD", "base_lr", "build_optimizer", "check_solver", "lr_factor", "set_lr",
           "use_step_kernels"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each tensor is scaled by the trust ratio
    η · ‖w‖ / ‖g + wd · w‖ (You et al. 2017, "Large Batch Training of Convolutional Networks");
    groups marked ``lars_exclude`` take plain SGD steps.

    Per tensor: d = g + wd · w, d ← d · trust (1 where either norm is 0), buf ← m · buf + d
    (buf = d at the first step), w ← w − lr · buf. Computed for all tensors of a group at once
    with ``torch._foreach_*`` ops: the same elementwise arithmetic as a loop over the tensors.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            d = torch._foreach_add(grads, params, alpha=g["weight_decay"]) if g["weight_decay"] \
                else grads
            if not g["lars_exclude"]:
                w_norm = torch.stack(torch._foreach_norm(params))  # [P]
                d_norm = torch.stack(torch._foreach_norm(d))  # [P]
                trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, 1.0)
                d = torch._foreach_mul(d, list(trust.unbind()))
            state = [self.state[p] for p in params]
            old = [i for i, st in enumerate(state) if "momentum_buffer" in st]
            if old:
                bufs = [state[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, g["momentum"])
                torch._foreach_add_(bufs, [d[i] for i in old])
            for st, di in zip(state, d, strict=True):
                if "momentum_buffer" not in st:  # first step: buf = d
                    st["momentum_buffer"] = di.clone()
            torch._foreach_add_(params, [st["momentum_buffer"] for st in state], alpha=-g["lr"])


class SGD(torch.optim.SGD):
    """torch's SGD (dampening 0, as :func:`build_optimizer` builds it): buf ← m · buf + (g + wd · w),
    w ← w − lr · buf, with three changes to how its kernels are handed the tensors.

    - Every parameter with a gradient gets a zero momentum buffer before its first step, which
      with dampening 0 gives torch's own first update exactly (buf = m · 0 + d = d). torch's fused
      kernel takes buffers for all tensors or none: without this, a parameter whose first
      gradient comes late (an FA generator that FA.START holds back, or a checkpoint written
      before it had one) would crash its first step.
    - Gradient and buffer are given the parameter's memory layout first. torch's fused CPU kernel
      assumes the three share one and steps wrong when they do not, as with a channels-last
      weight and a contiguous buffer (a run resumed with SOLVER.CHANNELS_LAST switched).
    - The kernels get each parameter, gradient and buffer as contiguous views of their memory
      (:func:`_dense_views`). A channels-last weight [O, I, kh, kw] is a contiguous
      [O, kh, kw, I] block; the fused CPU kernel otherwise copies every such tensor to a
      contiguous one and back at each step, work as large as the update itself.
    """

    def __init__(self, params, **kw):
        if kw.get("dampening", 0):
            raise ValueError("pretrain.solver.SGD starts momentum from zero: dampening must be 0")
        super().__init__(params, **kw)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            w, d, b = [], [], []
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad, buf = _like(p, p.grad), None
                if g["momentum"]:
                    st = self.state[p]
                    buf = st["momentum_buffer"] = _like(p, st.get("momentum_buffer"))
                for out, t in zip((w, d, b), _dense_views(p, grad, buf), strict=True):
                    out.append(t)
            if w:
                sgd_update(
                    w, d, b, weight_decay=g["weight_decay"], momentum=g["momentum"], lr=g["lr"],
                    dampening=0.0, nesterov=g["nesterov"], maximize=g["maximize"],
                    foreach=g["foreach"], fused=g["fused"],
                    grad_scale=getattr(self, "grad_scale", None),  # set by a GradScaler (fp16)
                    found_inf=getattr(self, "found_inf", None))
        return loss


def _like(p: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """``t`` in ``p``'s memory layout (itself when it has it); zeros like ``p`` for None."""
    if t is None:
        return torch.zeros_like(p)
    return t if t.stride() == p.stride() else torch.empty_like(p).copy_(t)


def _dense_views(*tensors: torch.Tensor | None) -> tuple:
    """Tensors of one layout (a parameter, its gradient, its momentum buffer or None) as
    contiguous views of the same memory, permuted alike; unchanged when already contiguous or
    not dense (overlapping, or with gaps)."""
    t0 = tensors[0]
    order = sorted(range(t0.dim()), key=lambda i: -t0.stride(i))  # outermost dimension first
    if t0.is_contiguous() or not t0.permute(order).is_contiguous():
        return tensors
    return tuple(None if t is None else t.permute(order) for t in tensors)


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
    if s.CHECKPOINT_PERIOD < 0:
        raise ConfigError(f"SOLVER.CHECKPOINT_PERIOD {s.CHECKPOINT_PERIOD} must be >= 0 (epochs "
                          "between numbered checkpoints; 0: last.pth only)")
    if cfg.MODEL.METHOD == "moco" and cfg.MODEL.MOCO.K < s.BATCH_SIZE:
        raise ConfigError(f"MODEL.MOCO.K {cfg.MODEL.MOCO.K} is smaller than the global batch "
                          f"SOLVER.BATCH_SIZE {s.BATCH_SIZE}: the queue must hold one batch of keys")
    return s.BATCH_SIZE // world_size


def total_iterations(cfg, iters_per_epoch: int) -> int:
    """The run's iterations: ``SOLVER.EPOCHS`` epochs of ``iters_per_epoch`` (else
    ``SOLVER.MAX_ITER``), capped by ``SOLVER.MAX_ITER`` when that is set too."""
    s = cfg.SOLVER
    total = iters_per_epoch * s.EPOCHS if s.EPOCHS > 0 else s.MAX_ITER
    return min(total, s.MAX_ITER) if s.MAX_ITER > 0 else total


def base_lr(cfg) -> float:
    """``SOLVER.BASE_LR`` x ``SOLVER.BATCH_SIZE`` / 256."""
    return cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """:class:`SGD` or LARS over ``model.param_groups()``, every group at :func:`base_lr`.

    Both update all tensors of a group in a few multi-tensor kernels rather than one small kernel
    per tensor: SGD ``fused`` when the parameters live on CUDA or the CPU (the fewest kernels;
    the same numbers as the per-tensor loop), ``foreach`` elsewhere (see
    :func:`use_step_kernels`); LARS always with ``torch._foreach_*`` ops.
    """
    groups = unwrap(model).param_groups()
    kw = dict(lr=base_lr(cfg), momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    if cfg.SOLVER.OPTIMIZER == "lars":
        return LARS(groups, **kw)
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    params = [p for g in groups for p in g["params"]]
    return SGD(groups, **kw, **_sgd_kernels(params))


def _sgd_kernels(params) -> dict:
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)
    return {"fused": True, "foreach": False} if fused else {"fused": False, "foreach": True}


def use_step_kernels(optimizer: torch.optim.Optimizer) -> None:
    """Give every SGD group the kernels :func:`build_optimizer` built it with again:
    ``load_state_dict`` replaces them with those of the run that wrote the checkpoint (and a
    GradScaler treats an optimizer built fused differently)."""
    if isinstance(optimizer, torch.optim.SGD):
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        for g in optimizer.param_groups:
            g.update(fused=fused, foreach=not fused)


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
