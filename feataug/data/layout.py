"""Writing detection datasets: tiles and clipped boxes, VOC XML, COCO json, and building a
dataset folder in place (atomically, with its ``prepared.json`` marker)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from pretrain.errors import DataError

MARKER = "prepared.json"
FORMAT_VERSION = 1
MIN_VISIBLE = 0.5  # a clipped box is kept in a tile holding at least this fraction of its area


def tile_grid(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` into ``max(1, round(length / tile))`` near-equal intervals."""
    n = max(1, round(length / tile))
    edges = [i * length // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def clip_boxes(boxes: np.ndarray, tile: Sequence[int], min_visible: float = MIN_VISIBLE):
    """Boxes of one image seen through ``tile = (x0, y0, x1, y1)``.

    ``boxes``: (N, 4) ``xyxy`` in image pixels. Returns ``(kept, truncated, index)``: the boxes
    holding at least ``min_visible`` of their area inside the tile, clipped to it and shifted to
    tile coordinates (M, 4); whether clipping changed each one (M,); their rows in ``boxes`` (M,).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = tile
    clipped = np.clip(boxes, [x0, y0, x0, y0], [x1, y1, x1, y1])
    inter = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    index = np.flatnonzero((inter > 0) & (inter >= min_visible * area))
    truncated = (clipped[index] != boxes[index]).any(axis=1)
    return clipped[index] - [x0, y0, x0, y0], truncated, index


def parse_voc(xml: bytes, what: str) -> tuple[int, int, list[str], np.ndarray]:
    """``(width, height, names, boxes (N, 4) xyxy float)`` of a VOC XML file, values as written
    (read by ``transfer.voc``, the one VOC reader)."""
    from transfer.voc import parse_voc_xml

    wh, objects = parse_voc_xml(xml, what)
    if wh is None:
        raise DataError(f"{what}: no <size> with a positive width and height")
    boxes = np.asarray([box for _, box, _ in objects], dtype=np.float64).reshape(-1, 4)
    return wh[0], wh[1], [name for name, _, _ in objects], boxes


def voc_xml(
    filename: str, width: int, height: int, objects: Iterable[tuple[str, Sequence[int], bool]]
) -> bytes:
    """A VOC annotation. ``objects``: ``(name, (x0, y0, x1, y1), truncated)`` with integer
    continuous corners; written 1-based (``xmin = x0 + 1``) with ``difficult`` 0."""
    ann = ET.Element("annotation")

    def sub(parent, tag, text=None):
        el = ET.SubElement(parent, tag)
        if text is not None:
            el.text = str(text)
        return el

    sub(ann, "folder", "JPEGImages")
    sub(ann, "filename", filename)
    size = sub(ann, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        sub(size, tag, value)
    sub(ann, "segmented", 0)
    for name, (x0, y0, x1, y1), truncated in objects:
        obj = sub(ann, "object")
        sub(obj, "name", name)
        sub(obj, "pose", "Unspecified")
        sub(obj, "truncated", int(truncated))
        sub(obj, "difficult", 0)
        box = sub(obj, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            sub(box, tag, int(value))
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def coco_json(
    images: list[dict], annotations: list[dict], categories: Sequence[str], description: str
) -> dict:
    """A COCO instances dict; image, annotation and category ids are numbered from 1 in order.

    ``images``: ``{"file_name", "width", "height"}``; ``annotations``: ``{"image", "category",
    "bbox" [x, y, w, h], "area"}`` plus optional ``"segmentation"``, where ``image`` indexes
    ``images`` and ``category`` indexes ``categories``.
    """
    out_anns = []
    for i, a in enumerate(annotations, 1):
        ann = {
            "id": i,
            "image_id": a["image"] + 1,
            "category_id": a["category"] + 1,
            "bbox": [float(v) for v in a["bbox"]],
            "area": float(a["area"]),
            "iscrowd": 0,
        }
        if "segmentation" in a:
            ann["segmentation"] = a["segmentation"]
        out_anns.append(ann)
    return {
        "info": {"description": description, "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": [{"id": i, **im} for i, im in enumerate(images, 1)],
        "annotations": out_anns,
        "categories": [
            {"id": i, "name": n, "supercategory": n} for i, n in enumerate(categories, 1)
        ],
    }


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def _open_rgb(data: bytes, what: str):
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except OSError as e:
        raise DataError(f"{what}: not a readable image ({e})") from None
    return im.convert("RGB")


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def _publish(out: Path, build: Callable[[Path], dict], force: bool,
             is_current: Callable[[dict], bool] = lambda summary: True) -> dict:
    """Return ``out``'s summary if it is already prepared (and ``is_current`` of it: an older
    layout of the dataset is rebuilt); else ``build(tmp)`` in a temporary folder beside ``out``,
    write the marker there last, and rename the folder to ``out``."""
    marker = out / MARKER
    if marker.is_file() and not force:
        try:
            summary = json.loads(marker.read_text())
        except ValueError:
            summary = {}
        if not isinstance(summary, dict):  # a damaged marker: rebuilt
            summary = {}
        if summary.get("format") == FORMAT_VERSION and is_current(summary):
            return {**summary, "reused": True}
    elif out.exists() and not force:
        raise DataError(
            f"{out} exists but is not a prepared dataset (no {MARKER}); remove it or pass --force"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"{out}: cannot be created, a file stands in its path") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        summary = {"format": FORMAT_VERSION, **build(tmp)}
        _write_json(tmp / MARKER, summary)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return {**summary, "reused": False}
