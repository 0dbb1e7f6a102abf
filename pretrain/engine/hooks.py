"""The hooks of a pretraining run: what happens around each step (``trainer.HookBase``).

``train_loop.PretrainTrainer.build_hooks`` registers them in this order, and the order matters:

1. ``LRScheduler``        before_step: the step's learning rate.
2. ``NonFiniteLossGuard`` after_step, at log lines and checkpoints: reads the step window (the
                          one place the host waits for the device) and stops the run on a
                          non-finite loss, before anything below logs or saves it.
3. ``MetricsWriter``      before_train: opens ``metrics.jsonl``; after_step, at log lines: writes
                          the window's means; after_train: closes, plots ``curves.png``.
4. ``WandbLogger``        only with ``LOGGER.WANDB``; before_train: opens (or resumes) the W&B
                          run and receives every record 3 writes from then on (so it comes
                          before 6, whose first record is written in before_train);
                          after_train: the final result, then closes the run.
5. ``Checkpointer``       after_step, at checkpoints: refuses non-finite weights, then writes
                          ``last.pth`` (and ``checkpoint_EPOCH.pth`` unless
                          ``SOLVER.CHECKPOINT_PERIOD`` is 0), with the run's provenance.
6. ``KnnMonitor``         before_train: the untrained trunk; after_step, every ``KNN.PERIOD``
                          epochs and at the end: kNN top-1 (every rank its share; rank 0
                          writes through 3).
7. ``ProgressBar``        rank 0's tqdm bar.

The RNG state saved by 5 is the one after the step and its log line, and 4 and 6 draw no
random numbers from the global generators, so a resumed run draws what an uninterrupted one
draws. Every rank runs every hook, so
the collective calls inside them (``any_across_ranks``, ``all_gather_object``, the kNN
monitor's gathers) come in the same order on all ranks.

What the hooks use of the trainer (``PretrainTrainer``): ``cfg``, ``model`` (the method,
unwrapped), ``optimizer``, ``scaler``, ``device``, ``out``, ``ipe`` (iterations per epoch),
``epoch`` (of the step just taken), ``skipped`` (unreadable image indices), ``window``
(``StepWindow``), ``log_due()`` / ``save_due()`` (the schedule), ``last_good()``,
``summary()`` (what ``train`` returns); they report
back through ``window_values``, ``last_record``, ``last_saved``, ``knn_top1`` and
``knn_top1_init``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..checkpoint import save_run
from ..errors import TrainingError
from ..evaluation import evaluate_knn
from ..solver import lr_factor, set_lr
from ..utils.dist import (
    all_gather_object,
    any_across_ranks,
    get_world_size,
    is_main_process,
)
from ..utils.tracking import open_run
from .metrics import Metrics, plot_curves
from .trainer import HookBase

__all__ = ["Checkpointer", "KnnMonitor", "LRScheduler", "MetricsWriter", "NonFiniteLossGuard",
           "ProgressBar", "WandbLogger"]

logger = logging.getLogger("pretrain")


class LRScheduler(HookBase):
    """Sets every step's learning rate before it runs: ``base_lr`` times ``solver.lr_factor``
    (linear warm-up over ``warmup`` iterations, then cosine or step decay); parameter groups
    marked ``fix_lr`` keep ``base_lr``."""

    def __init__(self, base_lr: float, warmup: int, schedule: str, steps: tuple[int, ...],
                 gamma: float) -> None:
        self.base_lr, self.warmup, self.schedule = base_lr, warmup, schedule
        self.steps, self.gamma = steps, gamma

    def before_step(self) -> None:
        t = self.trainer
        set_lr(t.optimizer, self.base_lr, lr_factor(t.iter, t.max_iter, self.warmup,
                                                    self.schedule, self.steps, self.gamma))


class NonFiniteLossGuard(HookBase):
    """Reads the step window at every log line and checkpoint, and raises ``TrainingError`` on
    every rank when any rank's loss was NaN or infinite at any step since the last read (the
    message names the first such step and the last good checkpoint).

    The steps between two reads never wait for the device, so a NaN is found at the next read,
    not at its step; the hooks after this one use the values it read (``window_values``), so a
    log line or checkpoint due at that read is never written."""

    def after_step(self) -> None:
        t = self.trainer
        t.window_values = None
        if not (t.log_due() or t.save_due()):
            return
        losses, _ = t.window_values = t.window.read()  # the one place the host waits
        bad = t.window.first_non_finite(losses)  # (iteration, value) or None
        if any_across_ranks(bad is not None, t.device):
            it, value = min(b for b in all_gather_object(bad) if b is not None)
            raise TrainingError(f"loss is {value} at iteration {it} (epoch {(it - 1) // t.ipe}); "
                                f"stopped, {t.last_good()}")


class MetricsWriter(HookBase):
    """``metrics.jsonl`` (and TensorBoard): one record every ``LOG_PERIOD`` iterations and at
    the end, the means of the window ``NonFiniteLossGuard`` read; ``curves.png`` once the run
    has completed. Other hooks write their records through ``write`` (e.g. kNN), and receive
    every record written through ``listeners`` (``listener(record, prefix)``, e.g. W&B)."""

    def __init__(self, tensorboard: bool) -> None:
        self.tensorboard = tensorboard
        self.metrics: Metrics | None = None
        self.listeners: list[Callable[[dict, str], None]] = []

    def before_train(self) -> None:
        t = self.trainer
        # on resume, drops what a killed run logged after its checkpoint
        self.metrics = Metrics(t.out, t.start_iter, is_main_process(), self.tensorboard)

    def after_step(self) -> None:
        t = self.trainer
        if not t.log_due():
            return
        t.skipped = set().union(*all_gather_object(t.skipped))
        losses, sums = t.window_values
        record = t.window.summarize(losses, sums, t.iter, t.epoch, t.optimizer, len(t.skipped))
        self.write(record)
        t.last_record = record

    def write(self, record: dict, prefix: str = "train") -> None:
        self.metrics.write(record, prefix)
        for listener in self.listeners:
            listener(record, prefix)

    def after_train(self) -> None:
        if self.metrics is None:
            return
        self.metrics.close()
        if self.trainer.completed and is_main_process():
            plot_curves(self.metrics.path, self.trainer.out / "curves.png")


class WandbLogger(HookBase):
    """Weights & Biases (``LOGGER.WANDB``; ``pretrain.utils.tracking``), rank 0: the run's
    config (flat), every record ``writer`` writes (the means of each log line as ``train/KEY``,
    kNN as ``knn/knn_top1``; the step is the record's ``iter``) and, once the run has completed,
    the final result (``train``'s summary) as ``final/KEY`` in the run's summary.

    A resumed run (``start_iter`` > 0) goes on in the W&B run whose id its output folder keeps;
    W&B does not take back what a killed run logged after its checkpoint, so the steps logged
    again after a resume are the ones W&B already holds (online it keeps the first values)."""

    SUMMARY = ("iter", "epoch", "loss", "knn_top1", "knn_top1_init", "skipped_images")

    def __init__(self, writer: MetricsWriter) -> None:
        self.writer, self.run = writer, None

    def before_train(self) -> None:
        t = self.trainer
        if not is_main_process():
            return
        self.run = open_run(t.cfg, t.out, resume=t.start_iter > 0, job_type="pretrain")
        self.writer.listeners.append(self.log)

    def log(self, record: dict, prefix: str) -> None:
        """One metrics.jsonl record: its numbers, at step ``iter``."""
        values = {("epoch" if k == "epoch" else f"{prefix}/{k}"): v for k, v in record.items()
                  if k != "iter" and isinstance(v, int | float) and not isinstance(v, bool)}
        self.run.log(values, step=record["iter"])

    def after_train(self) -> None:
        if self.run is None:
            return
        t = self.trainer
        if self.log in self.writer.listeners:
            self.writer.listeners.remove(self.log)
        if t.completed:
            summary = t.summary()
            self.run.summary.update({f"final/{k}": summary[k] for k in self.SUMMARY
                                     if summary.get(k) is not None})
        self.run.finish(exit_code=0 if t.completed else 1)
        self.run = None


class Checkpointer(HookBase):
    """At every epoch end, every ``CHECKPOINT_ITERS`` iterations and at the end: ``last.pth``
    with every rank's RNG state, and a copy ``checkpoint_EPOCH.pth`` at the end of every
    ``period``-th epoch (``period`` 0: no copies, ``last.pth`` alone; a study's default, where
    a numbered copy of every job would fill the disk). Non-finite weights stop the run instead:
    a good checkpoint is never replaced by one holding NaNs.

    ``sampler``: the data-order state stored in the checkpoint (``checkpoint`` module);
    ``provenance``: the run's ``provenance.json`` record, stored with it (None off rank 0)."""

    def __init__(self, sampler: dict, period: int, provenance: dict | None = None) -> None:
        self.sampler, self.period, self.provenance = sampler, period, provenance

    def after_step(self) -> None:
        t = self.trainer
        if not t.save_due():
            return
        done_epochs = t.iter // t.ipe
        numbered = (self.period > 0 and t.iter % t.ipe == 0
                    and done_epochs % self.period == 0)
        if any_across_ranks(not _finite_weights(t.model), t.device):
            raise TrainingError(f"weights became non-finite at iteration {t.iter} (epoch "
                                f"{t.epoch}); stopped, {t.last_good()}")
        state = dict(cfg=t.cfg, model=t.model, optimizer=t.optimizer, scaler=t.scaler, out=t.out,
                     sampler=self.sampler, provenance=self.provenance)
        t.skipped = save_run(state, t.iter, done_epochs, t.skipped, numbered)
        t.last_saved = t.iter


@torch.no_grad()
def _finite_weights(model: torch.nn.Module) -> bool:
    """All parameters finite: max |w| per tensor (NaN propagates), one read-back."""
    peaks = torch._foreach_norm(list(model.parameters()), float("inf"))
    return bool(torch.isfinite(torch.stack(peaks)).all())


class KnnMonitor(HookBase):
    """Weighted-kNN top-1 of the trunk (``evaluation.evaluate_knn``): at iteration 0 when
    ``at_start`` (the same trunk untrained, what pretraining has to beat; a fresh run only), at
    the end of every ``period``-th epoch and at the end. Evaluating draws no random numbers, so
    it does not change the run.

    Under ``torchrun`` every rank does its share: it extracts the features of 1/W of the bank and
    of the queries, and scores 1/W of the queries against the gathered bank, so no rank waits in
    a collective while another evaluates alone."""

    def __init__(self, knn_sets: tuple, writer: MetricsWriter, period: int,
                 at_start: bool) -> None:
        self.knn_sets, self.writer = knn_sets, writer
        self.period, self.at_start = period, at_start

    def before_train(self) -> None:
        t = self.trainer
        if t.start_iter == 0 and self.at_start:
            t.knn_top1_init = self.evaluate(0, 0)

    def after_step(self) -> None:
        t = self.trainer
        epoch_end = t.iter % t.ipe == 0
        if (epoch_end and (t.iter // t.ipe) % self.period == 0) or t.iter == t.max_iter:
            t.knn_top1 = self.evaluate(t.iter, t.epoch)

    def evaluate(self, it: int, epoch: int) -> float:
        """Top-1 in percent, the same on every rank (collective: every rank calls it); rank 0
        logs it and writes it to metrics."""
        t, cfg = self.trainer, self.trainer.cfg
        acc = evaluate_knn(t.model.backbone, *self.knn_sets, t.device, k=cfg.KNN.K, t=cfg.KNN.T,
                           batch_size=max(cfg.SOLVER.BATCH_SIZE // get_world_size(), 64),
                           num_workers=cfg.DATALOADER.NUM_WORKERS,
                           channels_last=cfg.SOLVER.CHANNELS_LAST)
        if is_main_process():
            self.writer.write({"iter": it, "epoch": epoch, "knn_top1": round(acc, 4)}, "knn")
            logger.info(f"iteration {it}: kNN top-1 {acc:.2f}%")
        return acc


class ProgressBar(HookBase):
    """A tqdm bar on rank 0: one tick per step, the last log line's loss and lr beside it."""

    def __init__(self) -> None:
        self.bar = None

    def before_train(self) -> None:
        if is_main_process():
            from tqdm import tqdm

            t = self.trainer
            self.bar = tqdm(total=t.max_iter, initial=t.start_iter, desc="pretrain",
                            dynamic_ncols=True, mininterval=1.0)

    def after_step(self) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        t = self.trainer
        if t.log_due() and t.last_record is not None:
            self.bar.set_postfix(loss=f"{t.last_record['loss']:.4f}",
                                 lr=f"{t.last_record['lr']:.3g}")

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
