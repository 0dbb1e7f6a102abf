"""The collapse monitor of Siamese methods (Chen & He 2021, "Exploring Simple Siamese
Representation Learning", Sec. 4.1): the spread of the ℓ2-normalised projector output.

    std(z) = (1/d) Σ_c std_i (z_i / ‖z_i‖)_c      (std over the batch, per channel)

Property: for z with i.i.d. zero-mean Gaussian entries it is ≈ 1/√d; a collapsed output (every
z_i the same direction) gives 0. The methods log it as ``z_std`` (metrics.jsonl) for the view-1
projector output (MoCo: the query q).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """std(z) above for z [N, d] (N ≥ 2), a 0-dim float32 tensor on z's device."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
