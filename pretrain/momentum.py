"""Momentum (EMA) networks: the one update rule MoCo's key encoder and BYOL's target share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


@torch.no_grad()
def ema_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], m: float) -> None:
    """θ_t ← m θ_t + (1 − m) θ_o for every pair, in place (two fused ``foreach`` calls)."""
    target = list(target)
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, list(online), alpha=1 - m)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's schedule τ = 1 − (1 − τ_base)(cos(π·progress) + 1)/2: τ_base at the start, 1 at
    the end (Grill et al. 2020, "Bootstrap Your Own Latent", §3.2)."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
