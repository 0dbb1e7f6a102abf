"""DeepForest: the NEON aerial RGB images with VOC boxes inside the ``deepforest`` wheel (see
``feataug/data/__init__.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pretrain.errors import DataError

from .fetch import PipSource, default_root, fetch_pip, read_members
from .layout import (
    MIN_VISIBLE,
    _open_rgb,
    _progress,
    _publish,
    _write_json,
    _write_lines,
    clip_boxes,
    coco_json,
    parse_voc,
    tile_grid,
    voc_xml,
)

DEEPFOREST_WHEEL = PipSource(
    "deepforest==2.1.0",
    "deepforest-2.1.0-py3-none-any.whl",
    "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54",
    ("--only-binary", ":all:"),
)
# One fixed platform wheel, so the file (and its hash) is the same on every machine.
SKIMAGE_WHEEL = PipSource(
    "scikit-image==0.25.2",
    "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
    tuple(
        "--only-binary :all: --platform manylinux_2_17_x86_64 --python-version 3.11 "
        "--implementation cp".split()
    ),
)

DEEPFOREST_PREFIX = "deepforest/data/"
DEEPFOREST_FILES = {
    "2019_YELL_2_528000_4978000_image_crop2.png": "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
    "2019_YELL_2_528000_4978000_image_crop2.xml": "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11",
    "2019_YELL_2_541000_4977000_image_crop.png": "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
    "2019_YELL_2_541000_4977000_image_crop.xml": "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631",
    # OSBS_029.xml names OSBS_029.tif; the .png beside it holds the same pixels.
    "OSBS_029.png": "d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
    "OSBS_029.xml": "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c",
    "SOAP_061.png": "256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
    "SOAP_061.xml": "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c",
    "SOAP_031.png": "506af051225465bd575e0e3ca0da1e6b8a269464d2144a0415829da78fcd1527",
    "AWPE Pigeon Lake 2020 DJI_0005.JPG": "c072df1a9756b042a1cb5a5f524b8ac3f0639c6b16dcfa66a07bd154137029b3",
}
DEEPFOREST_SPLITS = {
    "train": ("2019_YELL_2_528000_4978000_image_crop2",),
    "test": ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029", "SOAP_061"),
}
# Held-out tiles of the training image: every 4th tile in grid order goes to ``test_tiles``, the
# rest to ``train_tiles``. Same site and season as the training tiles (a spatial hold-out), unlike
# ``test``'s other sites; pretraining crops never overlap a held-out tile.
DEEPFOREST_HOLDOUT_EVERY = 4
DEEPFOREST_UNLABELED_EXTRA = ("SOAP_031.png", "AWPE Pigeon Lake 2020 DJI_0005.JPG")
DEEPFOREST_CLASS = "tree"

SKIMAGE_PREFIX = "skimage/data/"
SKIMAGE_PHOTOS = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    "motorcycle_right.png": "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
}


def _grid_crops(image, size: int):
    """Non-overlapping ``size`` x ``size`` crops on a grid from the top-left; edges dropped."""
    w, h = image.size
    for r in range(h // size):
        for c in range(w // size):
            yield r, c, image.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))


def _overlaps(a: tuple, b: tuple) -> bool:
    """Whether two ``(x0, y0, w, h)`` rectangles share a pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _write_tiles(out: Path, stem: str, image, boxes: np.ndarray, tile_size: int):
    """Save the tiles of one source image (JPEG + VOC XML); yield ``(tile_id, (x0, y0, w, h),
    boxes)``: the tile's place in the source and its boxes as integer ``xyxy`` in tile
    coordinates."""
    for ty0, ty1 in tile_grid(image.height, tile_size):
        for tx0, tx1 in tile_grid(image.width, tile_size):
            tile_id = f"{stem}_{tx0:04d}_{ty0:04d}"
            kept, truncated, _ = clip_boxes(boxes, (tx0, ty0, tx1, ty1))
            kept = kept.round().astype(int)
            tile = image.crop((tx0, ty0, tx1, ty1))
            tile.save(out / "JPEGImages" / f"{tile_id}.jpg", quality=95, subsampling=0)
            objects = [
                (DEEPFOREST_CLASS, box, t)
                for box, t in zip(kept.tolist(), truncated.tolist(), strict=True)
            ]
            xml = voc_xml(f"{tile_id}.jpg", tile.width, tile.height, objects)
            (out / "Annotations" / f"{tile_id}.xml").write_bytes(xml)
            yield tile_id, (tx0, ty0, tile.width, tile.height), kept


def _build_deepforest(
    out: Path,
    files: dict[str, bytes],
    photos: dict[str, bytes],
    tile_size: int,
    crop_size: int,
    progress: bool,
) -> dict:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "unlabeled"):
        (out / sub).mkdir(parents=True)
    images = {
        stem: _open_rgb(files[stem + ".png"], stem + ".png")
        for stems in DEEPFOREST_SPLITS.values()
        for stem in stems
    }
    n_tiles = sum(
        len(tile_grid(im.width, tile_size)) * len(tile_grid(im.height, tile_size))
        for im in images.values()
    )
    bar = _progress(None, n_tiles, "tiling", progress)
    tiles = {}  # split -> [(stem, tile_id, (x0, y0, w, h), boxes)]
    for split, stems in DEEPFOREST_SPLITS.items():
        tiles[split] = []
        for stem in stems:
            width, height, _, boxes = parse_voc(files[stem + ".xml"], stem + ".xml")
            if (width, height) != images[stem].size:
                raise DataError(
                    f"{stem}.xml: size {width}x{height} but the image is {images[stem].size}"
                )
            for tile in _write_tiles(out, stem, images[stem], boxes, tile_size):
                tiles[split].append((stem, *tile))
                bar.update()
    tiles["train_tiles"] = [t for i, t in enumerate(tiles["train"])
                            if i % DEEPFOREST_HOLDOUT_EVERY != DEEPFOREST_HOLDOUT_EVERY - 1]
    tiles["test_tiles"] = [t for i, t in enumerate(tiles["train"])
                           if i % DEEPFOREST_HOLDOUT_EVERY == DEEPFOREST_HOLDOUT_EVERY - 1]
    splits = {}
    for split, members in tiles.items():
        ids, coco_images, coco_anns = [], [], []
        for _, tile_id, (_, _, tw, th), kept in members:
            coco_anns += [
                {"image": len(ids), "category": 0, "area": (x1 - x0) * (y1 - y0),
                 "bbox": [x0, y0, x1 - x0, y1 - y0]}
                for x0, y0, x1, y1 in kept.tolist()
            ]  # fmt: skip
            coco_images.append({"file_name": f"{tile_id}.jpg", "width": tw, "height": th})
            ids.append(tile_id)
        _write_lines(out / "ImageSets" / "Main" / f"{split}.txt", ids)
        description = f"DeepForest 2.1.0 NEON tiles ({split})"
        coco = coco_json(coco_images, coco_anns, [DEEPFOREST_CLASS], description)
        _write_json(out / f"instances_{split}.json", coco)
        splits[split] = {"images": len(ids), "boxes": len(coco_anns),
                         "sources": sorted({m[0] for m in members})}
    bar.close()
    _write_lines(out / "labels.txt", [DEEPFOREST_CLASS])
    held_out = {stem: [rect for s_, _, rect, _ in tiles["test_tiles"] if s_ == stem]
                for stem in DEEPFOREST_SPLITS["train"]}

    unlabeled = {stem + ".png": images[stem] for stem in DEEPFOREST_SPLITS["train"]}
    unlabeled |= {
        name: _open_rgb(files.get(name) or photos[name], name)
        for name in (*DEEPFOREST_UNLABELED_EXTRA, *photos)
    }
    n_crops = 0
    for name, image in unlabeled.items():
        stem = Path(name).stem.replace(" ", "_")
        for r, c, crop in _grid_crops(image, crop_size):
            if any(_overlaps((c * crop_size, r * crop_size, crop_size, crop_size), rect)
                   for rect in held_out.get(Path(name).stem, ())):
                continue  # a held-out tile's pixels stay unseen
            crop.save(out / "unlabeled" / f"{stem}_{r:02d}_{c:02d}.jpg", quality=95, subsampling=0)
            n_crops += 1
    return {
        "dataset": "deepforest",
        "splits": splits,
        "unlabeled": {"images": n_crops, "crop_size": crop_size, "sources": list(unlabeled)},
        "tile_size": tile_size,
        "min_visible": MIN_VISIBLE,
        "classes": [DEEPFOREST_CLASS],
    }


def prepare_deepforest(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    *,
    tile_size: int = 400,
    crop_size: int = 128,
    extra_photos: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build ``ROOT/deepforest`` (VOC + COCO tiles, ``unlabeled/`` crops); return its summary.

    ``source``: the deepforest 2.1.0 wheel or a folder holding its ``deepforest/data`` files;
    by default the wheel is downloaded (once) into the cache.
    """
    out = Path(root or default_root()) / "deepforest"

    def build(tmp: Path) -> dict:
        files = read_members(
            source or fetch_pip(DEEPFOREST_WHEEL), DEEPFOREST_PREFIX, DEEPFOREST_FILES
        )
        photos = (
            read_members(fetch_pip(SKIMAGE_WHEEL), SKIMAGE_PREFIX, SKIMAGE_PHOTOS)
            if extra_photos
            else {}
        )
        return _build_deepforest(tmp, files, photos, tile_size, crop_size, progress)

    # A folder prepared before the held-out tiles existed is rebuilt.
    return _publish(out, build, force, is_current=lambda s: "test_tiles" in s.get("splits", {}))
