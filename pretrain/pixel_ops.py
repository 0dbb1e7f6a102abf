"""The pixel kernels of the augmentation pipelines: RGB ``uint8`` [H, W, 3] in, ``uint8`` out.

Each function follows torchvision's definition of the operation
(``torchvision.transforms.v2.functional``; ``tests/test_transforms.py`` compares them) but runs
on OpenCV's ``uint8`` kernels, which need no float copy of the image and so cost a loader worker
less than torchvision's tensor ops or PIL. They take their parameters as plain numbers: drawing
them is the job of the operations in ``pretrain.view_ops``; the device path
(``pretrain.device_aug``) redoes each of them in torch, to the bit where it can.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

cv2.setNumThreads(1)  # see pretrain/data.py: fork-safe, workers give the parallelism


def adjust_brightness(img: np.ndarray, f: float) -> np.ndarray:
    """clip(f * x)."""
    return cv2.convertScaleAbs(img, alpha=f)


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)  # 0.299 R + 0.587 G + 0.114 B


def adjust_contrast(img: np.ndarray, f: float) -> np.ndarray:
    """clip(f * x + (1 - f) * mean(gray(x)))."""
    return cv2.addWeighted(img, f, img, 0.0, (1.0 - f) * float(_gray(img).mean()))


def adjust_saturation(img: np.ndarray, f: float) -> np.ndarray:
    """clip(f * x + (1 - f) * gray(x))."""
    gray = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, f, gray, 1.0 - f, 0.0)


def adjust_hue(img: np.ndarray, h: float) -> np.ndarray:
    """Rotate the hue by ``h`` turns (h in [-0.5, 0.5]); 8-bit HSV, 1/256 turn steps.

    OpenCV 5.0's RGB2HSV_FULL stores the hue in 1/256 turns but its HSV2RGB_FULL (Intel IPP on
    x86) reads 1/255 turns, so the round trip alone (h = 0) moves colours by up to 8 LSB.
    """
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    lut = ((np.arange(256) + round(h * 256)) % 256).astype(np.uint8)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], lut)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # order indices


def color_jitter(img: np.ndarray, order: Sequence[int], factors: dict[int, float]) -> np.ndarray:
    """The jitter ops ``order`` names (0 brightness, 1 contrast, 2 saturation, 3 hue) that have
    a factor, in that order."""
    for k in order:
        if k in factors:
            img = JITTER_OPS[k](img, factors[k])
    return img


def to_grayscale(img: np.ndarray) -> np.ndarray:
    """Luma replicated on three channels."""
    return cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)


def solarize(img: np.ndarray, threshold: int = 128) -> np.ndarray:
    """x if x < threshold else 255 - x."""
    lut = np.arange(256, dtype=np.uint8)
    lut[threshold:] = 255 - lut[threshold:]
    return cv2.LUT(img, lut)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian, kernel truncated at 3 sigma, reflected borders."""
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT_101)


def resized_crop(img: np.ndarray, top: int, left: int, height: int, width: int,
                 size: tuple[int, int]) -> np.ndarray:
    """Crop then resize to ``size`` (h, w): area averaging when shrinking, bilinear otherwise."""
    crop = img[top : top + height, left : left + width]
    shrink = height > size[0] or width > size[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(crop, (size[1], size[0]), interpolation=interp)
