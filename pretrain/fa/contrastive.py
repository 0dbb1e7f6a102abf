"""MoCo's FA term: the InfoNCE of the augmented problem, from what MoCo hands it."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import info_nce, info_nce_from_logits
from .branch import FABranch
from .negatives import QueueMix
from .siamese import FA_ARCH_REGISTRY

ROLES = ("positive", "negative", "both")


class ContrastiveInputs(NamedTuple):
    """What MoCo has after its plain InfoNCE, all float32.

    ``q``, ``k`` [N, C] unit queries and their keys; ``queue`` [K, C] the negatives; ``T`` the
    temperature; ``logits`` [N, 1+K] the plain problem's [q·k⁺, q·queue] / T; ``h``, ``h_k``
    [N, F] the pooled trunk features of the query and key views; ``project`` the method's
    projector as a function [M, F] -> [M, C] (FA at POSITION backbone goes through it);
    ``online_key`` computes, when called, the query encoder's unit projection of the key view
    [N, C], with gradient (the target of ARCH parallel_predictor_grad; one more forward).
    """

    q: torch.Tensor
    k: torch.Tensor
    queue: torch.Tensor
    T: float
    logits: torch.Tensor
    h: torch.Tensor
    h_k: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    online_key: Callable[[], torch.Tensor] | None = None


class ContrastiveFA(FABranch):
    """MoCo's FA term L_fa, combined with the plain InfoNCE by ``combine``.

    negatives = the queue, or ``QueueMix``'s n̂ with ``queue_mix`` (FA.QUEUE_MIX).
    - ROLE positive: L_fa = InfoNCE(q̃, k̃⁺, negatives), q̃ = FA(q) (POSITION projector, with
      ``renorm`` L2-normalised again) or normalize(projector(FA(h))) (backbone); k̃⁺ = k⁺ unless
      the operator is two-sided. A mixing operator (``interpolate``) scores q̃ against the batch
      keys and the negatives with the soft target λ at its own key, 1 − λ at its partner's (i-Mix).
    - ROLE negative: L_fa = InfoNCE(q, k⁺, negatives ∪ {q̃ of the other images}); a negative
      generator's h join every query's negatives instead (MoCHi).
    - ROLE both: the mean of the two.
    - ARCH parallel_predictor (``target_side``): L_fa = InfoNCE(q, FA(k), negatives), the key
      augmented with q as its positive, the query plain (``siamese.ParallelPredictor``);
      ``parallel_predictor_grad`` (``target_grad``): the key is the online encoder's, with
      gradient, L_fa = InfoNCE(q1, FA(q2), negatives).
    Augmented features are never enqueued: MoCo enqueues only k.
    """

    HAS_NEGATIVES = True

    def __init__(self, op, *, role: str = "positive", renorm: bool = False,
                 queue_mix: QueueMix | None = None, target_side: bool = False,
                 target_grad: bool = False, **kw):
        super().__init__(op, **kw)
        self.role, self.renorm, self.queue_mix = role, renorm, queue_mix
        self.target_side, self.target_grad = target_side, target_grad

    @classmethod
    def from_config(cls, cfg, dim: int) -> dict:
        fa, arch = cfg.FA, FA_ARCH_REGISTRY.get(cfg.FA.ARCH)
        return dict(super().from_config(cfg, dim), role=fa.ROLE, renorm=fa.RENORM,
                    queue_mix=QueueMix(fa.QUEUE_ALPHA) if fa.QUEUE_MIX else None,
                    target_side=arch.TARGET_SIDE, target_grad=arch.TARGET_GRAD)

    @classmethod
    def check(cls, cfg) -> None:
        arch = FA_ARCH_REGISTRY.get(cfg.FA.ARCH)
        if not arch.CONTRASTIVE:
            raise ConfigError(f"FA.ARCH '{cfg.FA.ARCH}' needs a predictor; MODEL.METHOD "
                              f"{cfg.MODEL.METHOD} has none (use basic, parallel_predictor or "
                              "parallel_predictor_grad)")
        arch.check(cfg, cls)

    def forward(self, x: ContrastiveInputs) -> torch.Tensor:
        negatives = self.queue_mix(x.queue) if self.queue_mix is not None else x.queue
        # q·queue from the plain problem when the FA term scores the same negatives
        plain = x.logits[:, 1:] * x.T if self.queue_mix is None else None
        extra = [g.similarities(x.q, x.queue, plain) for g in self.generators]
        if self.augment is None:  # generated negatives only: ROLE negative (checked)
            return self._with_extra_negatives(x, negatives, extra)
        if self.target_side:
            return self._augmented_key_term(x, negatives)
        q_aug, k_aug, aug = self._augmented(x)
        terms = []
        if self.role in ("positive", "both"):
            terms.append(self._positive_term(x, negatives, q_aug, k_aug, aug))
        if self.role in ("negative", "both"):
            terms.append(info_nce(x.q, x.k, negatives, x.T, _other_images(x.q, q_aug))[0])
        return sum(terms) / len(terms)

    def _augmented(self, x: ContrastiveInputs):
        """q̃ [NUM*N, C], k̃⁺ [NUM*N, C] or None, and the operator's output."""
        aug, q_aug = self.at_position(x.h, x.h_k, x.q, x.k, x.project)
        if self.position == "backbone":  # the key side of a two-sided operator is not used
            return F.normalize(q_aug.float(), dim=1), None, aug
        k_aug = aug.positive
        if self.renorm:
            q_aug = F.normalize(q_aug, dim=1)
            k_aug = None if k_aug is None else F.normalize(k_aug, dim=1)
        return q_aug, k_aug, aug

    def _augmented_key_term(self, x: ContrastiveInputs, negatives) -> torch.Tensor:
        """InfoNCE(q, FA(k), negatives), q repeated for the NUM copies of the key (k: the online
        encoder's with ``target_grad``)."""
        aug = self.augment(x.online_key() if self.target_grad else x.k, x.q)
        k_aug = F.normalize(aug.z, dim=1) if self.renorm else aug.z  # [NUM*N, C]
        num = k_aug.shape[0] // x.q.shape[0]
        return info_nce(x.q.repeat(num, 1), k_aug, negatives, x.T)[0]

    @staticmethod
    def _positive_term(x: ContrastiveInputs, negatives, q_aug, k_aug, aug) -> torch.Tensor:
        num = q_aug.shape[0] // x.q.shape[0]
        if aug.partner is None:
            return info_nce(q_aug, k_aug if k_aug is not None else x.k.repeat(num, 1),
                            negatives, x.T)[0]
        # soft target over the batch keys (i-Mix): λ at the own key, 1 − λ at the partner's
        n, rows = x.q.shape[0], torch.arange(q_aug.shape[0], device=x.q.device)
        own = torch.arange(n, device=x.q.device).repeat(num)  # [NUM*N]
        targets = torch.zeros(q_aug.shape[0], n, device=x.q.device)
        targets[rows, own] += aug.lam.float()
        targets[rows, aug.partner] += 1 - aug.lam.float()
        return info_nce(q_aug, x.k, negatives, x.T, targets=targets)[0]

    @staticmethod
    def _with_extra_negatives(x: ContrastiveInputs, negatives, extra) -> torch.Tensor:
        """InfoNCE(q, k⁺, negatives ∪ {h}); with the plain negatives it reuses the plain
        problem's products: [q·k⁺, q·n, q·h] / T."""
        extra = torch.cat(extra, dim=1)  # [N, E]
        if negatives is x.queue:
            return info_nce_from_logits(torch.cat([x.logits, extra / x.T], dim=1))
        return info_nce(x.q, x.k, negatives, x.T, extra)[0]


def _other_images(q: torch.Tensor, q_aug: torch.Tensor) -> torch.Tensor:
    """q·q̃ for augmented queries of *other* images [N, NUM*N]; own-image entries are ``-inf``."""
    n = q.shape[0]
    sim = torch.einsum("nc,mc->nm", q, q_aug)  # [N, NUM*N]
    rows = torch.arange(n, device=q.device)
    source = torch.arange(q_aug.shape[0], device=q.device) % n  # image of each augmented row
    return sim.masked_fill(rows[:, None] == source[None, :], float("-inf"))
