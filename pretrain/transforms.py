"""Two-view augmentation pipelines on ``uint8`` images (OpenCV kernels).

One concern: the CPU augmentation pipelines, each operation with its draw and its apply (the
device path in ``pretrain/device_aug.py`` mirrors them).

Every operation takes an RGB ``uint8`` array [H, W, 3] and a ``random.Random`` that draws all of
its random parameters, and returns a ``uint8`` array; ``ToTensor`` ends a pipeline with a
[3, H, W] ``uint8`` tensor. Each random operation is ``apply(img, draw(rng, shape))``: the draws
depend on the image shape only, never on its pixels, so a view's parameters can be drawn apart
from its pixel work (``SplitView``). Normalization (ImageNet mean/std) is the last step, done
on the batch by ``normalize`` — on the accelerator in the engine, so loader workers ship 4x fewer
bytes.

The operations follow torchvision's definitions (``torchvision.transforms.v2.functional``;
the tests compare against it) but run on OpenCV's ``uint8`` kernels: on the MoCo v2 pipeline this
measured about 3x the throughput of torchvision's tensor ops and about 2x the PIL pipeline.

Pipelines (``DA.*``):
- MoCo v2 (``DA.SYMMETRIC True``, both views): RandomResizedCrop(scale=(DA.MIN_SCALE, 1)),
  ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur p=0.5, flip.
- BYOL (``DA.SYMMETRIC False``): RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
  grayscale p=0.2, then blur p=1.0 / 0.1 and solarize p=0.0 / 0.2 for view 1 / view 2.
- ``DA.STRENGTH weak``: RandomResizedCrop and flip only, for both views.
Blur sigma is drawn from [0.1, 2.0] for a 224-px crop and scales with ``DATA.IMAGE_SIZE``
(the kernel stays 10% of the image as in SimCLR/MoCo v2).

Split path (``build_pretrain_transform(cfg, split=True)``): loader workers decode, draw every
parameter from the same per-image RNG in the same order, and do only the random-resized crop;
each view ships as its ``uint8`` crop and a float64 parameter vector (layout ``PARAMS``). The
photometric ops and the flip then run batched on the accelerator (``pretrain.device_aug``), or
here on the CPU with ``apply_photometric``, which reproduces the full pipeline bit for bit.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch

cv2.setNumThreads(1)  # see pretrain/data.py: fork-safe, workers give the parallelism

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- pixel functions
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


# ----------------------------------------------------------------------------- operations
class Compose:
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


@functools.lru_cache(maxsize=16)
def _affine(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device).view(3, 1, 1)
    return scale, shift


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [N, 3, H, W] (or [3, H, W]) -> float32 (x / 255 - mean) / std, memory format kept."""
    scale, shift = _affine(x.device, tuple(mean), tuple(std))
    return x.float().mul_(scale).add_(shift)


# ----------------------------------------------------------------------------- split path
# Layout of a split view's float64 parameter vector. A jitter factor is NaN where its op does not
# run (jitter coin lost, or that strength is 0); order0..3 name the op at each jitter step
# (0 brightness, 1 contrast, 2 saturation, 3 hue); flags are 1.0 / 0.0.
PARAMS = ("jitter", "order0", "order1", "order2", "order3", "brightness", "contrast",
          "saturation", "hue", "gray", "blur", "sigma", "solarize", "threshold", "flip")
P = {name: i for i, name in enumerate(PARAMS)}
ORDER, FACTORS = slice(P["order0"], P["order3"] + 1), slice(P["brightness"], P["hue"] + 1)
_SPLIT_OPS = (ColorJitter, Grayscale, GaussianBlur, Solarize, HorizontalFlip)  # pipeline order


def _encode(vec: np.ndarray, op, coin: bool, inner) -> None:
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
    in a RandomApply) in that order, then the flip and ToTensor, as ``_view`` builds it.
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
    return _view(size, min_scale, strength, (0.4, 0.4, 0.4, 0.1), 0.5, 0.0)


def byol_views(size: int = 224, min_scale: float = 0.08, strength: str = "strong") -> TwoViews:
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
    return Compose([ResizeCenterCrop(size), ToTensor()])


def build_train_transform(size: int) -> Compose:
    """Linear-probe training view: RandomResizedCrop(0.08, 1) and flip."""
    return Compose([RandomResizedCrop(size), HorizontalFlip(), ToTensor()])
