"""Small synthetic detection datasets (VOC-format and COCO-format) for the detection tests.

Colored rectangles and ellipses on noise. The VOC files deliberately contain what real exports
contain: float coordinates, an empty ``<difficult/>``, a missing ``<difficult>``, images of
several extensions and a class name with a space.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

CLASSES = (
    "red box",
    "blue ellipse",
)  # the first class is drawn as rectangles, the second as ellipses
COLORS = ((220, 40, 40), (40, 60, 220))  # RGB


def _draw_image(rng: np.random.Generator, size: int, n_objects: int, classes=CLASSES):
    """An RGB uint8 image and its objects: (class, x0, y0, x1, y1, polygon) in pixel units."""
    image = rng.integers(90, 166, size=(size, size, 3), dtype=np.uint8)
    objects = []
    for _ in range(n_objects):
        c = int(rng.integers(len(classes)))
        cls = classes[c]
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        color = COLORS[c % 2]
        if c % 2 == 0:
            cv2.rectangle(image, (x0, y0), (x0 + w - 1, y0 + h - 1), color, thickness=-1)
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
        else:
            center, axes = (x0 + w // 2, y0 + h // 2), (w // 2, h // 2)
            cv2.ellipse(image, center, axes, 0, 0, 360, color, thickness=-1)
            t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            poly = np.stack([center[0] + axes[0] * np.cos(t), center[1] + axes[1] * np.sin(t)], 1)
            poly = poly.round(2).reshape(-1).tolist()
        objects.append((cls, x0, y0, x0 + w, y0 + h, poly))
    return image, objects


def _write_image(path: Path, image: np.ndarray) -> None:
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def make_voc(
    root: Path,
    n_train: int = 4,
    n_test: int = 3,
    size: int = 160,
    seed: int = 0,
    classes=CLASSES,
    clean: bool = False,
) -> dict[str, list[tuple]]:
    """VOC layout with splits ``trainval`` and ``test``.

    ``clean``: write what Detectron2's own VOC evaluator can read (integer coordinates,
    ``<pose>``, ``<truncated>``, ``<difficult>`` 0 or 1 on every object, ``<size>``, .jpg).

    Returns the truth: image id -> [(class, x0, y0, x1, y1)] in Detectron2 pixel coordinates
    (the XML holds xmin = x0 + 1, ymin = y0 + 1, xmax = x1, ymax = y1, as floats).
    """
    rng = np.random.default_rng(seed)
    truth = {}
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = {"trainval": [], "test": []}
    for i in range(n_train + n_test):
        split = "trainval" if i < n_train else "test"
        image_id = f"{2000 + i:06d}"
        ids[split].append(image_id)
        image, objects = _draw_image(rng, size, n_objects=2, classes=classes)
        truth[image_id] = [o[:5] for o in objects]
        ext = ".png" if i % 3 == 1 and not clean else ".jpg"  # images of any extension
        _write_image(root / "JPEGImages" / f"{image_id}{ext}", image)
        xml = [f"<annotation><filename>{image_id}{ext}</filename>"]
        if i != 0 or clean:  # one file without <size>: read from the image
            xml.append(f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>")
        for k, (cls, x0, y0, x1, y1, _) in enumerate(objects):
            # VOC units: 1-based inclusive -> xmin = x0 + 1, xmax = x1
            if clean:
                difficult = (
                    f"<truncated>0</truncated><difficult>{int((i + k) % 4 == 3)}</difficult>"
                )
                coords = (x0 + 1, y0 + 1, x1, y1)
            else:
                difficult = ["<difficult/>", "", "<difficult>0</difficult>"][(i + k) % 3]
                coords = tuple(f"{v:.1f}" for v in (x0 + 1, y0 + 1, x1, y1))
            xml.append(
                f"<object><name>{cls}</name><pose>Unspecified</pose>{difficult}<bndbox>"
                "<xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>".format(
                    *coords
                )
            )
        xml.append("</annotation>")
        (root / "Annotations" / f"{image_id}.xml").write_text("".join(xml))
    for split, split_ids in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
    return truth


def make_coco(folder: Path, name: str, n_images: int = 4, size: int = 160, seed: int = 0) -> Path:
    """Images in ``folder/images`` and ``folder/<name>.json`` with boxes and polygon masks.

    Category ids are 3 and 7 (not 1..N) to exercise the id mapping. Returns the json path.
    """
    rng = np.random.default_rng(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    cat_ids = {"red box": 3, "blue ellipse": 7}
    images, annotations = [], []
    for i in range(n_images):
        image, objects = _draw_image(rng, size, n_objects=2)
        file_name = f"{name}_{i:03d}.jpg"
        _write_image(images_dir / file_name, image)
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for cls, x0, y0, x1, y1, poly in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cat_ids[cls],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "segmentation": [list(map(float, poly))],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": v, "name": k} for k, v in cat_ids.items()]
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path
