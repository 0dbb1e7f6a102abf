"""Fast, exact COCO evaluation, and the ``feataug coco-eval`` command.

One concern: COCO evaluation (input checks, the two backends, the report, the Detectron2
evaluator that uses it).

The numbers come from ``faster-coco-eval`` (C++ matching and accumulation) when it is importable
and from pycocotools otherwise; both give the same 12 summary statistics. faster-coco-eval runs
with its pycocotools-compatible settings (no LVIS rules, no separate evaluate/accumulate pass, no
extra matching statistics).

The input files are checked before evaluation, so a wrong file gets one line naming it and the
problem instead of a traceback from deep inside the COCO API::

    feataug coco-eval --gt instances_val2017.json --results coco_instances_results.json

Results are evaluated exactly as pycocotools' ``COCO.loadRes`` reads them. In particular, for
``segm`` results that also carry a ``bbox``, the box area decides small / medium / large;
Detectron2's own evaluator (and :class:`FastCOCOEvaluator`) drops the boxes to use mask areas.

``FastCOCOEvaluator`` (imported lazily, it needs Detectron2) is a Detectron2 ``DatasetEvaluator``
that evaluates bbox / segm through :func:`run_cocoeval` (faster-coco-eval's own API), with the
results dict of Detectron2's ``COCOEvaluator``; nothing of Detectron2 is patched.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import logging
import math
import numbers
import os
import sys
from typing import Any

import numpy as np

from pretrain.errors import DataError
from pretrain.utils.io import check_output
from transfer.coco_checks import check_unique_ids

STAT_NAMES = tuple("AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl".split())
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("faster-coco-eval", "pycocotools")

PathLike = str | os.PathLike
logger = logging.getLogger(__name__)


class COCOEvalError(DataError, ValueError):
    """A ground-truth or results file that cannot be evaluated; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Loading and checking the inputs
# ---------------------------------------------------------------------------------------------


def _read_json(path: PathLike) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as e:
        raise COCOEvalError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise COCOEvalError(f"{path}: not valid JSON: {e}") from None


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


_BOX_FIELDS = ("x", "y", "width", "height")


def _box_problem(box) -> str | None:
    """What is wrong with a box of 4 numbers [x, y, width, height], or None."""
    for j, v in enumerate(box):
        if not _finite(v):
            return f"bbox[{j}] ({_BOX_FIELDS[j]}) = {_num(v)}; box numbers must be finite"
    for j in (2, 3):
        if box[j] < 0:
            return f"bbox[{j}] ({_BOX_FIELDS[j]}) = {box[j]!r}; width and height must be >= 0"
    return None


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def _is_id(v: Any) -> bool:
    """A COCO id: an integer (or a string), never a list, an object or a boolean."""
    return isinstance(v, int | str) and not isinstance(v, bool)


def load_gt(path: PathLike) -> dict:
    """Read a COCO ground-truth file and check its three sections."""
    gt = _read_json(path)
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
    _check_iou_type(iou_type)
    if iou_type == "segm":
        for i, img in enumerate(gt["images"]):
            if "height" not in img or "width" not in img:
                raise COCOEvalError(f"{name}: images[{i}] lacks 'height'/'width' (needed for segm)")
    image_ids = {img["id"] for img in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    need = ("id", "image_id", "category_id", "area", "iscrowd", _REGION[iou_type])
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict):
            raise COCOEvalError(f"{name}: annotations[{i}] is {_kind(ann)}, not an object")
        missing = [k for k in need if k not in ann]
        if missing:
            raise COCOEvalError(f"{name}: annotations[{i}] lacks {', '.join(map(repr, missing))}")
        for key in ("id", "image_id", "category_id"):
            if not _is_id(ann[key]):
                raise COCOEvalError(f"{name}: annotations[{i}] has {key} {_short(ann[key])}; an "
                                    "id is an integer")
        if ann["image_id"] not in image_ids:
            raise COCOEvalError(
                f"{name}: annotations[{i}] names image_id {ann['image_id']!r}, not in 'images'"
            )
        if ann["category_id"] not in category_ids:  # the evaluators would drop it silently
            raise COCOEvalError(f"{name}: annotations[{i}] names category_id "
                                f"{ann['category_id']!r}, not in 'categories'")
        if not (_is_number(ann["area"]) and _finite(ann["area"]) and ann["area"] >= 0):
            raise COCOEvalError(f"{name}: annotations[{i}] has area {_short(ann['area'])}; an "
                                "area is a finite number >= 0")
        crowd = ann["iscrowd"]
        if not (isinstance(crowd, bool) or (_is_number(crowd) and crowd in (0, 1))):
            raise COCOEvalError(f"{name}: annotations[{i}] has iscrowd {_short(ann['iscrowd'])}; "
                                "it is 0 or 1")
        box = ann.get("bbox")
        if iou_type == "bbox" and not (
            isinstance(box, list | tuple) and len(box) == 4 and all(map(_is_number, box))
        ):
            raise COCOEvalError(
                f"{name}: annotations[{i}] has bbox {_short(box)}; a box is 4 numbers"
            )
        problem = _box_problem(box) if iou_type == "bbox" else None
        if problem:
            raise COCOEvalError(f"{name}: annotations[{i}] has {problem}")


_REGION = {"bbox": "bbox", "segm": "segmentation"}


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")


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
    with a warning. Returns the detections (not copies; :func:`run_cocoeval` copies what it
    edits).
    """
    _check_iou_type(iou_type)
    if name is None:
        name = "results" if isinstance(results, list) else str(results)
    dts = results if isinstance(results, list) else _read_json(results)

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
    need = ("image_id", "category_id", "score", _REGION[iou_type])
    need_keys = set(need)
    unknown = {"image_id": [], "category_id": []}
    with_box = 0
    for i, d in enumerate(dts):
        if not isinstance(d, dict):
            raise fail(f"detection {i} is {_kind(d)}, not an object")
        if not need_keys <= d.keys():
            missing = [k for k in need if k not in d]
            why = f" (needed for --iou-type {iou_type})" if missing == [need[-1]] else ""
            raise fail(f"detection {i} lacks {', '.join(map(repr, missing))}{why}")
        if not _is_number(d["score"]):
            raise fail(f"detection {i} has a score of {_kind(d['score'])}, not a number")
        if not _finite(d["score"]):
            raise fail(f"detection {i} has score {_num(d['score'])}; scores must be finite")
        for key in ("image_id", "category_id"):
            if not _is_id(d[key]):
                raise fail(f"detection {i} has {key} {_short(d[key])}; an id is an integer")
        if d["image_id"] not in images:
            unknown["image_id"].append(i)
        if d["category_id"] not in category_ids:
            unknown["category_id"].append(i)
        if "bbox" in d:
            with_box += 1
            box = d["bbox"]
            if not (isinstance(box, list | tuple) and len(box) == 4 and all(map(_is_number, box))):
                raise fail(
                    f"detection {i} has bbox {_short(box)}; a box is 4 numbers [x, y, width, height]"
                )
            problem = _box_problem(box)
            if problem:
                raise fail(f"detection {i} has {problem}")
    for key, bad in unknown.items():
        if bad:
            i = bad[0]
            raise fail(
                f"detection {i} names {key} {dts[i][key]!r}, which is not in {gt_name} "
                f"({len(bad)} of {len(dts)} detections name unknown {key}s)"
            )
    if iou_type == "segm":
        if 0 < with_box < len(dts):
            raise fail("some detections carry a 'bbox' and some do not; give all or none")
        for i, d in enumerate(dts):
            _check_segmentation(d["segmentation"], images[d["image_id"]], with_box > 0, i, fail)
    return dts


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


def _short(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, list | tuple | dict | str | int | float) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def available_backend() -> str:
    """``"faster-coco-eval"`` when it imports, else ``"pycocotools"``."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return "pycocotools"
    return "faster-coco-eval"


def _silent(*args, **kwargs) -> None:
    pass


def run_cocoeval(
    gt: dict,
    dts: list[dict],
    iou_type: str = "bbox",
    backend: str | None = None,
    img_ids: list | None = None,
):
    """COCO.loadRes + COCOeval evaluate/accumulate/summarize, with no input checks.

    ``gt`` and ``dts`` are not modified; ``img_ids`` restricts the evaluation to those images
    (``params.imgIds``). Returns the COCOeval object (``.stats``, ``.eval``, ``.params``) of the
    chosen backend. This is the part a benchmark times against pycocotools.
    """
    backend = backend or available_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    # loadRes and COCOeval write into the annotation dicts; give them copies.
    gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    dts = [dict(d) for d in dts]
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO

        coco_gt = COCO(gt, print_function=_silent)
        coco_dt = coco_gt.loadRes(dts)
        ev = _faster_cocoeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return ev
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dts:
            coco_dt = coco_gt.loadRes(dts)
        else:  # loadRes fails on an empty list; no detections is a result
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": gt["images"],
                "categories": gt["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _faster_cocoeval(coco_gt, coco_dt, iou_type: str):
    """faster-coco-eval's COCOeval with the settings that reproduce pycocotools exactly."""
    from faster_coco_eval import COCOeval_faster

    return COCOeval_faster(
        coco_gt,
        coco_dt,
        iou_type,
        print_function=_silent,
        extra_calc=False,
        lvis_style=False,
        separate_eval=False,
    )


def evaluate(
    gt_json: PathLike | dict,
    results: PathLike | list,
    iou_type: str = "bbox",
    backend: str | None = None,
) -> dict:
    """COCO-evaluate ``results`` (a path or a list of detections) against ``gt_json``.

    Returns ``{"iou_type", "backend", "stats": {AP, AP50, ..., ARl}, "per_category":
    [{"id", "name", "AP"}, ...]}``. Values are pycocotools' (0..1; -1 where undefined, e.g. a
    category without ground truth). Raises :class:`COCOEvalError` for unusable inputs.
    """
    _check_iou_type(iou_type)
    if isinstance(gt_json, dict):
        gt, gt_name = gt_json, "ground truth"
    else:
        gt, gt_name = load_gt(gt_json), str(gt_json)
    check_gt(gt, iou_type, name=gt_name)
    dts = load_results(gt, results, iou_type, gt_name=gt_name)
    backend = backend or available_backend()
    ev = run_cocoeval(gt, dts, iou_type, backend)
    return _summary(ev, gt, iou_type, backend)


def _summary(ev, gt: dict, iou_type: str, backend: str) -> dict:
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in gt["categories"]}
    # precision: [T iou thresholds, R recall thresholds, K categories, A areas, M maxDets]
    precision = ev.eval["precision"]
    per_category = []
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", maxDets 100
        p = p[p > -1]
        ap = float(np.mean(p)) if p.size else -1.0
        per_category.append({"id": int(cat_id), "name": names[int(cat_id)], "AP": ap})
    stats = dict(zip(STAT_NAMES, map(float, ev.stats[: len(STAT_NAMES)]), strict=True))
    return {"iou_type": iou_type, "backend": backend, "stats": stats, "per_category": per_category}


def _pct(v: float) -> str:
    return "n/a" if v < 0 or math.isnan(v) else f"{100 * v:.2f}"


def format_report(result: dict, columns: int = 3) -> str:
    """The 12 statistics and a per-category AP table (in %), as GitHub-style pipe tables."""
    from tabulate import tabulate

    def table(rows, headers):
        align = ("left", "right") * (len(headers) // 2)
        return tabulate(rows, headers, "pipe", colalign=align, disable_numparse=True)

    stats = table([(k, _pct(v)) for k, v in result["stats"].items()], ["metric", "value (%)"])
    cells = [(c["name"], _pct(c["AP"])) for c in result["per_category"]]
    n = max(1, min(columns, len(cells)))  # (category, AP) pairs per row
    rows = [sum(cells[i : i + n], ()) for i in range(0, len(cells), n)]
    per_category = table(rows, ["category", "AP (%)"] * n)
    kind = result["iou_type"]
    return (
        f"COCO {kind} evaluation ({result['backend']})\n\n{stats}\n\n"
        f"Per-category {kind} AP:\n\n{per_category}"
    )


# ---------------------------------------------------------------------------------------------
# Detectron2 evaluator
# ---------------------------------------------------------------------------------------------


D2_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOEvaluator's, in percent


def detectron2_results(summary: dict, class_names: dict[int, str] | None = None) -> dict:
    """:func:`evaluate`'s summary as Detectron2's ``COCOEvaluator`` reports it: the six AP
    statistics in percent (NaN where pycocotools gives -1), and ``AP-<class>`` per category when
    there is more than one. ``class_names``: category id -> name (default: the ground truth's).
    """
    pct = lambda v: 100.0 * v if v >= 0 else float("nan")  # noqa: E731
    out = {k: pct(summary["stats"][k]) for k in D2_METRICS}
    cats = summary["per_category"]
    if len(cats) > 1:
        names = class_names or {}
        out |= {f"AP-{names.get(c['id'], c['name'])}": pct(c["AP"]) for c in cats}
    return out


@functools.cache
def _fast_coco_evaluator_class():
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets.coco import convert_to_coco_json
    from detectron2.evaluation import DatasetEvaluator
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.utils import comm
    from detectron2.utils.file_io import PathManager

    from pretrain.utils.io import atomic_write_text

    class FastCOCOEvaluator(DatasetEvaluator):
        """COCO bbox / segm AP of a Detectron2 model, computed by :func:`run_cocoeval`.

        Collects predictions as Detectron2's ``COCOEvaluator`` does (``instances_to_coco_json``,
        category ids mapped back to the dataset's), writes ``coco_instances_results.json`` in
        ``output_dir``, and evaluates each task with faster-coco-eval's ``COCO`` /
        ``COCOeval_faster`` (its pycocotools-compatible settings), or pycocotools when
        ``use_fast_impl=False`` or faster-coco-eval is missing. ``segm`` drops the boxes, so mask
        areas decide small / medium / large, as Detectron2 does. Returns
        ``{task: {AP, AP50, AP75, APs, APm, APl, AP-<class>...}}`` in percent
        (:func:`detectron2_results`); no detections at all give AP 0, as ``feataug coco-eval``.
        """

        def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                     use_fast_impl=True, allow_cached_coco=True):  # fmt: skip
            for task in tasks or ():
                _check_iou_type(task)
            self._tasks = tuple(tasks) if tasks else None
            self._distributed = distributed
            self._output_dir = output_dir
            self._backend = available_backend() if use_fast_impl else "pycocotools"
            meta = MetadataCatalog.get(dataset_name)
            if not hasattr(meta, "json_file"):  # Detectron2-format records: convert them once
                if output_dir is None:
                    raise ValueError(f"{dataset_name}: output_dir is needed to convert it to COCO")
                cache = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
                convert_to_coco_json(dataset_name, cache, allow_cached=allow_cached_coco)
                meta.json_file = cache
            self._json = PathManager.get_local_path(meta.json_file)
            gt = _read_json(self._json)
            # a test-server split (no 'annotations'): predictions are written, not evaluated
            self._gt = None if isinstance(gt, dict) and "annotations" not in gt else gt
            if self._gt is not None:
                check_gt(self._gt, name=self._json)
            ids = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
            self._to_dataset_id = {v: k for k, v in ids.items()} if ids else None
            classes = getattr(meta, "thing_classes", None)
            self._names = (
                {k: classes[v] for k, v in ids.items()} if ids and classes else None
            )
            self._dataset_name = dataset_name
            self.reset()

        def reset(self):
            self._images = []  # per image: its detections, COCO results format

        def process(self, inputs, outputs):
            for inp, out in zip(inputs, outputs, strict=True):
                if "instances" in out:
                    instances = out["instances"].to("cpu")
                    self._images.append(instances_to_coco_json(instances, inp["image_id"]))

        def evaluate(self, img_ids=None):
            images = self._images
            if self._distributed:
                comm.synchronize()
                images = list(itertools.chain(*comm.gather(images, dst=0)))
                if not comm.is_main_process():
                    return {}
            if not images:
                logger.warning(f"{self._dataset_name}: no predictions to evaluate")
                return {}
            dts = [dict(d) for d in itertools.chain(*images)]
            if self._to_dataset_id is not None:
                for d in dts:
                    if d["category_id"] not in self._to_dataset_id:
                        raise COCOEvalError(
                            f"{self._dataset_name}: a prediction has class {d['category_id']}, "
                            f"but the dataset has {len(self._to_dataset_id)} classes"
                        )
                    d["category_id"] = self._to_dataset_id[d["category_id"]]
            if self._output_dir:
                atomic_write_text(
                    os.path.join(self._output_dir, "coco_instances_results.json"), json.dumps(dts)
                )
            if self._gt is None:
                logger.info(f"{self._json}: no annotations; predictions written, not evaluated")
                return {}
            tasks = self._tasks or (
                ("bbox", "segm") if any("segmentation" in d for d in dts) else ("bbox",)
            )
            results = {}
            for task in sorted(tasks):
                check_gt(self._gt, task, name=self._json)
                task_dts = [
                    {k: v for k, v in d.items() if k != "bbox"} for d in dts
                ] if task == "segm" else dts  # fmt: skip
                ev = run_cocoeval(self._gt, task_dts, task, self._backend, img_ids=img_ids)
                summary = _summary(ev, self._gt, task, self._backend)
                logger.info(f"{self._dataset_name}: " + format_report(summary))
                results[task] = detectron2_results(summary, self._names)
            return results

    FastCOCOEvaluator.__module__ = __name__
    FastCOCOEvaluator.__qualname__ = "FastCOCOEvaluator"
    return FastCOCOEvaluator


def __getattr__(name: str):
    # Detectron2 (and torch) load only when the evaluator is asked for, so `feataug coco-eval`
    # starts in well under a second.
    if name == "FastCOCOEvaluator":
        return _fast_coco_evaluator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, metavar="GT.json", help="COCO ground-truth file")
    parser.add_argument(
        "--results",
        required=True,
        metavar="DT.json",
        help="COCO results file (a list of detections)",
    )
    parser.add_argument("--iou-type", choices=IOU_TYPES, default="bbox", help="default: bbox")
    parser.add_argument("--json-out", metavar="F", help="also write the numbers to this JSON file")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --json-out replace an existing file (never GT or DT)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="default: faster-coco-eval when installed, else pycocotools",
    )


def main(args: argparse.Namespace) -> int:
    if args.json_out:  # before the evaluation: nothing is computed to be thrown away
        check_output(args.json_out, inputs={"--gt": args.gt, "--results": args.results},
                     overwrite=args.overwrite, flag="--json-out", error=COCOEvalError)
    result = evaluate(args.gt, args.results, args.iou_type, backend=args.backend)
    result = {"gt": str(args.gt), "results": str(args.results), **result}
    print(format_report(result))
    if args.json_out:
        from pretrain.utils.io import atomic_write_text

        try:
            atomic_write_text(args.json_out, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            print(f"feataug coco-eval: error: {args.json_out}: cannot write: {e}", file=sys.stderr)
            return 1
    return 0
