"""The operations a view is built from, each with its random draw and its pixel work apart.

Every operation takes an RGB ``uint8`` array [H, W, 3] and a ``random.Random`` that draws all of
its random parameters, and returns a ``uint8`` array; ``ToTensor`` ends a view with a
[3, H, W] ``uint8`` tensor. Each random operation is ``apply(img, draw(rng, shape))``: the draws
depend on the image shape only, never on its pixels, so a view's parameters can be drawn apart
from its pixel work (``pretrain.split_view``). The pixel work is ``pretrain.pixel_ops``; the
views themselves are assembled in ``pretrain.transforms``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from .pixel_ops import color_jitter, gaussian_blur, resized_crop, solarize, to_grayscale


class Compose:
    """The ops in order, all drawing from the one ``rng``."""

    def __init__(self, ops: Sequence):
        self.ops = list(ops)

    def __call__(self, img: np.ndarray, rng: random.Random):
        for op in self.ops:
            img = op(img, rng)
        return img

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.ops)) + ")"


class RandomApply:
    """op(x) with probability p (the coin is drawn even when p is 0 or 1)."""

    def __init__(self, op, p: float):
        self.op, self.p = op, p

    def __call__(self, img, rng):
        return self.op(img, rng) if rng.random() < self.p else img

    def draw(self, rng, shape) -> tuple[bool, object]:
        """(coin, the op's parameters when the coin says apply)."""
        coin = rng.random() < self.p
        return coin, (self.op.draw(rng, shape) if coin else None)

    def apply(self, img, params):
        coin, inner = params
        return self.op.apply(img, inner) if coin else img

    def __repr__(self) -> str:
        return f"RandomApply({self.op!r}, p={self.p})"


class RandomResizedCrop:
    """A crop of area fraction s ~ U(scale) and aspect ratio r ~ logU(ratio), resized to size.

    Ten tries as in torchvision; then the largest centered crop with ratio clamped into range.
    """

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = (size, size), tuple(scale), tuple(ratio)

    def params(self, h: int, w: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            r = math.exp(rng.uniform(*log_r))
            cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
            if 0 < cw <= w and 0 < ch <= h:
                return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
        r = w / h
        if r < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif r > self.ratio[1]:
            ch, cw = h, round(h * self.ratio[1])
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def draw(self, rng, shape) -> tuple[int, int, int, int]:
        return self.params(shape[0], shape[1], rng)

    def apply(self, img, params):
        return resized_crop(img, *params, self.size)

    def __call__(self, img, rng):
        return self.apply(img, self.draw(rng, img.shape))

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size[0]}, scale={self.scale})"


class ColorJitter:
    """Brightness, contrast, saturation factors ~ U(1-v, 1+v) and hue ~ U(-v, v), applied in a
    random order (torchvision's definition)."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1):
        self.b, self.c, self.s, self.h = brightness, contrast, saturation, hue

    def draw(self, rng, shape) -> tuple[list[int], dict[int, float]]:
        """(order, {op index: factor}); a zero strength draws nothing and skips its op."""
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        ranges = {0: (1 - self.b, 1 + self.b), 1: (1 - self.c, 1 + self.c),
                  2: (1 - self.s, 1 + self.s), 3: (-self.h, self.h)}
        strengths = (self.b, self.c, self.s, self.h)
        return order, {k: rng.uniform(*ranges[k]) for k in order if strengths[k]}

    def apply(self, img, params):
        return color_jitter(img, *params)

    def __call__(self, img, rng):
        return self.apply(img, self.draw(rng, img.shape))

    def __repr__(self) -> str:
        return f"ColorJitter({self.b}, {self.c}, {self.s}, {self.h})"


class Grayscale:
    """Luma on three channels (``pixel_ops.to_grayscale``); nothing to draw."""

    def draw(self, rng, shape) -> None:
        return None

    def apply(self, img, params):
        return to_grayscale(img)

    def __call__(self, img, rng):
        return to_grayscale(img)

    def __repr__(self) -> str:
        return "Grayscale()"


class GaussianBlur:
    """Blur with sigma ~ U(sigma)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = tuple(sigma)

    def draw(self, rng, shape) -> float:
        return rng.uniform(*self.sigma)

    def apply(self, img, params):
        return gaussian_blur(img, params)

    def __call__(self, img, rng):
        return self.apply(img, self.draw(rng, img.shape))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


class Solarize:
    """Invert the pixels at or above ``threshold``; nothing to draw."""

    def __init__(self, threshold: int = 128):
        self.threshold = threshold

    def draw(self, rng, shape) -> None:
        return None

    def apply(self, img, params):
        return solarize(img, self.threshold)

    def __call__(self, img, rng):
        return solarize(img, self.threshold)

    def __repr__(self) -> str:
        return f"Solarize({self.threshold})"


class HorizontalFlip:
    """Mirror left-right with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def draw(self, rng, shape) -> bool:
        return rng.random() < self.p

    def apply(self, img, params):
        return cv2.flip(img, 1) if params else img

    def __call__(self, img, rng):
        return self.apply(img, self.draw(rng, img.shape))

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class ResizeCenterCrop:
    """Evaluation view: shorter side to size/0.875, then the central size x size crop."""

    def __init__(self, size: int, ratio: float = 0.875):
        self.size, self.resize = size, max(size, round(size / ratio))

    def __call__(self, img, rng=None):
        h, w = img.shape[:2]
        s = self.resize / min(h, w)
        nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (nw, nh), interpolation=interp)
        return img[top : top + self.size, left : left + self.size]

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.size})"


class ToTensor:
    """[H, W, 3] uint8 array -> [3, H, W] uint8 tensor (no scaling: see ``normalize``)."""

    def __call__(self, img, rng=None):
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return "ToTensor()"


class TwoViews:
    """(view1(x), view2(x)): two independent augmentations of one image."""

    def __init__(self, view1, view2):
        self.view1, self.view2 = view1, view2

    def __call__(self, img, rng):
        return self.view1(img, rng), self.view2(img, rng)

    def __repr__(self) -> str:
        return f"TwoViews(\n  {self.view1!r},\n  {self.view2!r})"
