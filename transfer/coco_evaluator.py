"""COCO AP of a Detectron2 model, computed by faster-coco-eval (:class:`FastCOCOEvaluator`).

A Detectron2 ``DatasetEvaluator`` (its public ``reset`` / ``process`` / ``evaluate``) that
collects predictions as Detectron2's ``COCOEvaluator`` does and evaluates them with
:func:`transfer.coco_backends.run_cocoeval`, returning the results dict of ``COCOEvaluator``.
Detectron2's compiled ``COCOeval_opt`` is not used, and nothing of Detectron2 is patched.
"""

from __future__ import annotations

import itertools
import json
import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from pretrain.utils.io import atomic_write_text
from transfer.coco_backends import available_backend, detectron2_results, run_cocoeval, summarize
from transfer.coco_checks import COCOEvalError, check_gt, check_iou_type, read_json
from transfer.coco_eval import format_report

__all__ = ["FastCOCOEvaluator"]

logger = logging.getLogger(__name__)


class FastCOCOEvaluator(DatasetEvaluator):
    """COCO bbox / segm AP of a Detectron2 model, computed by :func:`run_cocoeval`.

    Collects predictions as Detectron2's ``COCOEvaluator`` does (``instances_to_coco_json``,
    category ids mapped back to the dataset's), writes ``coco_instances_results.json`` in
    ``output_dir``, and evaluates each task with faster-coco-eval's ``COCO`` /
    ``COCOeval_faster`` (its pycocotools-compatible settings), or pycocotools when
    ``use_fast_impl=False`` or faster-coco-eval is missing. ``segm`` drops the boxes, so mask
    areas decide small / medium / large, as Detectron2 does. Returns
    ``{task: {AP, AP50, AP75, APs, APm, APl, AP-<class>...}}`` in percent
    (:func:`transfer.coco_backends.detectron2_results`); no detections at all give AP 0, as
    ``feataug coco-eval``. The arguments are ``COCOEvaluator``'s.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 use_fast_impl=True, allow_cached_coco=True):  # fmt: skip
        for task in tasks or ():
            check_iou_type(task)
        self.dataset_name = dataset_name
        self.tasks = tuple(tasks) if tasks else None
        self.distributed = distributed
        self.output_dir = output_dir
        self.backend = available_backend() if use_fast_impl else "pycocotools"
        meta = MetadataCatalog.get(dataset_name)
        if not hasattr(meta, "json_file"):  # Detectron2-format records: convert them once
            if output_dir is None:
                raise ValueError(f"{dataset_name}: output_dir is needed to convert it to COCO")
            cache = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
            convert_to_coco_json(dataset_name, cache, allow_cached=allow_cached_coco)
            meta.json_file = cache
        self.json_file = PathManager.get_local_path(meta.json_file)
        gt = read_json(self.json_file)
        # a test-server split (no 'annotations'): predictions are written, not evaluated
        self.gt = None if isinstance(gt, dict) and "annotations" not in gt else gt
        if self.gt is not None:
            check_gt(self.gt, name=self.json_file)
        ids = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
        self.to_dataset_id = {v: k for k, v in ids.items()} if ids else None
        classes = getattr(meta, "thing_classes", None)
        self.class_names = {k: classes[v] for k, v in ids.items()} if ids and classes else None
        self.images: list[list[dict]] = []
        self.reset()

    def reset(self):
        self.images = []  # per image: its detections, COCO results format

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs, strict=True):
            if "instances" in out:
                instances = out["instances"].to("cpu")
                self.images.append(instances_to_coco_json(instances, inp["image_id"]))

    def evaluate(self, img_ids=None):
        images = self.images
        if self.distributed:
            comm.synchronize()
            images = list(itertools.chain(*comm.gather(images, dst=0)))
            if not comm.is_main_process():
                return {}
        if not images:
            logger.warning(f"{self.dataset_name}: no predictions to evaluate")
            return {}
        dts = self.dataset_ids([dict(d) for d in itertools.chain(*images)])
        if self.output_dir:
            atomic_write_text(
                os.path.join(self.output_dir, "coco_instances_results.json"), json.dumps(dts)
            )
        if self.gt is None:
            logger.info(f"{self.json_file}: no annotations; predictions written, not evaluated")
            return {}
        tasks = self.tasks or (
            ("bbox", "segm") if any("segmentation" in d for d in dts) else ("bbox",)
        )
        results = {}
        for task in sorted(tasks):
            check_gt(self.gt, task, name=self.json_file)
            task_dts = [
                {k: v for k, v in d.items() if k != "bbox"} for d in dts
            ] if task == "segm" else dts  # fmt: skip
            ev = run_cocoeval(self.gt, task_dts, task, self.backend, img_ids=img_ids)
            summary = summarize(ev, self.gt, task, self.backend)
            logger.info(f"{self.dataset_name}: " + format_report(summary))
            results[task] = detectron2_results(summary, self.class_names)
        return results

    def dataset_ids(self, dts: list[dict]) -> list[dict]:
        """``dts`` (edited in place) with the model's contiguous class ids mapped back to the
        dataset's category ids, where the dataset has such a mapping."""
        if self.to_dataset_id is None:
            return dts
        for d in dts:
            if d["category_id"] not in self.to_dataset_id:
                raise COCOEvalError(
                    f"{self.dataset_name}: a prediction has class {d['category_id']}, "
                    f"but the dataset has {len(self.to_dataset_id)} classes"
                )
            d["category_id"] = self.to_dataset_id[d["category_id"]]
        return dts
