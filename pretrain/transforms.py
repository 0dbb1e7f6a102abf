"""The two-view augmentation pipelines on ``uint8`` images, and their normalisation.

A view is a ``Compose`` of the operations in ``pretrain.view_ops`` (their pixel work is
``pretrain.pixel_ops``, OpenCV kernels); the views take an RGB ``uint8`` array [H, W, 3] and a
``random.Random`` and end with a [3, H, W] ``uint8`` tensor. Normalization (ImageNet mean/std)
is the last step, done on the batch by ``normalize`` — on the accelerator in the engine, so
loader workers ship 4x fewer bytes.

Pipelines (``DA.*``):
- MoCo v2 (``DA.SYMMETRIC True``, both views): RandomResizedCrop(scale=(DA.MIN_SCALE, 1)),
  ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur p=0.5, flip.
- BYOL (``DA.SYMMETRIC False``): RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
  grayscale p=0.2, then blur p=1.0 / 0.1 and solarize p=0.0 / 0.2 for view 1 / view 2.
- ``DA.STRENGTH weak``: RandomResizedCrop and flip only, for both views.
Blur sigma is drawn from [0.1, 2.0] for a 224-px crop and scales with ``DATA.IMAGE_SIZE``
(the kernel stays 10% of the image as in SimCLR/MoCo v2).

``build_pretrain_transform(cfg, split=True)`` gives the views' loader-worker half instead
(``pretrain.split_view``), for ``pretrain.device_aug.augment`` to finish on the accelerator.

The public names of ``pretrain.pixel_ops``, ``pretrain.view_ops`` and ``pretrain.split_view``
are re-exported here, so a caller takes every augmentation name from this one module.
"""

from __future__ import annotations

import functools

import torch

from .pixel_ops import (
    JITTER_OPS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    gaussian_blur,
    resized_crop,
    solarize,
    to_grayscale,
)
from .split_view import FACTORS, ORDER, PARAMS, P, SplitTwoViews, SplitView, apply_photometric
from .view_ops import (
    ColorJitter,
    Compose,
    GaussianBlur,
    Grayscale,
    HorizontalFlip,
    RandomApply,
    RandomResizedCrop,
    ResizeCenterCrop,
    Solarize,
    ToTensor,
    TwoViews,
)

__all__ = [
    "FACTORS", "IMAGENET_MEAN", "IMAGENET_STD", "JITTER_OPS", "ORDER", "PARAMS", "P",
    "ColorJitter", "Compose", "GaussianBlur", "Grayscale", "HorizontalFlip", "RandomApply",
    "RandomResizedCrop", "ResizeCenterCrop", "Solarize", "SplitTwoViews", "SplitView", "ToTensor",
    "TwoViews", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
    "apply_photometric", "build_eval_transform", "build_pretrain_transform",
    "build_train_transform", "byol_views", "color_jitter", "gaussian_blur", "moco_v2_view",
    "normalize", "resized_crop", "solarize", "to_grayscale",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- normalisation
@functools.lru_cache(maxsize=16)
def _affine(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device).view(3, 1, 1)
    return scale, shift


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [N, 3, H, W] (or [3, H, W]) -> float32 (x / 255 - mean) / std, memory format kept."""
    scale, shift = _affine(x.device, tuple(mean), tuple(std))
    return x.float().mul_(scale).add_(shift)


# ----------------------------------------------------------------------------- pipelines
def _view(size: int, min_scale: float, strength: str, jitter: tuple, blur_p: float,
          solarize_p: float) -> Compose:
    ops = [RandomResizedCrop(size, scale=(min_scale, 1.0))]
    if strength == "strong":
        sigma = (0.1 * size / 224, 2.0 * size / 224)
        ops += [RandomApply(ColorJitter(*jitter), 0.8), RandomApply(Grayscale(), 0.2)]
        if blur_p > 0:
            ops.append(RandomApply(GaussianBlur(sigma), blur_p))
        if solarize_p > 0:
            ops.append(RandomApply(Solarize(), solarize_p))
    elif strength != "weak":
        raise ValueError(f"DA.STRENGTH {strength!r} unknown; choose weak or strong")
    ops += [HorizontalFlip(), ToTensor()]
    return Compose(ops)


def moco_v2_view(size: int = 224, min_scale: float = 0.2, strength: str = "strong") -> Compose:
    """One MoCo v2 view (both of its views are alike)."""
    return _view(size, min_scale, strength, (0.4, 0.4, 0.4, 0.1), 0.5, 0.0)


def byol_views(size: int = 224, min_scale: float = 0.08, strength: str = "strong") -> TwoViews:
    """BYOL's two views: always blurred and never solarized / rarely blurred, sometimes
    solarized."""
    jitter = (0.4, 0.4, 0.2, 0.1)
    return TwoViews(_view(size, min_scale, strength, jitter, 1.0, 0.0),
                    _view(size, min_scale, strength, jitter, 0.1, 0.2))


def build_pretrain_transform(cfg, split: bool = False) -> TwoViews | SplitTwoViews:
    """The two-view pipeline of ``cfg.DA`` at ``cfg.DATA.IMAGE_SIZE``.

    ``split``: its worker half instead (``SplitTwoViews``: crops and parameter vectors), for
    ``pretrain.device_aug.augment`` to finish on the accelerator.
    """
    size, scale, strength = cfg.DATA.IMAGE_SIZE, cfg.DA.MIN_SCALE, cfg.DA.STRENGTH
    if cfg.DA.SYMMETRIC:
        view = moco_v2_view(size, scale, strength)
        views = TwoViews(view, view)
    else:
        views = byol_views(size, scale, strength)
    return SplitTwoViews(views.view1, views.view2) if split else views


def build_eval_transform(size: int) -> Compose:
    """Evaluation view (kNN monitor, linear probe): resize, centre crop, no randomness."""
    return Compose([ResizeCenterCrop(size), ToTensor()])


def build_train_transform(size: int) -> Compose:
    """Linear-probe training view: RandomResizedCrop(0.08, 1) and flip."""
    return Compose([RandomResizedCrop(size), HorizontalFlip(), ToTensor()])
