"""Exact COCO evaluation of a results file, and the ``feataug coco-eval`` command::

    feataug coco-eval --gt instances_val2017.json --results coco_instances_results.json

The inputs are checked first (:mod:`transfer.coco_checks`: one line naming the file and the
problem), then evaluated by faster-coco-eval, or pycocotools where it is missing
(:mod:`transfer.coco_backends`: both give the same 12 summary statistics).

Results are evaluated exactly as pycocotools' ``COCO.loadRes`` reads them. In particular, for
``segm`` results that also carry a ``bbox``, the box area decides small / medium / large;
Detectron2's own evaluator (and :class:`~transfer.coco_evaluator.FastCOCOEvaluator`, the
Detectron2 evaluator built on the same backends) drops the boxes to use mask areas.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from pretrain.utils.io import check_output
from transfer.coco_backends import (
    BACKENDS,
    D2_METRICS,
    STAT_NAMES,
    available_backend,
    detectron2_results,
    run_cocoeval,
    summarize,
)
from transfer.coco_checks import (
    IOU_TYPES,
    COCOEvalError,
    check_gt,
    check_iou_type,
    load_gt,
    load_results,
)

__all__ = ["BACKENDS", "D2_METRICS", "IOU_TYPES", "STAT_NAMES", "COCOEvalError",
           "available_backend", "check_gt", "detectron2_results",
           "evaluate", "format_report", "load_gt", "load_results", "run_cocoeval"]  # fmt: skip

PathLike = str | os.PathLike


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
    check_iou_type(iou_type)
    if isinstance(gt_json, dict):
        gt, gt_name = gt_json, "ground truth"
    else:
        gt, gt_name = load_gt(gt_json), str(gt_json)
    check_gt(gt, iou_type, name=gt_name)
    dts = load_results(gt, results, iou_type, gt_name=gt_name)
    backend = backend or available_backend()
    ev = run_cocoeval(gt, dts, iou_type, backend)
    return summarize(ev, gt, iou_type, backend)


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


def __getattr__(name: str):
    # The Detectron2 evaluator imports Detectron2 (and torch): only when it is asked for, so
    # `feataug coco-eval` does not load them.
    if name == "FastCOCOEvaluator":
        from transfer.coco_evaluator import FastCOCOEvaluator

        return FastCOCOEvaluator
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
