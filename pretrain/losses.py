"""The self-supervised losses, as pure functions of [N, D] features (float32 inside).

- ``info_nce``: MoCo's contrastive loss (van den Oord et al. 2018; He et al. 2020), optionally
  with extra per-query negatives and with soft targets (i-Mix, Lee et al. 2021).
- ``negative_cosine``: SimSiam's D(p, sg(z)) (Chen & He 2021).
- ``regression_loss``: BYOL's normalised MSE (Grill et al. 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    T: float,
    extra: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE, averaged over the batch; the positive is logit 0.

        L = − log [ exp(q·k⁺/T) / (exp(q·k⁺/T) + Σ_j exp(q·n_j/T)) ]

    q: [N, C] queries; k: [N, C] their positives (logit 0) or, with ``targets``, [B, C] candidate
    keys every query is scored against; queue: [K, C] negatives; extra: [N, M] similarities to
    extra per-query negatives (``-inf`` masks an entry). ``targets`` [N, B]: a soft target over
    the B keys (rows sum to 1), L = − Σ_b t_b log softmax_b. Returns (loss, logits).
    """
    if targets is None:
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1)  # [N, 1]
    else:
        l_pos = torch.einsum("nc,bc->nb", q, k)  # [N, B]
    l_neg = torch.einsum("nc,kc->nk", q, queue)  # [N, K]
    logits = torch.cat([l_pos, l_neg] + ([extra] if extra is not None else []), dim=1) / T
    if targets is None:
        return info_nce_from_logits(logits), logits
    soft = F.pad(targets, (0, logits.shape[1] - targets.shape[1]))  # [N, B+K(+M)]
    return -(soft * F.log_softmax(logits, dim=1)).sum(1).mean(), logits


def info_nce_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE of logits [N, 1 + M] already divided by T, the positive first: the mean over
    rows of − log softmax(logits)_0 (for a caller that reuses the plain problem's logits)."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def _mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return (per_sample if weight is None else weight * per_sample).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None,
                    target_grad: bool = False) -> torch.Tensor:
    """D(p, sg(z)) = − mean_i w_i cos(p_i, z_i) (w = 1 by default); z gets no gradient unless
    ``target_grad`` (FA.ARCH parallel_predictor_grad; SimSiam's D always stops it).
    p, z: [N, C]; weight: [N]."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize((z if target_grad else z.detach()).float(), dim=1)
    return _mean(-torch.einsum("nc,nc->n", p, z), weight)  # [N] -> scalar


def regression_loss(p: torch.Tensor, z: torch.Tensor, weight: torch.Tensor | None = None,
                    target_grad: bool = False) -> torch.Tensor:
    """mean_i w_i ‖p_i/‖p_i‖ − z_i/‖z_i‖‖² = mean_i w_i (2 − 2 cos(p_i, z_i)); z gets no
    gradient unless ``target_grad`` (FA.ARCH parallel_predictor_grad; BYOL's loss always stops
    it). p, z: [N, C]; weight: [N]."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize((z if target_grad else z.detach()).float(), dim=1)
    return _mean(2 - 2 * torch.einsum("nc,nc->n", p, z), weight)  # [N] -> scalar
