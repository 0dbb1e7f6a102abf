"""COCOeval by faster-coco-eval or pycocotools, and the numbers read from it.

The numbers come from ``faster-coco-eval`` (C++ matching and accumulation) when it is importable
and from pycocotools otherwise; both give the same 12 summary statistics. faster-coco-eval runs
with its pycocotools-compatible settings (no LVIS rules, no separate evaluate/accumulate pass, no
extra matching statistics).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

__all__ = ["BACKENDS", "D2_METRICS", "STAT_NAMES", "available_backend", "detectron2_results",
           "run_cocoeval", "summarize"]  # fmt: skip

STAT_NAMES = tuple("AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl".split())
BACKENDS = ("faster-coco-eval", "pycocotools")
D2_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOEvaluator's, in percent


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
    """COCO.loadRes + COCOeval evaluate/accumulate/summarize, with no input checks (the callers
    check first: :func:`transfer.coco_eval.evaluate`, the Detectron2 evaluator).

    ``gt`` and ``dts`` are not modified; ``img_ids`` restricts the evaluation to those images
    (``params.imgIds``). Returns the COCOeval object (``.stats``, ``.eval``, ``.params``) of the
    chosen backend.
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
        ev = _faster_cocoeval(coco_gt, coco_gt.loadRes(dts), iou_type)
        return _run(ev, img_ids)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        return _run(_pycocotools_cocoeval(gt, dts, iou_type), img_ids)


def _run(ev, img_ids: list | None):
    """``ev`` evaluated, accumulated and summarized (over ``img_ids`` when given)."""
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


def _pycocotools_cocoeval(gt: dict, dts: list[dict], iou_type: str):
    """pycocotools' COCOeval of ``dts`` against ``gt`` (not run yet)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
    return COCOeval(coco_gt, coco_dt, iou_type)


def summarize(ev, gt: dict, iou_type: str, backend: str) -> dict:
    """``{"iou_type", "backend", "stats": {AP, AP50, ..., ARl}, "per_category": [{"id", "name",
    "AP"}, ...]}`` of an evaluated COCOeval ``ev`` (pycocotools' values: 0..1, -1 where
    undefined)."""
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


def detectron2_results(summary: dict, class_names: dict[int, str] | None = None) -> dict:
    """:func:`summarize`'s result as Detectron2's ``COCOEvaluator`` reports it: the six AP
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
