"""The two kinds of FA operator, their registry and the random draws they share.

- A **feature operator** (``FeatureOp``) augments features:
  ``forward(z [N, D], positive [N, D] | None) -> Augmented`` (one copy per call).
- A **negative generator** (``NegativeGenerator``) makes extra negatives for each query:
  ``forward(q [N, C], negatives [K, C]) -> h [N, E, C]``, and ``similarities`` gives q·h
  [N, E], what InfoNCE needs (a generator may compute it without building h).

Both are built from a config by ``build_op(cfg, dim)`` = ``cls(**cls.from_config(cfg, dim))``
(Detectron2's ``from_config`` pattern: explicit constructor arguments, usable without a config),
and say which settings they need in ``check(cfg, branch)``, next to their formula.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..utils.registry import Registry, lookup

FA_REGISTRY = Registry("FA_OP")
FA_REGISTRY.__doc__ = ("Feature-augmentation operators (feature operators and negative generators), "
                       "by FA.OP name; built by ``build_op(cfg, dim)``.")


class Augmented(NamedTuple):
    """A feature operator's output. ``z`` [M, D] the augmented features; ``positive`` [M, D]
    augmented positives (two-sided operators) or None; ``partner`` [M] the sample mixed into each
    row and ``lam`` [M] the row's own share (mixing operators: soft targets), else None."""

    z: torch.Tensor
    positive: torch.Tensor | None = None
    partner: torch.Tensor | None = None
    lam: torch.Tensor | None = None


class _Operator(nn.Module):
    """What both kinds share: ``from_config``, ``check`` and ``LEARNED`` (the operator has
    parameters that the FA term trains through its output)."""

    LEARNED = False

    @classmethod
    def from_config(cls, cfg, dim: int) -> dict:
        """The constructor's keyword arguments from ``cfg.FA`` (``dim``: the feature width)."""
        return {}

    @classmethod
    def check(cls, cfg, branch: type) -> None:
        """Raise ConfigError when ``cfg`` (FA on, in the wiring ``branch``) cannot use this
        operator; ``branch`` is the method's FA class (``ContrastiveFA`` or ``PredictorFA``)."""


class FeatureOp(_Operator):
    """Base class of feature operators: ``forward(z [N, D], positive [N, D] | None) ->
    Augmented``. ``positive`` is the other view's feature from the network that provides the
    targets (a constant)."""


class NegativeGenerator(_Operator):
    """Base class of negative generators: ``forward(q [N, C], negatives [K, C]) -> [N, E, C]``
    extra negatives per query (detached, never enqueued)."""

    def similarities(self, q: torch.Tensor, negatives: torch.Tensor,
                     sim: torch.Tensor | None = None) -> torch.Tensor:
        """q·h [N, E] for the h of ``forward`` (gradient in q only); ``sim`` [N, K] = q·negatives
        when the caller has it. Subclasses may compute it without building h."""
        return torch.einsum("nc,nec->ne", q, self(q.detach(), negatives))  # [N, E]


def build_op(cfg, dim: int) -> FeatureOp | NegativeGenerator:
    """The FA.OP operator for features of width ``dim``."""
    cls = lookup(FA_REGISTRY, cfg.FA.OP, "FA.OP")
    return cls(**cls.from_config(cfg, dim))


def beta(alpha: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """``n`` samples of Beta(alpha, alpha), shaped [n, 1], on ``like``'s device and dtype."""
    a = torch.full((n, 1), float(alpha), device=like.device)
    # validate_args=False: argument checks would synchronise with the GPU on every call
    return torch.distributions.Beta(a, a, validate_args=False).sample().to(like.dtype)


def draw(alpha: float, n: int, like: torch.Tensor, per: str) -> torch.Tensor:
    """Beta(alpha, alpha) per sample [n, 1], or one draw for the batch broadcast to [n, 1]."""
    return beta(alpha, n, like) if per == "sample" else beta(alpha, 1, like).expand(n, 1)
