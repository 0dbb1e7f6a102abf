"""The augmentation pipelines (``pretrain.transforms`` and its ``pixel_ops`` and ``view_ops``):
each pixel operation, the random crop and coin, the two-view pipelines, normalisation.

Truths: torchvision's own functional ops for every pixel operation, the published recipes'
probabilities, rates against a binomial bound, and normalisation computed by hand. The split
path and the device ops are in tests/test_device_aug.py.
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pretrain import transforms as T
from pretrain.config import get_cfg


def _smooth(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------- pixel ops vs torchvision
def _diff(ours: np.ndarray, theirs: torch.Tensor) -> np.ndarray:
    return np.abs(ours.astype(int) - theirs.permute(1, 2, 0).numpy().astype(int))


@pytest.mark.parametrize("f", [0.6, 1.3])
def test_color_ops_match_torchvision(f):
    img = _smooth()
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    assert _diff(T.adjust_brightness(img, f), TF.adjust_brightness(t, f)).max() <= 1
    assert _diff(T.adjust_contrast(img, f), TF.adjust_contrast(t, f)).max() <= 1
    assert _diff(T.adjust_saturation(img, f), TF.adjust_saturation(t, f)).max() <= 1
    h = (f - 1) / 4  # -0.1 and 0.075 turns
    d = _diff(T.adjust_hue(img, h), TF.adjust_hue(t, h))
    assert d.mean() < 1.5 and d.max() <= 12  # 8-bit HSV quantization
    assert _diff(T.to_grayscale(img), TF.rgb_to_grayscale(t, 3)).max() <= 1
    assert _diff(T.solarize(img, 128), TF.solarize(t, 128)).max() == 0


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_blur_and_crop_match_torchvision(sigma):
    img = _smooth()
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    k = 2 * math.ceil(3 * sigma) + 1
    assert _diff(T.gaussian_blur(img, sigma), TF.gaussian_blur(t, [k, k], [sigma, sigma])).max() <= 1
    up = _diff(T.resized_crop(img, 5, 7, 20, 25, (40, 40)), TF.resized_crop(t, 5, 7, 20, 25, [40, 40]))
    assert up.max() <= 1
    down = _diff(T.resized_crop(img, 5, 7, 40, 50, (20, 20)),
                 TF.resized_crop(t, 5, 7, 40, 50, [20, 20], antialias=True))
    assert down.mean() < 3  # area averaging vs antialiased bilinear


def test_random_resized_crop_respects_scale_and_ratio():
    op = T.RandomResizedCrop(32, scale=(0.2, 1.0))
    rng = random.Random(0)
    for _ in range(300):
        top, left, h, w = op.params(100, 80, rng)
        assert 0 <= top <= 100 - h and 0 <= left <= 80 - w
        assert 0.2 * 8000 * 0.97 <= h * w <= 8000 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_apply_rate():
    op = T.RandomApply(lambda img, rng: img + 1, 0.3)
    rng = random.Random(0)
    hits = sum(int(op(np.zeros(1), rng)[0]) for _ in range(4000))
    assert abs(hits / 4000 - 0.3) <= 5 * (0.3 * 0.7 / 4000) ** 0.5  # 5 sigma of a binomial rate


# ----------------------------------------------------------------------------- pipelines
def _cfg(**kv):
    cfg = get_cfg()
    cfg.DATA.IMAGE_SIZE = 32
    for k, v in kv.items():
        node, leaf = cfg, k.split(".")
        for p in leaf[:-1]:
            node = getattr(node, p)
        setattr(node, leaf[-1], v)
    return cfg


@pytest.mark.parametrize("symmetric", [True, False])
def test_two_view_pipeline_shapes_dtype_and_determinism(symmetric):
    tf = T.build_pretrain_transform(_cfg(**{"DA.SYMMETRIC": symmetric}))
    img = _smooth(60, 90)
    v1, v2 = tf(img, random.Random(7))
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == v2.dtype == torch.uint8
    w1, w2 = tf(img, random.Random(7))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)  # a function of the seed
    assert not torch.equal(v1, v2)  # two different views
    assert not torch.equal(v1, tf(img, random.Random(8))[0])


def test_byol_pair_is_asymmetric():
    v1, v2 = T.byol_views(32).view1.ops, T.byol_views(32).view2.ops
    probs = [{type(o.op).__name__: o.p for o in ops if isinstance(o, T.RandomApply)} for ops in (v1, v2)]
    assert probs[0]["GaussianBlur"] == 1.0 and "Solarize" not in probs[0]
    assert probs[1]["GaussianBlur"] == 0.1 and probs[1]["Solarize"] == 0.2
    assert probs[0]["ColorJitter"] == probs[1]["ColorJitter"] == 0.8


def test_weak_strength_keeps_colors_strong_changes_them():
    const = np.full((40, 40, 3), (200, 30, 90), np.uint8)
    weak = T.build_pretrain_transform(_cfg(**{"DA.STRENGTH": "weak"}))
    strong = T.build_pretrain_transform(_cfg(**{"DA.STRENGTH": "strong"}))
    for seed in range(20):
        v1, v2 = weak(const, random.Random(seed))
        assert (v1 == torch.tensor([200, 30, 90]).view(3, 1, 1)).all()
    changed = sum(not (strong(const, random.Random(s))[0] == torch.tensor([200, 30, 90]).view(3, 1, 1)).all()
                  for s in range(20))
    assert changed >= 10  # jitter p=0.8, grayscale p=0.2


def test_normalize_by_hand():
    x = torch.tensor([255, 0, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    y = T.normalize(x)
    expected = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    assert y.dtype == torch.float32 and y.shape == (2, 3, 4, 4)
    # values <= 2.3 after a few float32 roundings: 1e-5 is ~40 eps32 of them
    torch.testing.assert_close(y[1, :, 2, 3], expected, rtol=0, atol=1e-5)
