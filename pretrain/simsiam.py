"""SimSiam (Chen & He 2021) with feature augmentation.

Both views go through one encoder f (trunk + 3-layer projector) and the predictor h:
z_i = f(x_i), p_i = h(z_i). Loss, with stop-gradient on the targets:

    L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)),   D(p, z) = − (p / ‖p‖) · (z / ‖z‖)

FA (see ``pretrain/fa.py``): ``PredictorFA`` turns each view into augmented predictions p̃_i
(FA.ARCH / FA.POSITION), paired with the other view's target; the positive z⁺ of view 1 is view 2's
own feature (SimSiam is its own target network). ``loss_fa = ½ D(p̃1, sg(z2)) + ½ D(p̃2, sg(z1))``
over the FA.NUM copies and ``loss = loss_ssl + w·loss_fa``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import build_backbone
from .build import METHOD_REGISTRY
from .fa import PredictorFA, fa_dim
from .heads import simsiam_predictor, simsiam_projector
from .utils.amp import float32
from .utils.registry import register_as


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, sg(z)) = − mean_i cos(p_i, z_i), in float32; z gets no gradient. p, z: [N, C]."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return -torch.einsum("nc,nc->n", p, z).mean()  # [N] -> scalar


@register_as(METHOD_REGISTRY, "simsiam")
class SimSiam(nn.Module):
    """SimSiam + FA. Predictor (and the FA branch's own predictor) form the ``fix_lr`` group."""

    def __init__(self, cfg):
        super().__init__()
        mc = cfg.MODEL
        self._arch = {"name": mc.BACKBONE, "stem": mc.STEM}
        self.fix_pred_lr = cfg.SOLVER.FIX_PRED_LR

        self.backbone = build_backbone(mc.BACKBONE, mc.STEM, mc.ZERO_INIT_RESIDUAL)
        feat_dim = self.backbone.feat_dim
        dim, pred_hidden = mc.PROJ_DIM or 2048, mc.PRED_HIDDEN_DIM or 512
        self.projector = simsiam_projector(feat_dim, mc.PROJ_HIDDEN_DIM or feat_dim, dim)
        self.predictor = simsiam_predictor(dim, pred_hidden)

        fa = cfg.FA
        self.fa = None
        if fa.ENABLED:
            make_predictor = lambda: simsiam_predictor(dim, pred_hidden)  # noqa: E731
            self.fa = PredictorFA(cfg, fa_dim(cfg, feat_dim, dim), make_predictor)
        self.fa_weight = fa.LOSS_WEIGHT

    def backbone_spec(self) -> dict:
        return dict(self._arch)

    def param_groups(self) -> list[dict]:
        pred = list(self.predictor.parameters())
        if self.fa is not None and self.fa.predictor is not None:
            pred += list(self.fa.predictor.parameters())
        in_pred = {id(p) for p in pred}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_pred]
        return [{"params": rest}, {"params": pred, "fix_lr": self.fix_pred_lr}]

    def after_step(self, progress: float) -> None:
        """No-op: SimSiam has no momentum network."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        h1, h2 = self.backbone(x1), self.backbone(x2)  # [N, F]
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, C]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [N, C]
        if self.fa is not None:
            branch = (self.projector, self.predictor)
            p1_aug = self.fa((h1, z1, p1), (h2.detach(), z2.detach()), *branch)  # p̃1 [NUM*N, C]
            p2_aug = self.fa((h2, z2, p2), (h1.detach(), z1.detach()), *branch)  # p̃2 [NUM*N, C]

        with float32(x1):
            loss = loss_ssl = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
            out = {"loss_ssl": loss_ssl}
            if self.fa is not None:
                num = p1_aug.shape[0] // z1.shape[0]
                loss_fa = 0.5 * (negative_cosine(p1_aug, z2.repeat(num, 1))
                                 + negative_cosine(p2_aug, z1.repeat(num, 1)))
                out["loss_fa"] = loss_fa
                loss = loss + self.fa_weight * loss_fa
        out["loss"] = loss
        return out
