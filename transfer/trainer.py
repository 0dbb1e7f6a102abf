"""Detectron2 trainer for fine-tuning converted backbones.

:class:`Trainer` is Detectron2's ``DefaultTrainer`` with

* evaluators (``transfer/evaluation.py``) picked by the test set's ``evaluator_type``: the VOC one for
  ``"pascal_voc"``, the COCO evaluator (``bbox``, plus ``segm`` when ``MODEL.MASK_ON``) for
  ``"coco"``;
* precise BN (Detectron2's ``PreciseBN`` hook, on when ``TEST.PRECISE_BN.ENABLED``; it runs
  before every evaluation and at the end of training);
* mixed precision when ``SOLVER.AMP.ENABLED``: Detectron2's ``AMPTrainer`` on CUDA,
  :class:`CPUAutocastTrainer` (bfloat16 autocast) on CPUs with native bfloat16; the dtype follows
  ``SOLVER.AMP.PRECISION`` by the rule of ``pretrain/utils/amp.py`` (``auto``: bfloat16 where
  the device computes it natively, float16 on older GPUs, float32 on other CPUs).
"""

from __future__ import annotations

import logging
import os
import time

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer

import transfer.modeling  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from pretrain.utils.amp import amp_dtype
from transfer.evaluation import VOCEvaluator, build_coco_evaluator

__all__ = ["CPUAutocastTrainer", "Trainer"]

logger = logging.getLogger(__name__)


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass runs under ``torch.autocast("cpu", dtype)``.

    bfloat16 has float32's exponent range, so no loss scaling is needed; the backward pass and
    the optimizer step run outside autocast, and parameters stay float32.
    """

    def __init__(self, model, data_loader, optimizer, dtype: torch.dtype = torch.bfloat16):
        super().__init__(model, data_loader, optimizer)
        self.dtype = dtype

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=self.dtype):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with VOC/COCO evaluator selection and CPU/CUDA mixed precision."""

    def __init__(self, cfg):
        # Detectron2 would build its CUDA-only AMPTrainer; build the plain loop, then choose.
        plain = cfg.clone()
        plain.defrost()
        plain.SOLVER.AMP.ENABLED = False
        super().__init__(plain)
        self.cfg.defrost()
        self.cfg.SOLVER.AMP.ENABLED = cfg.SOLVER.AMP.ENABLED
        self.cfg.freeze()
        if cfg.SOLVER.AMP.ENABLED:  # replace the step loop; model, data and optimizer stay
            loop = self._trainer
            device = "cuda" if cfg.MODEL.DEVICE.startswith("cuda") else "cpu"
            dtype = amp_dtype(cfg.SOLVER.AMP.PRECISION, device, "SOLVER.AMP.PRECISION")
            if dtype is None:
                logger.warning(
                    "Mixed precision: off, this CPU has no native bfloat16 (float32 is faster here; "
                    "SOLVER.AMP.PRECISION bfloat16 forces it)"
                )
                return
            if device == "cuda":
                self._trainer = AMPTrainer(
                    loop.model, loop.data_loader, loop.optimizer, precision=dtype
                )
            else:
                self._trainer = CPUAutocastTrainer(
                    loop.model, loop.data_loader, loop.optimizer, dtype
                )
            loop.concurrent_executor.shutdown(wait=False)
            logger.info(f"Mixed precision: {type(self._trainer).__name__} with {dtype}")

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        kind = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None)
        if kind == "pascal_voc":
            return VOCEvaluator(dataset_name)
        if kind == "coco":
            tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
            output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
            return build_coco_evaluator(dataset_name, tasks, output_folder)
        raise ValueError(
            f"dataset {dataset_name!r} has evaluator_type {kind!r}; register it with "
            "--register-voc or --register-coco (evaluator_type pascal_voc or coco)"
        )
