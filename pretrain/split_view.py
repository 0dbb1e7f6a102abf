"""The split path: a view cut into its loader-worker half and its photometric half.

Loader workers decode, draw every parameter of a view from the same per-image RNG in the same
order as the full view (``pretrain.transforms``), and do only the random-resized crop; each view
ships as its ``uint8`` crop and a float64 parameter vector (layout ``PARAMS``). The photometric
ops and the flip then run batched on the accelerator (``pretrain.device_aug``), or here on the
CPU with ``apply_photometric``, which reproduces the full view bit for bit. Workers ship small
crops, and the costly pixel work moves to where the batch is.
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import torch

from .pixel_ops import color_jitter, gaussian_blur, solarize, to_grayscale
from .view_ops import (
    ColorJitter,
    Compose,
    GaussianBlur,
    Grayscale,
    HorizontalFlip,
    RandomApply,
    RandomResizedCrop,
    Solarize,
    ToTensor,
)

# Layout of a split view's float64 parameter vector. A jitter factor is NaN where its op does not
# run (jitter coin lost, or that strength is 0); order0..3 name the op at each jitter step
# (0 brightness, 1 contrast, 2 saturation, 3 hue); flags are 1.0 / 0.0.
PARAMS = ("jitter", "order0", "order1", "order2", "order3", "brightness", "contrast",
          "saturation", "hue", "gray", "blur", "sigma", "solarize", "threshold", "flip")
P = {name: i for i, name in enumerate(PARAMS)}
ORDER, FACTORS = slice(P["order0"], P["order3"] + 1), slice(P["brightness"], P["hue"] + 1)
_SPLIT_OPS = (ColorJitter, Grayscale, GaussianBlur, Solarize, HorizontalFlip)  # pipeline order


def _encode(vec: np.ndarray, op, coin: bool, inner) -> None:
    """Write one op's draw (its coin and its parameters ``inner``) into its slots of ``vec``."""
    if isinstance(op, ColorJitter):
        vec[P["jitter"]] = coin
        if coin:
            order, factors = inner
            vec[ORDER] = order
            for k, f in factors.items():
                vec[FACTORS.start + k] = f
    elif isinstance(op, Grayscale):
        vec[P["gray"]] = coin
    elif isinstance(op, GaussianBlur):
        vec[P["blur"]], vec[P["sigma"]] = coin, (inner if coin else 0.0)
    elif isinstance(op, Solarize):
        vec[P["solarize"]], vec[P["threshold"]] = coin, op.threshold
    else:  # HorizontalFlip
        vec[P["flip"]] = coin and inner


class SplitView:
    """The loader-worker half of a view: ``(crop, params)``.

    ``crop`` is the [3, S, S] ``uint8`` random-resized crop and ``params`` the float64
    [len(PARAMS)] vector of every later op's parameters, all drawn from ``rng`` in the order
    ``view(img, rng)`` draws them (the RandomApply coins included, whatever their p), so
    ``apply_photometric(params, crop)`` equals ``view(img, rng)`` and leaves ``rng`` in the same
    state. ``view`` must be crop, then any of jitter / grayscale / blur / solarize (each maybe
    in a RandomApply) in that order, then the flip and ToTensor, as ``pretrain.transforms`` builds
    its views.
    """

    def __init__(self, view: Compose):
        ops = view.ops
        kinds = [type(o.op if isinstance(o, RandomApply) else o) for o in ops[1:-1]]
        ranks = [_SPLIT_OPS.index(k) if k in _SPLIT_OPS else -1 for k in kinds]
        if (len(ops) < 2 or not isinstance(ops[0], RandomResizedCrop)
                or not isinstance(ops[-1], ToTensor) or -1 in ranks or ranks != sorted(set(ranks))):
            raise ValueError(f"SplitView: {view!r} is not RandomResizedCrop, then jitter / "
                             "grayscale / blur / solarize / flip in this order, then ToTensor")
        self.view = view

    def __call__(self, img: np.ndarray, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        vec = np.zeros(len(PARAMS))
        vec[ORDER], vec[FACTORS] = range(4), np.nan
        crop_op, *ops, to_tensor = self.view.ops
        crop = crop_op.apply(img, crop_op.draw(rng, img.shape))
        for op in ops:
            if isinstance(op, RandomApply):
                _encode(vec, op.op, *op.draw(rng, crop.shape))
            else:
                _encode(vec, op, True, op.draw(rng, crop.shape))
        return to_tensor(crop), torch.from_numpy(vec)

    def __repr__(self) -> str:
        return f"SplitView({self.view!r})"


class SplitTwoViews:
    """(crop1, crop2, params1, params2) of two ``SplitView``s; ``collate`` stacks each of them."""

    def __init__(self, view1: Compose, view2: Compose):
        self.view1, self.view2 = SplitView(view1), SplitView(view2)

    def __call__(self, img, rng):
        (c1, p1), (c2, p2) = self.view1(img, rng), self.view2(img, rng)
        return c1, c2, p1, p2

    def __repr__(self) -> str:
        return f"SplitTwoViews(\n  {self.view1!r},\n  {self.view2!r})"


def apply_photometric(params: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """The rest of a split view on the CPU, with the pipeline's own OpenCV functions.

    ``params`` [len(PARAMS)] float64, ``crop`` [3, S, S] ``uint8`` (a ``SplitView`` output) ->
    [3, S, S] ``uint8``: jitter (the drawn order and factors), grayscale, Gaussian blur, solarize,
    then the flip, as the full pipeline runs them, so the result is its view bit for bit.
    """
    v = params.tolist()
    img = np.ascontiguousarray(crop.permute(1, 2, 0).numpy())
    if v[P["jitter"]]:
        factors = {k: f for k, f in enumerate(v[FACTORS]) if not math.isnan(f)}
        img = color_jitter(img, [int(k) for k in v[ORDER]], factors)
    if v[P["gray"]]:
        img = to_grayscale(img)
    if v[P["blur"]]:
        img = gaussian_blur(img, v[P["sigma"]])
    if v[P["solarize"]]:
        img = solarize(img, int(v[P["threshold"]]))
    if v[P["flip"]]:
        img = cv2.flip(img, 1)
    return ToTensor()(img)
