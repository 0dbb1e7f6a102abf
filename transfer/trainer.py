"""Detectron2 trainer for fine-tuning converted backbones.

:class:`Trainer` is Detectron2's ``DefaultTrainer`` with

* evaluators (``transfer/evaluation.py``) picked by the test set's ``evaluator_type``: the VOC
  one for ``"pascal_voc"``, the COCO evaluator (``bbox``, plus ``segm`` when ``MODEL.MASK_ON``)
  for ``"coco"``;
* precise BN (Detectron2's ``PreciseBN`` hook, on when ``TEST.PRECISE_BN.ENABLED``; it runs
  before every evaluation and at the end of training);
* mixed precision when ``SOLVER.AMP.ENABLED``: Detectron2's ``AMPTrainer`` on CUDA,
  :class:`CPUAutocastTrainer` (bfloat16 autocast) on CPUs with native bfloat16; the dtype follows
  ``SOLVER.AMP.PRECISION`` by the rule of ``pretrain/utils/amp.py`` (``auto``: bfloat16 where
  the device computes it natively, float16 on older GPUs, float32 on other CPUs);
* weights and checkpoints loaded by :class:`transfer.checkpoint.SafeCheckpointer` (nothing from
  a file runs; resuming needs exactly this model);
* the last evaluation's results in :attr:`Trainer.eval_results` (also returned by ``train``);
* with ``LOGGER.WANDB``, a :class:`transfer.wandb_writer.WandbWriter` beside Detectron2's
  writers: the scalars and every evaluation's results in the W&B run of ``OUTPUT_DIR``, resumed
  when training resumes from a checkpoint.

Everything is done through ``DefaultTrainer``'s public methods (``build_hooks``, ``run_step``,
``state_dict``, ...), checked on Detectron2 0.7.2.
"""

from __future__ import annotations

import logging
import os
import time
import weakref

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import transfer.modeling  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from pretrain.utils.amp import amp_dtype
from transfer.checkpoint import SafeCheckpointer
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
        self.batches = None  # the iterator over data_loader, opened by the first step

    def reset_data_loader(self, data_loader_builder):
        super().reset_data_loader(data_loader_builder)
        self.batches = None

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        if self.batches is None:
            self.batches = iter(self.data_loader)
        data = next(self.batches)
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
        try:  # as SimpleTrainer: a failure to record metrics is logged with its traceback
            self.write_metrics(loss_dict, data_time, self.iter)
        except Exception:
            logger.exception("Exception in writing metrics: ")
            raise
        self.optimizer.step()


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with VOC/COCO evaluator selection, CPU/CUDA mixed precision, safe
    checkpoint loading and public evaluation results.

    Attributes:
        step_loop: the loop that runs each iteration under mixed precision (``AMPTrainer`` or
            :class:`CPUAutocastTrainer`, on the trainer's model, data and optimizer); None:
            ``DefaultTrainer``'s own ``SimpleTrainer``.
        eval_results: the last evaluation's results (``{}`` before one ran).
        wandb_writer: the :class:`~transfer.wandb_writer.WandbWriter` with ``LOGGER.WANDB`` on
            the main process, else None.
    """

    def __init__(self, cfg):
        # DefaultTrainer would build its CUDA-only AMPTrainer: it builds the plain loop, and the
        # mixed-precision one (step_loop) is chosen after.
        plain = cfg.clone()
        plain.defrost()
        plain.SOLVER.AMP.ENABLED = False
        self.eval_results = {}
        self.wandb_writer = None  # build_writers (main process, in DefaultTrainer.__init__)
        super().__init__(plain)
        self.cfg.defrost()
        self.cfg.SOLVER.AMP.ENABLED = cfg.SOLVER.AMP.ENABLED
        self.cfg.freeze()
        # DefaultTrainer (0.7.2) builds its DetectionCheckpointer in __init__, with no builder
        # to override: this one loads (its PeriodicCheckpointer hook keeps saving with the
        # first, which reads nothing).
        self.checkpointer = SafeCheckpointer(self.model, self.cfg.OUTPUT_DIR,
                                             trainer=weakref.proxy(self))
        self.step_loop = self.build_step_loop(self.cfg)

    def build_step_loop(self, cfg) -> SimpleTrainer | None:
        """The mixed-precision loop of ``SOLVER.AMP``, or None for the plain one."""
        if not cfg.SOLVER.AMP.ENABLED:
            return None
        device = "cuda" if cfg.MODEL.DEVICE.startswith("cuda") else "cpu"
        dtype = amp_dtype(cfg.SOLVER.AMP.PRECISION, device, "SOLVER.AMP.PRECISION")
        if dtype is None:
            logger.warning(
                "Mixed precision: off, this CPU has no native bfloat16 (float32 is faster here; "
                "SOLVER.AMP.PRECISION bfloat16 forces it)"
            )
            return None
        if device == "cuda":
            loop = AMPTrainer(self.model, self.data_loader, self.optimizer, precision=dtype)
        else:
            loop = CPUAutocastTrainer(self.model, self.data_loader, self.optimizer, dtype)
        logger.info(f"Mixed precision: {type(loop).__name__} with {dtype}")
        return loop

    def run_step(self):
        if self.step_loop is None:
            super().run_step()
        else:
            self.step_loop.iter = self.iter
            self.step_loop.run_step()

    def state_dict(self):
        state = super().state_dict()
        if isinstance(self.step_loop, AMPTrainer):  # the loss scale goes on from where it was
            state["grad_scaler"] = self.step_loop.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if isinstance(self.step_loop, AMPTrainer) and "grad_scaler" in state_dict:
            self.step_loop.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    def build_hooks(self):
        """``DefaultTrainer``'s hooks, its ``EvalHook`` calling :meth:`evaluate` (which keeps the
        results in :attr:`eval_results`)."""
        return [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate)
                if isinstance(h, hooks.EvalHook) else h for h in super().build_hooks()]

    def build_writers(self):
        """Detectron2's writers (console, ``metrics.json``, TensorBoard), and W&B with
        ``LOGGER.WANDB``."""
        writers = super().build_writers()
        if self.cfg.LOGGER.WANDB:
            from transfer.wandb_writer import WandbWriter

            self.wandb_writer = WandbWriter(self.cfg)
            writers.append(self.wandb_writer)
        return writers

    def evaluate(self) -> dict:
        """Evaluate the model on ``DATASETS.TEST`` (``DefaultTrainer.test``); the results are
        kept in :attr:`eval_results` (and W&B's summary) and returned."""
        self.eval_results = self.test(self.cfg, self.model)
        if self.wandb_writer is not None:
            self.wandb_writer.log_results(self.eval_results)
        return self.eval_results

    def train(self) -> dict:
        """Train from ``start_iter`` to ``max_iter``; returns :attr:`eval_results`.

        ``DefaultTrainer.train`` is ``TrainerBase.train`` over that range, then a check of its
        last results against ``TEST.EXPECTED_RESULTS``; this checks :attr:`eval_results`.
        A run resumed from a checkpoint goes on in its W&B run.
        """
        if self.wandb_writer is not None:
            self.wandb_writer.resume = self.start_iter > 0
        TrainerBase.train(self, self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert self.eval_results, "No evaluation results obtained during training!"
            verify_results(self.cfg, self.eval_results)
        return self.eval_results

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
