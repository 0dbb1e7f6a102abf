"""Tiny pretraining models for the method and FA tests."""

from __future__ import annotations

import torch

from pretrain.build import build_model
from pretrain.config import get_cfg


def tiny_cfg(method: str = "moco", **fa):
    """ResNet-18, small heads, K=16; ``fa`` keys (lower-case) switch FA on unless ``enabled``
    is given."""
    cfg = get_cfg()
    cfg.MODEL.METHOD = method
    cfg.MODEL.BACKBONE = "resnet18"
    cfg.MODEL.PROJ_HIDDEN_DIM, cfg.MODEL.PROJ_DIM, cfg.MODEL.PRED_HIDDEN_DIM = 64, 32, 16
    cfg.MODEL.MOCO.K = 16
    cfg.FA.GEN_HIDDEN_DIM, cfg.FA.GEN_NOISE_DIM = 16, 4
    cfg.FA.HARDMIX_TOPN, cfg.FA.HARDMIX_NUM, cfg.FA.HARDMIX_QUERY_NUM = 4, 3, 3
    for key, value in fa.items():
        cfg.FA[key.upper()] = value
    if fa and "enabled" not in fa:
        cfg.FA.ENABLED = True
    return cfg


def head_tol(cfg) -> float:
    """Relative rounding of the methods' float32 loss head: its sums have at most PROJ_DIM
    (dot products) + 1 + K (+ the hardmix negatives) (log-sum-exp) terms, each sum off by at most
    that many float32 eps; the backward through it is linear in them."""
    n = cfg.MODEL.PROJ_DIM + 1 + cfg.MODEL.MOCO.K
    if cfg.FA.ENABLED and cfg.FA.OP == "hardmix":
        n += cfg.FA.HARDMIX_NUM + cfg.FA.HARDMIX_QUERY_NUM
    return n * torch.finfo(torch.float32).eps


def build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


def views(n: int = 4, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)
