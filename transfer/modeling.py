"""Model parts registered with Detectron2.

Importing this module registers them; ``transfer.config`` / ``transfer.trainer`` import it.
"""

from __future__ import annotations

from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

from pretrain.errors import ConfigError

__all__ = ["Res5ROIHeadsExtraNorm"]


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """C4 ROI heads with a normalization layer after res5 (the MoCo detection protocol).

    In a C4 model the res5 stage runs per region, and its output feeds the box predictor
    directly. Backbones pretrained with BN end res5 in a residual sum that is never normalized,
    so the protocol appends ``cfg.MODEL.RESNETS.NORM`` (e.g. SyncBN) over res5's output
    channels. The layer is ``res5.norm`` and starts from identity statistics; converted
    checkpoints do not contain it.

    Built on Detectron2's public construction only: ``Res5ROIHeads.from_config`` makes the
    arguments, ``__init__`` receives ``res5`` (an ``nn.Sequential`` of ResNet blocks) and this
    class appends the norm sized by the last block's ``out_channels``.
    """

    @configurable
    def __init__(self, *, res5_norm: str, **kwargs):
        super().__init__(**kwargs)
        norm = get_norm(res5_norm, self.res5[-1].out_channels)
        if norm is None:
            raise ConfigError(
                "MODEL.ROI_HEADS.NAME Res5ROIHeadsExtraNorm needs a MODEL.RESNETS.NORM (got '')"
            )
        self.res5.add_module("norm", norm)

    @classmethod
    def from_config(cls, cfg, input_shape):
        return {**super().from_config(cfg, input_shape), "res5_norm": cfg.MODEL.RESNETS.NORM}
