"""The negative side of MoCo's FA term: a negative generator (``HardMix``, FA.OP hardmix) that
adds per-query negatives, and ``QueueMix`` (FA.QUEUE_MIX) that replaces the FA term's shared
negatives by mixes of queue entries. Neither is ever enqueued: the queue holds only keys."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..utils.registry import register_as
from .base import FA_REGISTRY, NegativeGenerator, draw


@register_as(FA_REGISTRY, "hardmix")
class HardMix(NegativeGenerator):
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

    def __init__(self, top_n: int = 1024, num: int = 512, query_num: int = 256):
        super().__init__()
        self.top_n, self.s, self.s_query = top_n, num, query_num

    @classmethod
    def from_config(cls, cfg, dim):
        fa = cfg.FA
        return {"top_n": fa.HARDMIX_TOPN, "num": fa.HARDMIX_NUM, "query_num": fa.HARDMIX_QUERY_NUM}

    @classmethod
    def check(cls, cfg, branch):
        fa, method = cfg.FA, cfg.MODEL.METHOD
        if not branch.HAS_NEGATIVES or fa.ROLE != "negative" or fa.POSITION != "projector":
            raise ConfigError(
                "FA.OP hardmix synthesises negatives from the queue: it needs MODEL.METHOD moco, "
                f"FA.ROLE negative and FA.POSITION projector (got {method}, {fa.ROLE}, "
                f"{fa.POSITION})"
            )
        if fa.HARDMIX_TOPN < 1 or fa.HARDMIX_NUM + fa.HARDMIX_QUERY_NUM < 1:
            raise ConfigError("FA.HARDMIX_TOPN must be >= 1 and FA.HARDMIX_NUM + "
                              "FA.HARDMIX_QUERY_NUM >= 1")

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
        """n_a·n_b [N, s] as a product and a sum over chunks of pairs: not an einsum, which runs
        as N·s tiny matrix products, and never the whole [N, s, D] at once."""
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
    """Negative interpolation in the queue (Feature Transformation, Zhu et al. ICCV 2021):
    the FA term's shared negatives.

        n̂_j = μ n_j + (1 − μ) n_π(j),   π a random permutation of the K entries,
        μ ~ Beta(α_n, α_n) once per batch,   α_n = FA.QUEUE_ALPHA (published: 1.6)

    No re-normalisation. Property: n̂ are convex mixes of two queue entries; the stored queue is
    unchanged (only the FA term sees n̂).
    """

    def __init__(self, alpha: float = 1.6):
        super().__init__()
        self.alpha = alpha

    @torch.no_grad()
    def forward(self, queue: torch.Tensor) -> torch.Tensor:
        mu = draw(self.alpha, 1, queue, "batch")  # [1, 1]
        perm = torch.randperm(queue.shape[0], device=queue.device)
        return mu * queue + (1 - mu) * queue.index_select(0, perm)  # [K, C]
