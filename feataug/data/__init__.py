"""``feataug prepare-data``: fetch the registry datasets, verify them, convert them.

Three real datasets ship inside ordinary registry packages, so they can be fetched wherever PyPI
and Debian's archive are reachable, and nowhere else is needed:

``deepforest``
    The NEON aerial RGB images with Pascal VOC boxes inside the ``deepforest==2.1.0`` wheel (read
    straight from the zip; the package is never installed). Each image is cut into tiles of about
    ``tile_size`` pixels on a grid without overlap. A box cut by a tile edge is clipped to the tile
    and kept only in the tiles that hold at least half of its area (``MIN_VISIBLE``); it is marked
    ``truncated`` there. ``train`` / ``test`` split by source image (``DEEPFOREST_SPLITS``): the
    large Yellowstone crop trains; the other Yellowstone crop and the OSBS (Florida) and SOAP
    (California) plots are held out, so the test set has two sites never seen in training. A
    second pair of splits holds out tiles instead of sites: ``train_tiles`` / ``test_tiles`` are
    the training image's tiles with every 4th one (grid order) held out
    (``DEEPFOREST_HOLDOUT_EVERY``). All boxes are one class, ``tree`` (SOAP_061's ``Alive``/
    ``Dead`` become ``tree``). ``unlabeled/`` holds ``crop_size`` crops of the training image
    (none that touches a held-out tile) and of the wheel's unannotated photos for self-supervised
    pretraining (``extra_photos`` adds natural photos from scikit-image's wheel).

``labelme``
    The three VOC-2011 photos of the ``labelme==6.3.1`` sdist's ``examples/``: its VOC XML boxes
    rewritten with integer 1-based corners, ``difficult`` 0 and VOC class names (``potted plant``
    -> ``pottedplant``, ``tv/monitor`` -> ``tvmonitor``), and its COCO polygons with the
    ``_background_`` category dropped and ids made contiguous from 1. Three images are a smoke
    dataset: ``trainval`` and ``test`` both list all of them.

``fashion-mnist``
    The four gzipped IDX files of Debian's ``dataset-fashion-mnist`` copied verbatim (the layout
    ``DATA.FORMAT idx`` reads), plus small labeled PNG folders for kNN evaluation: ``train-knn/``
    (the first ``knn_train`` training images of each class) and ``val-knn/`` (the first ``knn_val``
    test images of each class), one sub-folder per class named ``<label>_<name>``.

Coordinates: DeepForest's and labelme's boxes are read as continuous pixel coordinates (0 at the
image's left/top edge). VOC files get the VOC convention (1-based inclusive corners: ``xmin + 1``),
which Detectron2's VOC loader maps back; COCO files get ``[x, y, w, h]`` in the continuous frame.
So the VOC and COCO files of one dataset describe identical boxes.

Every downloaded archive and every file read from it is pinned by sha256. Downloads are cached in
``$FEATAUG_CACHE`` (default ``~/.cache/feataug``). A dataset is built in a temporary folder beside
its destination and renamed into place after its marker file ``prepared.json`` is written, so a
finished dataset is recognised at once and an interrupted one leaves nothing behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.data import parse_idx as read_idx
from pretrain.errors import DataError

from . import scenes
from .deepforest import DEEPFOREST_FILES, DEEPFOREST_PREFIX, DEEPFOREST_WHEEL, prepare_deepforest
from .fashion_mnist import FASHION_MNIST_CLASSES, find_fashion_mnist, prepare_fashion_mnist
from .fetch import cache_dir, default_root, fetch_pip, sha256_bytes
from .labelme import (
    LABELME_COCO,
    LABELME_IDS,
    LABELME_SDIST,
    VOC_CLASSES,
    prepare_labelme,
    voc_name,
)
from .layout import MARKER, clip_boxes, tile_grid

__all__ = ["DEEPFOREST_FILES", "DEEPFOREST_PREFIX", "DEEPFOREST_WHEEL", "FASHION_MNIST_CLASSES",
           "LABELME_COCO", "LABELME_IDS", "LABELME_SDIST", "MARKER", "PREPARERS", "VOC_CLASSES",
           "DataError", "add_arguments", "clip_boxes", "default_root", "fetch_pip",
           "find_fashion_mnist", "main", "prepare_deepforest", "prepare_fashion_mnist",
           "prepare_labelme", "read_idx", "sha256_bytes", "tile_grid", "voc_name"]

PREPARERS = {
    "deepforest": prepare_deepforest,
    "labelme": prepare_labelme,
    "fashion-mnist": prepare_fashion_mnist,
    scenes.NAME: scenes.prepare_fmnist_scenes,
}


def format_summary(name: str, out: Path, summary: dict) -> str:
    state = "already prepared" if summary.get("reused") else "prepared"
    boxes = any("boxes" in counts for counts in summary["splits"].values())
    lines = [
        f"{name}: {state} in {out}",
        f"  {'split':<12}{'images':>8}" + (f"{'boxes':>8}" if boxes else ""),
    ]
    for split, counts in summary["splits"].items():
        lines.append(
            f"  {split:<12}{counts['images']:>8}"
            + (f"{counts.get('boxes', ''):>8}" if boxes else "")
        )
    if "unlabeled" in summary:
        u = summary["unlabeled"]
        lines.append(f"  {'unlabeled':<12}{u['images']:>8}  ({u['crop_size']} px crops)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=list(PREPARERS), help="which dataset to prepare")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="output root (default: $FEATAUG_DATA, else ./datasets)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="use this local file/folder instead of downloading: the deepforest "
        "wheel, the labelme sdist, or a folder with the 4 Fashion-MNIST .gz files",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument(
        "--extra-photos",
        action="store_true",
        help="deepforest: add scikit-image's sample photos to unlabeled/",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    scenes.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    root = Path(args.root or default_root())
    if args.source is None:  # where downloads go, checked before anything is written
        cache_dir()
    kwargs = {"source": args.source, "force": args.force}
    if args.dataset == "deepforest":
        kwargs |= {"extra_photos": args.extra_photos, "progress": not args.no_progress}
    if args.dataset == scenes.NAME:
        kwargs |= {"train_scenes": args.train_scenes, "test_scenes": args.test_scenes,
                   "seed": args.seed, "canvas": args.canvas}
    summary = PREPARERS[args.dataset](root, **kwargs)
    print(format_summary(args.dataset, root / args.dataset, summary))
    return 0
