"""Detection evaluators: PASCAL VOC AP from the dataset's own records, and COCO AP backed by
faster-coco-eval."""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.pascal_voc_evaluation import voc_ap
from detectron2.structures import BoxMode
from detectron2.utils import comm

from transfer.coco_evaluator import FastCOCOEvaluator

__all__ = ["VOCEvaluator", "build_coco_evaluator", "voc_average_precisions"]

logger = logging.getLogger(__name__)


def voc_average_precisions(
    detections: list[tuple[str, float, np.ndarray]],
    gt_boxes: dict[str, np.ndarray],
    gt_difficult: dict[str, np.ndarray],
    iou_thresholds: list[float],
    use_07_metric: bool,
) -> list[float]:
    """PASCAL VOC AP of one class at each IoU threshold, with the devkit's matching rules.

    ``detections``: ``(image_id, score, box)`` with ``box`` = (x1, y1, x2, y2) in VOC pixel units
    (1-based, inclusive: a box's width is ``x2 - x1 + 1``). ``gt_boxes[image_id]``: (G, 4) in the
    same units, ``gt_difficult[image_id]``: (G,) bool. Detections go in decreasing score; each
    takes the ground truth of highest IoU in its image: IoU > threshold and not yet taken is a true
    positive, already taken a false positive, a difficult box neither. That best match does not
    depend on the threshold, so it is computed once. NaN when the class has no non-difficult
    ground truth.
    """
    npos = int(sum((~d).sum() for d in gt_difficult.values()))
    if npos == 0:
        return [float("nan")] * len(iou_thresholds)
    order = np.argsort(-np.array([d[1] for d in detections], dtype=np.float64))
    best_iou = np.full(len(order), -np.inf)
    best_gt = np.full(len(order), -1)
    for rank, i in enumerate(order):
        image_id, _, bb = detections[i]
        gt = gt_boxes.get(image_id, np.zeros((0, 4)))
        if len(gt):
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            area_d = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
            area_g = (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
            iou = inter / (area_d + area_g - inter)
            best_gt[rank] = int(np.argmax(iou))
            best_iou[rank] = iou[best_gt[rank]]
    image_ids = [detections[i][0] for i in order]
    aps = []
    for threshold in iou_thresholds:
        taken = {k: np.zeros(len(v), dtype=bool) for k, v in gt_boxes.items()}
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for rank, (image_id, j) in enumerate(zip(image_ids, best_gt, strict=True)):
            if best_iou[rank] <= threshold:
                fp[rank] = 1.0
            elif gt_difficult[image_id][j]:
                continue
            elif taken[image_id][j]:
                fp[rank] = 1.0
            else:
                tp[rank] = 1.0
                taken[image_id][j] = True
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(float(voc_ap(recall, precision, use_07_metric)))
    return aps


class VOCEvaluator(DatasetEvaluator):
    """PASCAL VOC AP as Detectron2's ``PascalVOCDetectionEvaluator`` computes it, with ground
    truth taken from the dataset's records.

    Detectron2's version re-reads every XML and calls ``int()`` on coordinates and on
    ``<difficult>``, so float coordinates or an empty ``<difficult/>`` (common in exported
    annotations) crash it. This one collects predictions as Detectron2's does (one line per
    detection, ``"image_id score xmin ymin xmax ymax"`` in VOC's 1-based units, rounded the same
    way) and evaluates them against ``DatasetCatalog.get(name)`` (see
    ``transfer.datasets.load_voc``, which keeps the ``difficult`` flags), with the same matching
    rules and ``voc_ap``. On integer VOC data the numbers equal Detectron2's.

    Returns ``{"bbox": {"AP", "AP50", "AP75"}}`` in percent: AP averages IoU 0.50:0.95; the 2007
    11-point AP when the metadata's ``year`` is 2007, area under the PR curve otherwise. Classes
    without ground truth in the split are left out of the means (Detectron2 would return NaN).
    """

    def __init__(self, dataset_name: str):
        meta = MetadataCatalog.get(dataset_name)
        self.dataset_name = dataset_name
        self.class_names = meta.thing_classes
        self.is_2007 = getattr(meta, "year", 2012) == 2007
        self.predictions: dict[int, list[str]] = defaultdict(list)  # class id -> lines

    def reset(self):
        self.predictions = defaultdict(list)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs, strict=True):
            instances = out["instances"].to("cpu")
            boxes = instances.pred_boxes.tensor.numpy()
            scores = instances.scores.tolist()
            classes = instances.pred_classes.tolist()
            for (xmin, ymin, xmax, ymax), score, cls in zip(boxes, scores, classes, strict=True):
                # VOC units: the inverse of the loader's -1 on xmin / ymin
                self.predictions[cls].append(f"{inp['image_id']} {score:.3f} {xmin + 1:.1f} "
                                             f"{ymin + 1:.1f} {xmax:.1f} {ymax:.1f}")

    def ground_truth(self):
        """Per class: ({image_id: (G, 4) VOC-unit boxes}, {image_id: (G,) difficult})."""
        boxes = [defaultdict(list) for _ in self.class_names]
        difficult = [defaultdict(list) for _ in self.class_names]
        image_ids = []
        for record in DatasetCatalog.get(self.dataset_name):
            image_id = record["image_id"]
            image_ids.append(image_id)
            for ann in record.get("annotations", []):
                box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
                c = ann["category_id"]
                # back to VOC units: inverse of the loader's -1 on xmin/ymin
                boxes[c][image_id].append([box[0] + 1.0, box[1] + 1.0, box[2], box[3]])
                difficult[c][image_id].append(bool(ann.get("difficult", False)))
        out = []
        for c in range(len(self.class_names)):
            b = {i: np.array(boxes[c][i], dtype=np.float64).reshape(-1, 4) for i in image_ids}
            d = {i: np.array(difficult[c][i], dtype=bool) for i in image_ids}
            out.append((b, d))
        return out

    def evaluate(self):
        all_predictions = comm.gather(self.predictions, dst=0)
        if not comm.is_main_process():
            return None
        lines = defaultdict(list)
        for per_rank in all_predictions:
            for cls_id, cls_lines in per_rank.items():
                lines[cls_id].extend(cls_lines)
        logger.info(
            f"Evaluating {self.dataset_name} with the VOC{2007 if self.is_2007 else 2012} AP "
            "(Python devkit rules, not the official Matlab code)"
        )
        aps = defaultdict(list)  # IoU threshold in percent -> AP of each class with ground truth
        for cls_id, (gt_boxes, gt_difficult) in enumerate(self.ground_truth()):
            detections = []
            for line in lines.get(cls_id, []):
                image_id, score, *box = line.split(" ")
                detections.append((image_id, float(score), np.array(box, dtype=np.float64)))
            thresholds = list(range(50, 100, 5))
            per_iou = voc_average_precisions(
                detections, gt_boxes, gt_difficult, [t / 100.0 for t in thresholds], self.is_2007
            )
            for thresh, ap in zip(thresholds, per_iou, strict=True):
                if not np.isnan(ap):
                    aps[thresh].append(ap * 100)
        if not aps:
            logger.warning(f"{self.dataset_name}: no ground-truth boxes; AP is NaN")
            return OrderedDict(
                bbox={"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
            )
        mean_ap = {t: float(np.mean(v)) for t, v in aps.items()}
        return OrderedDict(
            bbox={
                "AP": float(np.mean(list(mean_ap.values()))),
                "AP50": mean_ap[50],
                "AP75": mean_ap[75],
            }
        )


def build_coco_evaluator(dataset_name: str, tasks: tuple[str, ...], output_dir: str | None):
    """COCO evaluation backed by faster-coco-eval (``transfer.coco_evaluator.FastCOCOEvaluator``;
    Detectron2's compiled COCOeval is not built here)."""
    return FastCOCOEvaluator(dataset_name, tasks=tasks, output_dir=output_dir)
