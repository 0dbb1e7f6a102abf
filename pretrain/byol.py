"""BYOL (Grill et al. 2020) with feature augmentation.

Online network θ: trunk -> projector -> predictor gives p_i; target network ξ (an EMA copy of the
online trunk + projector, no gradient) gives z'_i. Loss, symmetrised as in the paper (a sum):

    L = ℓ(p1, z'2) + ℓ(p2, z'1),   ℓ(p, z') = ‖p/‖p‖ − z'/‖z'‖‖² = 2 − 2 cos(p, z')

After every optimizer step (``after_step``): ξ ← τ ξ + (1 − τ) θ with
τ = 1 − (1 − τ_base)(cos(π k/K) + 1)/2, τ_base = MODEL.BYOL.BASE_MOMENTUM, k/K = progress.

FA (see ``pretrain/fa/``): ``PredictorFA`` gives augmented predictions p̃_i paired with the
other view's target z'; the positive z⁺ is the target network's feature of the other view.
``loss_fa = ℓ(p̃1, z'2) + ℓ(p̃2, z'1)`` over the FA.NUM copies (soft or augmented targets where
the operator makes them), combined with ``loss_ssl`` by FA.LOSS_MODE.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .backbone import build_backbone
from .build import METHOD_REGISTRY, SSLMethod
from .collapse import normalized_std
from .fa import PredictorFA, SiameseInputs, SiameseView, build_fa, fa_dim
from .heads import byol_mlp
from .losses import regression_loss
from .momentum import cosine_momentum, ema_update_
from .utils.amp import float32
from .utils.registry import register_as


@register_as(METHOD_REGISTRY, "byol")
class BYOL(SSLMethod):
    """BYOL + FA. ``param_groups`` puts biases and BN parameters in a group without weight decay
    and marked ``lars_exclude`` (the paper excludes them from both weight decay and LARS)."""

    FA_BRANCH = PredictorFA

    def __init__(self, cfg):
        super().__init__(cfg)
        mc = cfg.MODEL
        self.base_momentum = self.momentum = mc.BYOL.BASE_MOMENTUM

        self.backbone = build_backbone(mc.BACKBONE, mc.STEM, mc.ZERO_INIT_RESIDUAL)
        feat_dim = self.backbone.feat_dim
        dim, pred_hidden = mc.PROJ_DIM or 256, mc.PRED_HIDDEN_DIM or 4096
        self.projector = byol_mlp(feat_dim, mc.PROJ_HIDDEN_DIM or 4096, dim)
        self.predictor = byol_mlp(dim, pred_hidden, dim)
        self.backbone_t = copy.deepcopy(self.backbone)
        self.projector_t = copy.deepcopy(self.projector)
        for p in self._target_params():
            p.requires_grad_(False)

        if cfg.FA.ENABLED:
            make_predictor = lambda: byol_mlp(dim, pred_hidden, dim)  # noqa: E731
            self.fa = build_fa(cfg, PredictorFA, fa_dim(cfg, feat_dim, dim),
                               make_predictor=make_predictor)

    def param_groups(self) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim > 1]},
            {
                "params": [p for p in params if p.ndim <= 1],
                "weight_decay": 0.0,
                "lars_exclude": True,
            },
        ]

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """ξ ← τ ξ + (1 − τ) θ, with τ from the cosine schedule at ``progress``."""
        self.momentum = cosine_momentum(self.base_momentum, progress)
        ema_update_(self._target_params(), self._online_params(), self.momentum)

    def _online_params(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def _target_params(self) -> list[nn.Parameter]:
        return list(self.backbone_t.parameters()) + list(self.projector_t.parameters())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        h1, h2 = self.backbone(x1), self.backbone(x2)  # [N, F]
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, C]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [N, C]
        with torch.no_grad():
            ht1, ht2 = self.backbone_t(x1), self.backbone_t(x2)  # [N, F]
            zt1, zt2 = self.projector_t(ht1), self.projector_t(ht2)  # [N, C]
        if self.fa_active():  # p̃ of each view, paired with the other view's target
            pairs = self.fa(SiameseInputs((SiameseView(h1, z1, p1, ht2, zt2, zt2),
                                           SiameseView(h2, z2, p2, ht1, zt1, zt1)),
                                          self.projector, self.predictor))

        with float32(x1):
            loss_ssl = regression_loss(p1, zt2) + regression_loss(p2, zt1)
            out = {"loss_ssl": loss_ssl, "loss": loss_ssl, "z_std": normalized_std(z1)}
            if self.fa_active():
                out["loss_fa"] = sum(regression_loss(*pair) for pair in pairs)
                out["loss"] = self.fa.combine(loss_ssl, out["loss_fa"])
        return out
