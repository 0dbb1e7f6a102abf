"""labelme: the three VOC-2011 photos of the ``labelme`` sdist's examples (see
``feataug/data/__init__.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pretrain.errors import DataError

from .fetch import PipSource, default_root, fetch_pip, read_members
from .layout import _publish, _write_json, _write_lines, coco_json, parse_voc, voc_xml

LABELME_SDIST = PipSource(
    "labelme==6.3.1",
    "labelme-6.3.1.tar.gz",
    "2947e0d8341a92faa7b3ee50cf4b672f838051c6bf24892526e95b64fd3a707e",
    ("--no-binary", ":all:"),
)
LABELME_PREFIX = "labelme-6.3.1/examples/"
LABELME_IDS = ("2011_000003", "2011_000006", "2011_000025")
LABELME_COCO = "instance_segmentation/data_dataset_coco/annotations.json"
LABELME_FILES = {
    "bbox_detection/data_dataset_voc/Annotations/2011_000003.xml": "e7a95a42863fb82dc969bba65a5487addaebe4cea95284e0318db958a31972f3",
    "bbox_detection/data_dataset_voc/Annotations/2011_000006.xml": "4dbe3871399e1aab557074e3b0971c1851959c5eb1bace39296b8a9da6a973d7",
    "bbox_detection/data_dataset_voc/Annotations/2011_000025.xml": "185b1ea0ea083d338b6485d98ceec46fcd6881d0c206825f445917387987d6d5",
    "bbox_detection/data_dataset_voc/JPEGImages/2011_000003.jpg": "40c7f2fbf740c7e9707f97047a83593f6c36d8951a737b4287528932d809e80d",
    "bbox_detection/data_dataset_voc/JPEGImages/2011_000006.jpg": "9f58b8e4aca7f0411d3c8fe365da1ba5de9c36c729bda2f32cefbbb246ef1e1f",
    "bbox_detection/data_dataset_voc/JPEGImages/2011_000025.jpg": "52794c29522d495c942baf7d41823b91479ec55723bcc72d6080540831701b82",
    LABELME_COCO: "935081d34679b92a74e0dc1acf04e5ac97b01cba7eefe26d5572e761ebf16ec2",
}
# The 20 Pascal VOC classes in their usual order (Detectron2's CLASS_NAMES).
# fmt: off
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# fmt: on
VOC_NAME_FIXES = {"potted plant": "pottedplant", "tv/monitor": "tvmonitor"}


def voc_name(name: str) -> str:
    """labelme's class name as Pascal VOC spells it."""
    return VOC_NAME_FIXES.get(name, name)


def _polygon_area(segmentation: list[list[float]], height: int, width: int) -> float:
    """Pixel area of the union of the polygons, rasterized as COCO does."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(segmentation, height, width)
    return float(mask_utils.area(mask_utils.merge(rles)))


def _build_labelme(out: Path, files: dict[str, bytes]) -> dict:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    voc_dir = "bbox_detection/data_dataset_voc/"
    present, n_boxes = set(), 0
    for image_id in LABELME_IDS:
        what = f"{LABELME_PREFIX}{voc_dir}Annotations/{image_id}.xml"
        width, height, names, boxes = parse_voc(files[f"{voc_dir}Annotations/{image_id}.xml"], what)
        names = [voc_name(n) for n in names]
        unknown = sorted(set(names) - set(VOC_CLASSES))
        if unknown:
            raise DataError(f"{what}: classes {unknown} are not Pascal VOC classes")
        ints = np.clip(np.round(boxes), 0, [width, height, width, height]).astype(int)
        objects = [(n, b, False) for n, b in zip(names, ints.tolist(), strict=True)]
        (out / "Annotations" / f"{image_id}.xml").write_bytes(
            voc_xml(f"{image_id}.jpg", width, height, objects)
        )
        (out / "JPEGImages" / f"{image_id}.jpg").write_bytes(
            files[f"{voc_dir}JPEGImages/{image_id}.jpg"]
        )
        present.update(names)
        n_boxes += len(objects)
    for split in ("trainval", "test"):
        _write_lines(out / "ImageSets" / "Main" / f"{split}.txt", LABELME_IDS)
    _write_lines(out / "labels.txt", [c for c in VOC_CLASSES if c in present])

    try:
        src = json.loads(files[LABELME_COCO])
        keep = [
            c
            for c in sorted(src["categories"], key=lambda c: c["id"])
            if c["name"] != "_background_"
        ]
        cat_index = {c["id"]: i for i, c in enumerate(keep)}
        img_index = {im["id"]: i for i, im in enumerate(src["images"])}
        images = [
            {"file_name": Path(im["file_name"]).name, "width": im["width"], "height": im["height"]}
            for im in src["images"]
        ]
        anns = []
        for a in src["annotations"]:
            if a["category_id"] not in cat_index:
                continue  # an instance of `_background_` is no object
            image = images[img_index[a["image_id"]]]
            xy = np.concatenate(
                [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in a["segmentation"]]
            )
            (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
            anns.append(
                {
                    "image": img_index[a["image_id"]],
                    "category": cat_index[a["category_id"]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": a["segmentation"],
                    "area": _polygon_area(a["segmentation"], image["height"], image["width"]),
                }
            )
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{LABELME_PREFIX}{LABELME_COCO}: unexpected COCO content ({e!r})"
        ) from None
    categories = [voc_name(c["name"]) for c in keep]
    _write_json(
        out / "instances.json", coco_json(images, anns, categories, "labelme 6.3.1 examples")
    )
    return {
        "dataset": "labelme",
        "splits": {
            "voc": {"images": len(LABELME_IDS), "boxes": n_boxes},
            "coco": {"images": len(images), "boxes": len(anns)},
        },
        "voc_classes": [c for c in VOC_CLASSES if c in present],
        "coco_categories": categories,
    }


def prepare_labelme(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> dict:
    """Build ``ROOT/labelme`` (VOC ``Annotations/`` + COCO ``instances.json`` with polygons).

    ``source``: the labelme 6.3.1 sdist or a folder holding its ``examples/``; by default the sdist
    is downloaded (once) into the cache.
    """
    out = Path(root or default_root()) / "labelme"

    def build(tmp: Path) -> dict:
        return _build_labelme(
            tmp, read_members(source or fetch_pip(LABELME_SDIST), LABELME_PREFIX, LABELME_FILES)
        )

    return _publish(out, build, force)
