"""Projector and predictor MLPs with the published shapes.

Every head is ``mlp(...)``: ``num_layers - 1`` hidden blocks ``Linear -> [BN] -> ReLU`` and a last
``Linear -> [BN without affine]``. A Linear followed by BN has no bias (BN's shift replaces it).

| head                 | shape (R50)                          | BN                  |
|----------------------|--------------------------------------|---------------------|
| MoCo v2 projector    | 2048 -> 2048 -> 128                  | none                |
| SimSiam projector    | 2048 -> 2048 -> 2048 -> 2048         | hidden + last       |
| SimSiam predictor    | 2048 -> 512 -> 2048                  | hidden              |
| BYOL projector       | 2048 -> 4096 -> 256                  | hidden              |
| BYOL predictor       | 256 -> 4096 -> 256                   | hidden              |
"""

from __future__ import annotations

import torch.nn as nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    hidden_bn: bool = True,
    last_bn: bool = False,
) -> nn.Sequential:
    """``in_dim -> hidden_dim (x num_layers-1) -> out_dim``; see the module docstring."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not hidden_bn))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def moco_projector(in_dim: int, hidden_dim: int, out_dim: int, use_mlp: bool = True) -> nn.Module:
    """MoCo v2: ``Linear-ReLU-Linear`` without BN; MoCo v1 (``use_mlp=False``): one Linear."""
    if not use_mlp:
        return nn.Linear(in_dim, out_dim)
    return mlp(in_dim, hidden_dim, out_dim, num_layers=2, hidden_bn=False)


def simsiam_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """SimSiam: three layers, BN on every output, the last BN without affine."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers=3, hidden_bn=True, last_bn=True)


def simsiam_predictor(dim: int, hidden_dim: int) -> nn.Sequential:
    """SimSiam: bottleneck ``dim -> hidden_dim -> dim``, BN on the hidden layer only."""
    return mlp(dim, hidden_dim, dim, num_layers=2, hidden_bn=True)


def byol_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL projector and predictor: ``Linear-BN-ReLU-Linear``."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers=2, hidden_bn=True)
