"""Checks of COCO ground-truth and results files, before anything is evaluated.

A wrong file gets one line naming it and the problem instead of a traceback from deep inside the
COCO API. ``feataug coco-eval`` (:mod:`transfer.coco_eval`), the Detectron2 evaluator
(:mod:`transfer.coco_evaluator`) and ``feataug detect --register-coco`` (:mod:`transfer.datasets`)
share them.

The COCO API indexes images, categories and annotations by id, so a repeated id silently drops
or renames an entry (an annotation lost from the index lowers AP; a category takes another's
name) and Detectron2's loader stops with an ``AssertionError``: each is refused with one line
(:func:`check_unique_ids`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections import Counter
from typing import Any

from pretrain.errors import DataError
from pretrain.utils.io import read_regular

__all__ = ["IOU_TYPES", "COCOEvalError", "check_gt", "check_iou_type", "check_unique_ids",
           "load_gt", "load_results", "read_json"]  # fmt: skip

IOU_TYPES = ("bbox", "segm")

PathLike = str | os.PathLike
logger = logging.getLogger(__name__)

# the field of an annotation or a detection that holds the region of each iou type
_REGION = {"bbox": "bbox", "segm": "segmentation"}
_BOX_FIELDS = ("x", "y", "width", "height")
# section of the file -> what one entry is called
_SECTIONS = {"images": "image", "categories": "category", "annotations": "annotation"}


class COCOEvalError(DataError, ValueError):
    """A ground-truth or results file that cannot be evaluated; the message names the file."""


def read_json(path: PathLike) -> Any:
    """The JSON document in ``path``; a file that cannot be read or parsed is one error line."""
    try:
        return json.loads(read_regular(path))
    except OSError as e:
        raise COCOEvalError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise COCOEvalError(f"{path}: not valid JSON: {e}") from None


def check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")


# ---------------------------------------------------------------------------------- values


def _is_number(v: Any) -> bool:
    t = type(v)  # int and float first: this runs for every box coordinate
    return t is float or t is int or (t is not bool and isinstance(v, numbers.Real))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range
        return False


def _num(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 24 else text[:21] + "..."


def _short(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, list | tuple | dict | str | int | float) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def _is_id(v: Any) -> bool:
    """A COCO id: an integer (or a string), never a list, an object or a boolean."""
    return isinstance(v, int | str) and not isinstance(v, bool)


def _is_box(box: Any) -> bool:
    return isinstance(box, list | tuple) and len(box) == 4 and all(map(_is_number, box))


def _box_problem(box) -> str | None:
    """What is wrong with a box of 4 numbers [x, y, width, height], or None."""
    for j, v in enumerate(box):
        if not _finite(v):
            return f"bbox[{j}] ({_BOX_FIELDS[j]}) = {_num(v)}; box numbers must be finite"
    for j in (2, 3):
        if box[j] < 0:
            return f"bbox[{j}] ({_BOX_FIELDS[j]}) = {box[j]!r}; width and height must be >= 0"
    return None


def _times(n: int) -> str:
    return "twice" if n == 2 else f"{n} times"


# ---------------------------------------------------------------------------- ground truth


def check_unique_ids(gt: dict, name: str, error: type[Exception]) -> None:
    """Refuse a repeated id among ``gt``'s images, categories or annotations (entries without a
    usable id are left to the other checks): ``error("NAME: annotation id 7 appears twice")``."""
    for key, kind in _SECTIONS.items():
        ids: list[Any] = [e["id"] for e in gt.get(key) or () if isinstance(e, dict)
                          and isinstance(e.get("id"), int | str) and not isinstance(e["id"], bool)]
        counts = Counter(ids)
        repeated = next((i for i in ids if counts[i] > 1), None)
        if repeated is not None:
            raise error(f"{name}: {kind} id {repeated!r} appears {_times(counts[repeated])}")


def load_gt(path: PathLike) -> dict:
    """Read a COCO ground-truth file and check its three sections."""
    gt = read_json(path)
    check_gt(gt, name=str(path))
    return gt


def check_gt(gt: Any, iou_type: str | None = None, name: str = "ground truth") -> None:
    """Check the COCO ground-truth structure; with ``iou_type`` also every annotation's fields."""
    if not isinstance(gt, dict):
        raise COCOEvalError(f"{name}: ground truth must be a JSON object, got {_kind(gt)}")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise COCOEvalError(f"{name}: ground truth lacks '{key}' (is this a results file?)")
        if not isinstance(gt[key], list):
            raise COCOEvalError(f"{name}: '{key}' must be a list, got {_kind(gt[key])}")
    for key in ("images", "categories"):
        for i, entry in enumerate(gt[key]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise COCOEvalError(f"{name}: {key}[{i}] is not an object with an 'id'")
            if not _is_id(entry["id"]):
                raise COCOEvalError(f"{name}: {key}[{i}] has id {_short(entry['id'])}; an id is "
                                    "an integer")
    check_unique_ids(gt, name, COCOEvalError)
    if iou_type is None:
        return
    check_iou_type(iou_type)
    if iou_type == "segm":
        for i, img in enumerate(gt["images"]):
            if "height" not in img or "width" not in img:
                raise COCOEvalError(f"{name}: images[{i}] lacks 'height'/'width' (needed for segm)")
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    for i, ann in enumerate(gt["annotations"]):
        problem = _annotation_problem(ann, iou_type, image_ids, category_ids)
        if problem:
            raise COCOEvalError(f"{name}: annotations[{i}] {problem}")


def _annotation_problem(ann: Any, iou_type: str, image_ids: set, category_ids: set) -> str | None:
    """What is wrong with one ground-truth annotation (the words after ``annotations[i]``)."""
    if not isinstance(ann, dict):
        return f"is {_kind(ann)}, not an object"
    need = ("id", "image_id", "category_id", "area", "iscrowd", _REGION[iou_type])
    missing = [k for k in need if k not in ann]
    if missing:
        return f"lacks {', '.join(map(repr, missing))}"
    for key in ("id", "image_id", "category_id"):
        if not _is_id(ann[key]):
            return f"has {key} {_short(ann[key])}; an id is an integer"
    if ann["image_id"] not in image_ids:
        return f"names image_id {ann['image_id']!r}, not in 'images'"
    if ann["category_id"] not in category_ids:  # the evaluators would drop it silently
        return f"names category_id {ann['category_id']!r}, not in 'categories'"
    if not (_is_number(ann["area"]) and _finite(ann["area"]) and ann["area"] >= 0):
        return f"has area {_short(ann['area'])}; an area is a finite number >= 0"
    crowd = ann["iscrowd"]
    if not (isinstance(crowd, bool) or (_is_number(crowd) and crowd in (0, 1))):
        return f"has iscrowd {_short(ann['iscrowd'])}; it is 0 or 1"
    if iou_type != "bbox":
        return None
    if not _is_box(ann.get("bbox")):
        return f"has bbox {_short(ann.get('bbox'))}; a box is 4 numbers"
    problem = _box_problem(ann["bbox"])
    return f"has {problem}" if problem else None


# --------------------------------------------------------------------------------- results


def load_results(
    gt: dict,
    results: PathLike | list,
    iou_type: str = "bbox",
    *,
    name: str | None = None,
    gt_name: str = "the ground truth",
) -> list[dict]:
    """Read (if a path) and check detections against ``gt``.

    Every detection needs ``image_id``, ``category_id`` and a finite ``score``, plus a
    ``bbox`` of 4 finite numbers with width and height >= 0 for ``bbox`` (checked wherever a
    ``bbox`` is given) or a ``segmentation`` for ``segm``; ids must name images and categories of
    ``gt``. An empty list is a valid result (no detections: AP 0 where there is ground truth),
    with a warning. Returns the detections (not copies; :func:`transfer.coco_backends.run_cocoeval`
    copies what it edits).
    """
    check_iou_type(iou_type)
    if name is None:
        name = "results" if isinstance(results, list) else str(results)
    dts = results if isinstance(results, list) else read_json(results)

    def fail(problem: str) -> COCOEvalError:
        return COCOEvalError(f"{name}: {problem}")

    if not isinstance(dts, list):
        raise fail(f"results must be a JSON list of detections, got {_kind(dts)}")
    if not dts:
        logger.warning(
            f"{name}: no detections (an empty results list): AP is 0 where there is ground truth"
        )
        return dts
    images = {img["id"]: img for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    unknown: dict[str, list[int]] = {"image_id": [], "category_id": []}
    for i, d in enumerate(dts):
        problem = _detection_problem(d, iou_type)
        if problem:
            raise fail(f"detection {i} {problem}")
        if d["image_id"] not in images:
            unknown["image_id"].append(i)
        if d["category_id"] not in category_ids:
            unknown["category_id"].append(i)
    for key, bad in unknown.items():
        if bad:
            i = bad[0]
            raise fail(
                f"detection {i} names {key} {dts[i][key]!r}, which is not in {gt_name} "
                f"({len(bad)} of {len(dts)} detections name unknown {key}s)"
            )
    if iou_type == "segm":
        with_box = sum("bbox" in d for d in dts)
        if 0 < with_box < len(dts):
            raise fail("some detections carry a 'bbox' and some do not; give all or none")
        for i, d in enumerate(dts):
            _check_segmentation(d["segmentation"], images[d["image_id"]], with_box > 0, i, fail)
    return dts


def _detection_problem(d: Any, iou_type: str) -> str | None:
    """What is wrong with one detection on its own (the words after ``detection i``)."""
    if not isinstance(d, dict):
        return f"is {_kind(d)}, not an object"
    need = ("image_id", "category_id", "score", _REGION[iou_type])
    if not set(need) <= d.keys():
        missing = [k for k in need if k not in d]
        why = f" (needed for --iou-type {iou_type})" if missing == [need[-1]] else ""
        return f"lacks {', '.join(map(repr, missing))}{why}"
    if not _is_number(d["score"]):
        return f"has a score of {_kind(d['score'])}, not a number"
    if not _finite(d["score"]):
        return f"has score {_num(d['score'])}; scores must be finite"
    for key in ("image_id", "category_id"):
        if not _is_id(d[key]):
            return f"has {key} {_short(d[key])}; an id is an integer"
    if "bbox" not in d:
        return None
    if not _is_box(d["bbox"]):
        return f"has bbox {_short(d['bbox'])}; a box is 4 numbers [x, y, width, height]"
    problem = _box_problem(d["bbox"])
    return f"has {problem}" if problem else None


def _check_segmentation(seg: Any, image: dict, has_box: bool, i: int, fail) -> None:
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise fail(f"detection {i}: an RLE segmentation needs 'size' and 'counts'")
        size = [image["height"], image["width"]]
        if not isinstance(seg["size"], list) or seg["size"] != size:
            raise fail(f"detection {i}: RLE size {_short(seg['size'])} is not its image's {size}")
        if not has_box and not isinstance(seg["counts"], str):
            raise fail(
                f"detection {i}: without a 'bbox' the mask must be compressed RLE (string counts)"
            )
    elif isinstance(seg, list):
        if not has_box:
            raise fail(f"detection {i}: a polygon segmentation needs a 'bbox' too (or give RLE)")
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise fail(f"detection {i}: polygons must be lists of >= 3 (x, y) points")
    else:
        raise fail(f"detection {i}: segmentation is {_kind(seg)}, not RLE or polygons")
