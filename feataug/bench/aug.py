"""Two-view augmentation: our OpenCV pipeline against torchvision's PIL MoCo v2 pipeline, and the
device path (``pretrain.device_aug``) against the OpenCV pipeline: ``bench_device_aug`` measures
how far each device op and whole views are from OpenCV's, on real photos or on generated
``textures``, and what each path costs the CPU."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .harness import (
    BenchError,
    Profile,
    _bar,
    interleave,
    paired_ratio,
    seconds_per_unit,
    set_value,
)

if TYPE_CHECKING:
    import torch


def find_images(folder: str | os.PathLike | None = None, limit: int = 512) -> tuple[list[str], str]:
    """Real photos for the augmentation benchmark: ``folder`` if given; else the prepared
    DeepForest tiles or labelme photos under the data root; else matplotlib's sample photo.
    Returns (paths, source description)."""
    from pretrain.data import IMAGE_EXTENSIONS

    def scan(d: Path) -> list[str]:
        return sorted(str(f) for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)[:limit]

    if folder is not None:
        paths = scan(Path(folder)) if Path(folder).is_dir() else []
        if not paths:
            raise BenchError(f"{folder}: no image files found for --images")
        return paths, str(folder)
    from feataug.data import default_root

    root = default_root()
    for sub, what in (("deepforest/JPEGImages", "DeepForest NEON aerial tiles"),
                      ("labelme/JPEGImages", "labelme VOC-2011 photos")):
        if (root / sub).is_dir() and (paths := scan(root / sub)):
            return paths, f"{what} ({root / sub})"
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        raise BenchError("no real photos found: run `feataug prepare-data deepforest` or pass --images DIR")
    return [str(photo)], "matplotlib's sample photo grace_hopper.jpg (512x600)"


class _PILGaussianBlur:
    """The MoCo v2 reference blur: PIL's GaussianBlur with radius sigma ~ U(0.1, 2.0)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def torchvision_moco_v2(size: int = 224):
    """The MoCo v2 training pipeline as published (torchvision transforms on PIL images)."""
    from torchvision import transforms as T

    from pretrain.transforms import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([_PILGaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def bench_aug(profile: Profile, result: dict, say: Callable[[str], None],
              images: str | None = None, size: int = 224) -> None:
    """Two-view MoCo v2 augmentation, decode to normalised float batch, one thread each."""
    import cv2
    import torch
    from PIL import Image

    from pretrain.data import ImageDataset, ImageFiles, collate
    from pretrain.transforms import TwoViews, moco_v2_view, normalize

    paths, source = find_images(images)
    n = profile.aug_images
    order = [paths[i % len(paths)] for i in range(n)]
    view = moco_v2_view(size, 0.2, "strong")
    dataset = ImageDataset(ImageFiles(order), TwoViews(view, view))
    tv = torchvision_moco_v2(size)

    def ours():
        batch = [dataset[(i, 1000 + i)] for i in range(n)]
        (v1, v2), _, _ = collate(batch)
        return normalize(v1), normalize(v2)

    def theirs():
        views = []
        for p in order:
            with Image.open(p) as im:
                img = im.convert("RGB")
            views.append((tv(img), tv(img)))
        return torch.stack([a for a, _ in views]), torch.stack([b for _, b in views])

    say(f"augmentation: {n} images x 2 views at {size} px per measurement, {source}")
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        contenders = {"ours": lambda: seconds_per_unit(ours, 1) / n,
                      "torchvision": lambda: seconds_per_unit(theirs, 1) / n}
        with _bar(2 * (profile.warmup + profile.repeats), "augmentation") as bar:
            times = interleave(contenders, profile.repeats, profile.warmup, lambda _: bar.update())
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    r = paired_ratio(times["torchvision"], times["ours"])  # images/s ratio = inverse time ratio
    result["details"]["aug"] = {
        "repeats": profile.repeats, "n_images": n, "distinct_images": len(set(order)),
        "source": source, "size": size, "threads": 1,
        "ours_images_per_s": 1 / r["denominator_median"],
        "peer_images_per_s": 1 / r["numerator_median"], "ratios": r["ratios"],
        "ours_s_per_image": times["ours"], "peer_s_per_image": times["torchvision"],
        "peer": "torchvision PIL pipeline of MoCo v2 (PIL GaussianBlur as in the reference code)",
        "includes": "decode, two augmented views, stacking, float normalisation",
    }
    set_value(result, "aug_pipeline_ratio_vs_torchvision", r["ratio"])


def bench_aug_device(profile: Profile, result: dict, say: Callable[[str], None],
                     images: str | None = None, size: int = 224) -> None:
    """``bench_device_aug`` on (up to 8) real photos: the device ops' largest
    difference from OpenCV (whole views and each op; run on the CPU here), and the CPU cost per
    image of each path — the full pipeline in a worker, the split path's worker half, its
    photometric half on the CPU, the batched device ops."""
    from pretrain.data import decode_image

    paths, source = find_images(images)
    photos = [img for img in (decode_image(p) for p in paths[:8]) if img is not None]
    if not photos:
        raise BenchError(f"{source}: none of the photos could be decoded")
    say(f"device augmentation: {len(photos)} photo(s) x 4 seeds x (MoCo v2, BYOL) at {size} px, "
        f"{source}")
    r = bench_device_aug(photos, size=size, repeats=profile.repeats)
    lsb = r["aug_device_vs_cpu_max_lsb"]
    ops = {k: v for k, v in lsb.items() if k != "pipeline"}
    result["details"]["aug_device"] = {**r, "source": source, "repeats": profile.repeats,
                                       "worst_op": max(ops, key=ops.get)}
    set_value(result, "aug_device_vs_cpu_max_lsb", max(lsb.values()))


# ----------------------------------------------------------------------------- device path
def textures(n: int, h: int = 350, w: int = 400, seed: int = 0) -> list[np.ndarray]:
    """``n`` synthetic RGB uint8 [h, w, 3] images: smooth colour fields plus pixel noise, so every
    op meets both flat regions and edges."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 6))).float()
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)[0]
        noise = torch.from_numpy(rng.normal(0, 25, (3, h, w))).float()
        out.append((field + noise).round().clamp(0, 255).byte().permute(1, 2, 0).numpy().copy())
    return out


def _ops(size: int) -> dict[str, tuple[Callable, Callable, tuple[float, float]]]:
    """name -> (OpenCV function(img, f), device function(x, f), range f is drawn from)."""
    import cv2
    import torch

    from pretrain import pixel_ops as C
    from pretrain.device_aug import (
        blur,
        brightness,
        contrast,
        flip,
        gaussian_kernels,
        grayscale,
        hue,
        saturation,
        solarize,
    )

    sigma = (0.1 * size / 224, 2.0 * size / 224)
    return {
        "brightness": (C.adjust_brightness, brightness, (0.6, 1.4)),
        "contrast": (C.adjust_contrast, contrast, (0.6, 1.4)),
        "saturation": (C.adjust_saturation, saturation, (0.6, 1.4)),
        "hue": (C.adjust_hue, hue, (-0.1, 0.1)),
        "gray": (lambda img, f: C.to_grayscale(img), lambda x, f: grayscale(x), (0, 0)),
        "blur": (C.gaussian_blur, lambda x, s: blur(x, gaussian_kernels(s)), sigma),
        "solarize": (lambda img, f: C.solarize(img, 128),
                     lambda x, f: solarize(x, torch.full((len(x),), 128.0)), (0, 0)),
        "flip": (lambda img, f: cv2.flip(img, 1), lambda x, f: flip(x), (0, 0)),
    }


def _max_lsb(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def _best(fn: Callable, repeats: int, sync: Callable = lambda: None) -> float:
    """The fastest of ``repeats`` wall-clock runs of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_device_aug(images: Sequence[np.ndarray] | None = None, size: int = 224,
                     seeds: int = 4, seed: int = 0, device: str | torch.device = "cpu",
                     repeats: int = 3) -> dict:
    """Agreement of the device ops with OpenCV, and the CPU cost of the full vs the split path.

    ``images``: RGB uint8 [H, W, 3] arrays (default: 8 ``textures`` of 350 x 400); each gives
    ``seeds`` MoCo v2 and BYOL view pairs of ``size`` px. Returns
    ``aug_device_vs_cpu_max_lsb``: {op: max |device - OpenCV|} for each op alone on the crops
    (factors drawn from the pipeline's ranges, both ends included), and ``pipeline``: whole
    views, ``augment`` of the split path vs the full CPU pipeline;
    ``aug_cpu_ms_per_image_full`` / ``aug_cpu_ms_per_image_split``: ms per image (both views,
    one thread, fastest of ``repeats``) of the full OpenCV pipeline and of the worker half (crop
    + parameter draws);
    ``aug_cpu_ms_per_image_photometric``: ``apply_photometric`` (the rest, on the CPU);
    ``aug_device_ms_per_image``: ``augment`` on ``device`` per image (both views, batched).
    """
    import torch

    from pretrain import transforms as T
    from pretrain.device_aug import augment

    images = list(images) if images is not None else textures(8, seed=seed)
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pairs = {"moco": T.TwoViews(T.moco_v2_view(size), T.moco_v2_view(size)),
             "byol": T.byol_views(size)}
    keys = [(img, seed * 1_000_003 + i * seeds + s) for i, img in enumerate(images)
            for s in range(seeds)]
    full, split = [], []
    t_full = t_split = 0.0
    for views in pairs.values():
        splitter = T.SplitTwoViews(views.view1, views.view2)
        full += [v for img, k in keys for v in views(img, random.Random(k))]
        split += [splitter(img, random.Random(k)) for img, k in keys]
        t_full += _best(lambda views=views: [views(i, random.Random(k)) for i, k in keys], repeats)
        t_split += _best(lambda sp=splitter: [sp(i, random.Random(k)) for i, k in keys], repeats)
    crops = [c for c1, c2, _, _ in split for c in (c1, c2)]
    params = [q for _, _, p1, p2 in split for q in (p1, p2)]
    pairs_cp = list(zip(params, crops, strict=True))
    t_photo = _best(lambda: [T.apply_photometric(q, c) for q, c in pairs_cp], repeats)
    x, p = torch.stack(crops).to(device), torch.stack(params)
    views_dev = augment(x, p)  # also the warm-up
    t_dev = _best(lambda: augment(x, p), repeats, sync)
    lsb = {"pipeline": _max_lsb(views_dev.cpu(), torch.stack(full))}
    rng = random.Random(seed)
    arrays = [np.ascontiguousarray(c.permute(1, 2, 0).numpy()) for c in crops]
    for name, (cv_op, dev_op, (lo, hi)) in _ops(size).items():
        f = [lo, hi] + [rng.uniform(lo, hi) for _ in range(len(arrays) - 2)]
        ref = torch.stack([T.ToTensor()(cv_op(a, fi)) for a, fi in zip(arrays, f, strict=True)])
        lsb[name] = _max_lsb(dev_op(x, torch.tensor(f, dtype=torch.float64)).cpu(), ref)
    n = len(keys) * len(pairs)
    return {"aug_device_vs_cpu_max_lsb": lsb,
            "aug_cpu_ms_per_image_full": 1e3 * t_full / n,
            "aug_cpu_ms_per_image_split": 1e3 * t_split / n,
            "aug_cpu_ms_per_image_photometric": 1e3 * t_photo / n,
            "aug_device_ms_per_image": 1e3 * t_dev / n,
            "aug_device": str(device), "aug_images": len(images), "aug_size": size}
