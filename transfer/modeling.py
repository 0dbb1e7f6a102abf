"""Model parts registered with Detectron2.

Importing this module registers them; ``transfer.config`` / ``transfer.trainer`` import it.
"""

from __future__ import annotations

from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

__all__ = ["Res5ROIHeadsExtraNorm"]


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """C4 ROI heads with a normalization layer after res5 (the MoCo detection protocol).

    In a C4 model the res5 stage runs per region, and its output feeds the box predictor
    directly. Backbones pretrained with BN end res5 in a residual sum that is never normalized,
    so the protocol appends ``cfg.MODEL.RESNETS.NORM`` (e.g. SyncBN) over res5's output
    channels. The layer is ``res5.norm`` and starts from identity statistics; converted
    checkpoints do not contain it.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels
