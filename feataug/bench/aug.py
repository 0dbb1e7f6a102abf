"""Two-view augmentation: our OpenCV pipeline against torchvision's PIL MoCo v2 pipeline, and the
device path (``pretrain.device_aug``) against the OpenCV pipeline."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from .harness import (
    BenchError,
    Profile,
    _bar,
    interleave,
    paired_ratio,
    seconds_per_unit,
    set_value,
)


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
    """``pretrain.device_aug.bench_device_aug`` on (up to 8) real photos: the device ops' largest
    difference from OpenCV (whole views and each op; run on the CPU here), and the CPU cost per
    image of each path — the full pipeline in a worker, the split path's worker half, its
    photometric half on the CPU, the batched device ops."""
    from pretrain.data import decode_image
    from pretrain.device_aug import bench_device_aug

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
