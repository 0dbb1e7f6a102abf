"""ResNet trunks for pretraining, with torchvision's parameter names.

The trunk is a plain torchvision ResNet whose ``fc`` is ``nn.Identity()``, so ``forward`` returns
the globally pooled feature ``[N, C]`` and ``state_dict()`` is, key for key, torchvision's
without ``fc.*`` — exactly the checkpoint's ``backbone`` entry (``pretrain/checkpoint.py``).
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

from .errors import ConfigError

BACKBONES = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
STEMS = ("imagenet", "cifar")


def build_backbone(
    name: str, stem: str = "imagenet", zero_init_residual: bool = False
) -> nn.Module:
    """A randomly initialised torchvision ResNet trunk with attribute ``feat_dim`` (C).

    ``stem="imagenet"``: torchvision's 7x7/2 conv1 + 3x3/2 max-pool.
    ``stem="cifar"``: 3x3/1 conv1 and no max-pool, for tiny images (Detectron2 cannot use it).
    ``zero_init_residual``: the last BN of every residual branch starts at zero.
    """
    if name not in BACKBONES:
        raise ConfigError(f"MODEL.BACKBONE '{name}' is not one of: {', '.join(BACKBONES)}")
    if stem not in STEMS:
        raise ConfigError(f"MODEL.STEM '{stem}' is not one of: {', '.join(STEMS)}")
    net = BACKBONES[name](weights=None, zero_init_residual=zero_init_residual)
    net.feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    if stem == "cifar":
        net.conv1 = nn.Conv2d(
            3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net
