"""SimSiam (Chen & He 2021) with feature augmentation.

Both views go through one encoder f (trunk + 3-layer projector) and the predictor h:
z_i = f(x_i), p_i = h(z_i). Loss, with stop-gradient on the targets:

    L = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)),   D(p, z) = − (p / ‖p‖) · (z / ‖z‖)

FA (see ``pretrain/fa/``): ``PredictorFA`` turns each view into augmented predictions p̃_i
(FA.ARCH / FA.POSITION), paired with the other view's target; the positive z⁺ of view 1 is view 2's
own feature (SimSiam is its own target network). ``loss_fa = ½ D(p̃1, sg(z2)) + ½ D(p̃2, sg(z1))``
over the FA.NUM copies (soft or augmented targets where the operator makes them), combined with
``loss_ssl`` by FA.LOSS_MODE.
"""

from __future__ import annotations

import torch

from .backbone import build_backbone
from .build import METHOD_REGISTRY, SSLMethod
from .collapse import normalized_std
from .fa import PredictorFA, SiameseInputs, SiameseView, build_fa, fa_dim
from .heads import simsiam_predictor, simsiam_projector
from .losses import negative_cosine
from .utils.amp import float32
from .utils.registry import register_as


@register_as(METHOD_REGISTRY, "simsiam")
class SimSiam(SSLMethod):
    """SimSiam + FA. Predictor (and the FA branch's own predictor) form the ``fix_lr`` group."""

    FA_BRANCH = PredictorFA

    def __init__(self, cfg):
        super().__init__(cfg)
        mc = cfg.MODEL
        self.fix_pred_lr = cfg.SOLVER.FIX_PRED_LR

        self.backbone = build_backbone(mc.BACKBONE, mc.STEM, mc.ZERO_INIT_RESIDUAL)
        feat_dim = self.backbone.feat_dim
        dim, pred_hidden = mc.PROJ_DIM or 2048, mc.PRED_HIDDEN_DIM or 512
        self.projector = simsiam_projector(feat_dim, mc.PROJ_HIDDEN_DIM or feat_dim, dim)
        self.predictor = simsiam_predictor(dim, pred_hidden)
        if cfg.FA.ENABLED:
            make_predictor = lambda: simsiam_predictor(dim, pred_hidden)  # noqa: E731
            self.fa = build_fa(cfg, PredictorFA, fa_dim(cfg, feat_dim, dim),
                               make_predictor=make_predictor)

    def param_groups(self) -> list[dict]:
        pred = list(self.predictor.parameters())
        if self.fa is not None and self.fa.predictor is not None:
            pred += list(self.fa.predictor.parameters())
        in_pred = {id(p) for p in pred}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_pred]
        return [{"params": rest}, {"params": pred, "fix_lr": self.fix_pred_lr}]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        h1, h2 = self.backbone(x1), self.backbone(x2)  # [N, F]
        z1, z2 = self.projector(h1), self.projector(h2)  # [N, C]
        p1, p2 = self.predictor(z1), self.predictor(z2)  # [N, C]
        if self.fa_active():  # p̃ of each view, paired with the other view's target
            v1 = SiameseView(h1, z1, p1, h2.detach(), z2.detach(), z2.detach())
            v2 = SiameseView(h2, z2, p2, h1.detach(), z1.detach(), z1.detach())
            pairs = self.fa(SiameseInputs((v1, v2), self.projector, self.predictor))

        with float32(x1):
            loss_ssl = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
            out = {"loss_ssl": loss_ssl, "loss": loss_ssl, "z_std": normalized_std(z1)}
            if self.fa_active():
                out["loss_fa"] = 0.5 * sum(negative_cosine(*pair) for pair in pairs)
                out["loss"] = self.fa.combine(loss_ssl, out["loss_fa"])
        return out
