"""The pretraining run, single process or under ``torchrun``: ``train(cfg)``.

``train`` checks the config and the run folder, sets up the process (device, process group,
determinism), builds a ``PretrainTrainer`` and runs it; whatever happens, it gives back what it
set up (the folder's lock, the process group). The trainer builds the data, the model and the
optimizer (resuming them from ``last.pth``), and its ``run_step`` is one iteration::

    views -> model.before_step(progress) -> loss = model(x1, x2)["loss"]
          -> SGD/LARS step (GradScaler) -> model.after_step(progress) -> StepWindow

The method handles its own schedule in ``before_step`` / ``after_step`` (FA's strength,
momentum encoders). The rest are hooks (``hooks``, called in the order documented there): the
lr schedule, the non-finite-loss guard, metrics (and W&B), checkpoints, the kNN monitor, the
progress bar;
``train(cfg, extra_hooks=...)`` appends more.

The views come whole from the loader workers (``DATA.AUG_DEVICE cpu``), or as uint8 crops and
parameter vectors that ``device_aug.augment`` finishes on the device (``cuda``; ``cpu_split``
runs that path on the CPU). No step waits for the device: the logged values stay there
(``metrics.StepWindow``) and are read every ``LOG_PERIOD`` iterations and before every
checkpoint, where a non-finite loss (or, before a checkpoint, non-finite weights) stops the run;
a checkpoint is written only after that check, so none holds NaNs.

Exact resume rests on three facts: every random choice of the data pipeline is a function of
``(SEED, epoch, image index)`` (``ResumableSampler``), the sampler can start mid-epoch, and the
checkpoint holds every process's RNG states next to the model, optimizer and scaler. The global
RNG is seeded with ``SEED`` before the model is built (the same initial weights on every rank)
and with ``SEED + rank`` (or the checkpoint's states) before the first step; nothing else
between them or in the hooks draws from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..build import build_model, check_cfg
from ..checkpoint import (
    check_data_paths,
    check_output_dir,
    check_resume_config,
    load_checkpoint,
    remove_stale_temporaries,
    resume_run,
)
from ..config import check_run_keys
from ..data import ResumableSampler, build_dataset, collate, worker_init
from ..device_aug import augment
from ..errors import ConfigError, DataError
from ..evaluation import build_knn_sets
from ..solver import (
    base_lr,
    build_optimizer,
    check_solver,
    total_iterations,
    use_step_kernels,
)
from ..transforms import normalize
from ..utils.amp import amp_dtype
from ..utils.dist import any_across_ranks, get_rank, get_world_size, is_main_process
from ..utils.env import seed_all
from ..utils.io import atomic_write_text
from ..utils.lock import run_lock
from ..utils.logger import close_log_files, setup_logging
from ..utils.provenance import collect_pretrain
from ..utils.provenance import write as write_provenance
from ..utils.tracking import check_wandb
from .hooks import (
    Checkpointer,
    KnnMonitor,
    LRScheduler,
    MetricsWriter,
    NonFiniteLossGuard,
    ProgressBar,
    WandbLogger,
)
from .launch import aug_device, compile_encoders, init_distributed, set_determinism, wrap_ddp
from .metrics import StepWindow
from .trainer import HookBase, TrainerBase

logger = logging.getLogger("pretrain")


def train(cfg, resume: bool = False, extra_hooks: Sequence[HookBase] = ()) -> dict:
    """Pretrain ``cfg`` (frozen CfgNode); with ``resume``, continue from OUTPUT_DIR/last.pth.
    ``extra_hooks`` run after the run's own hooks (``hooks``), in the order given.

    Returns a summary: ``iter``, ``epoch``, ``loss`` (last logged), ``knn_top1`` (last, or
    None), ``knn_top1_init`` (the untrained trunk), ``skipped_images``, ``output_dir`` and
    ``model`` (the trained, unwrapped module). Raises a ``FeatAugError`` subclass on bad input,
    and on Ctrl-C a ``KeyboardInterrupt`` whose message says where the run stopped.
    """
    check_cfg(cfg)
    check_run_keys(cfg)
    check_wandb(cfg)  # LOGGER.WANDB without wandb: refused before anything is written
    out = Path(cfg.OUTPUT_DIR)
    check_output_dir(out, resume)
    check_data_paths(cfg)
    device, created_pg = init_distributed(cfg)
    det_before = set_determinism(cfg.DETERMINISTIC)
    held, trainer = ExitStack(), None
    try:
        trainer = PretrainTrainer(cfg, device, resume, held)
        trainer.register_hooks(extra_hooks)
        trainer.train()
        return trainer.summary()
    except KeyboardInterrupt:
        it = None if trainer is None else trainer.iter
        raise KeyboardInterrupt(_interrupted(it, out / "last.pth")) from None
    finally:
        torch.use_deterministic_algorithms(det_before)
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()
        held.close()
        close_log_files(["pretrain"])


class PretrainTrainer(TrainerBase):
    """One pretraining run of ``cfg`` on ``device``: data, model, optimizer (resumed from
    ``last.pth`` with ``resume``), the default hooks, and ``run_step``.

    Building it takes OUTPUT_DIR's lock into ``held`` (released when the caller closes it), once
    the data is known to be usable; nothing is written to the folder before that. Then rank 0
    writes what produced the run (``provenance.json``, also the head of ``log.txt`` and an entry
    of every checkpoint; ``pretrain.utils.provenance``) and ``config.yaml``.
    """

    def __init__(self, cfg, device: torch.device, resume: bool, held: ExitStack) -> None:
        super().__init__()
        self.cfg, self.device, self.out = cfg, device, Path(cfg.OUTPUT_DIR)
        self.rank, self.world, self.main = get_rank(), get_world_size(), is_main_process()
        self.batch = check_solver(cfg, self.world)  # images per step and process
        self.dtype = amp_dtype(cfg.SOLVER.AMP, device.type)
        self.aug_on = aug_device(cfg, device)  # None: the workers make whole views
        self._build_data()

        # outputs: only once the data is usable and the folder is this run's alone
        held.enter_context(_lock_output(self.out, resume, self.main, device))
        last_path = self.out / "last.pth"
        ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
        if ckpt is not None:
            check_resume_config(ckpt, cfg, last_path)
        self.provenance = None  # what produced the run, on rank 0 (in every checkpoint too)
        if self.main:
            remove_stale_temporaries(self.out)
            self.provenance = collect_pretrain(cfg, world_size=self.world,
                                               start_iter=0 if ckpt is None else ckpt["iter"])
            write_provenance(self.out, self.provenance)  # before logging: log.txt's head
        setup_logging(["pretrain"], self.out / "log.txt", main=self.main)
        if cfg.KNN.PERIOD > 0 and self.knn_sets is None:
            logger.warning("KNN.PERIOD is set but DATA.KNN_TRAIN_ROOT / KNN_VAL_ROOT are not: "
                           "no kNN monitor")

        self._build_model()
        self._restore(ckpt, resume)
        if self.main:  # the config of the run that now owns the folder
            atomic_write_text(self.out / "config.yaml", cfg.dump())
        self.ddp_model = wrap_ddp(self.model, device, static=self.model.same_graph_every_step()) \
            if self.world > 1 else self.model

        # what the hooks read and report (see ``hooks``)
        self.iter = self.last_saved = self.start_iter
        self.epoch = self.start_iter // self.ipe  # of the step being taken
        self.window = StepWindow()
        self.window_values: tuple[list[float], dict[str, float]] | None = None
        self.last_record: dict | None = None
        self.knn_top1: float | None = None
        self.knn_top1_init: float | None = None
        self._data = self._batches()
        self._t_start = time.perf_counter()
        self.register_hooks(self.build_hooks())
        self._log_start()

    # ------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        """Dataset, sampler and loader; ``ipe`` (iterations per epoch), ``max_iter``."""
        cfg, batch = self.cfg, self.batch
        self.dataset = build_dataset(cfg, split=self.aug_on is not None)
        self.sampler = ResumableSampler(len(self.dataset), seed=cfg.SEED, rank=self.rank,
                                        world_size=self.world)
        self.ipe = self.sampler.shard_size() // batch
        if self.ipe == 0:
            raise DataError(f"{cfg.DATA.ROOT}: {len(self.dataset)} images, fewer than one batch "
                            f"({batch} per process x {self.world})")
        workers = cfg.DATALOADER.NUM_WORKERS
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch, sampler=self.sampler, num_workers=workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=True,
            worker_init_fn=worker_init,
            persistent_workers=workers > 0 and cfg.DATALOADER.PERSISTENT_WORKERS,
            generator=torch.Generator(),  # the loader never draws from the global RNG
        )
        self.knn_sets = build_knn_sets(cfg) if cfg.KNN.PERIOD > 0 else None
        self.max_iter = total_iterations(cfg, self.ipe)

    def _build_model(self) -> None:
        """The method (the same initial weights on every rank), optimizer and GradScaler."""
        cfg = self.cfg
        seed_all(cfg.SEED)
        model = build_model(cfg).to(self.device)
        if cfg.SOLVER.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        if self.world > 1 and (cfg.MODEL.METHOD != "moco" or not cfg.MODEL.MOCO.SHUFFLE_BN):
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                logger.warning("SyncBatchNorm needs CUDA: BN statistics stay per process on CPU")
        if cfg.SOLVER.COMPILE:
            compile_encoders(model)
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def _restore(self, ckpt: dict | None, resume: bool) -> None:
        """Seed this rank's RNG, then load ``ckpt`` (model, optimizer, scaler, RNG states);
        sets ``start_iter`` and ``skipped``."""
        self.start_iter, self.skipped = 0, set()
        seed_all(self.cfg.SEED + self.rank)
        last_path = self.out / "last.pth"
        if ckpt is not None:
            data = dict(size=len(self.dataset), ipe=self.ipe, batch=self.batch)
            self.start_iter, self.skipped = resume_run(ckpt, last_path, self.model,
                                                       self.optimizer, self.scaler, self.rank,
                                                       self.world, data)
            use_step_kernels(self.optimizer)
        elif resume:
            logger.info(f"--resume: no {last_path} yet, starting from scratch")

    def build_hooks(self) -> list[HookBase | None]:
        """The default hooks, in calling order (``hooks`` says why this order)."""
        cfg, ipe = self.cfg, self.ipe
        writer = MetricsWriter(cfg.TENSORBOARD)
        sampler = dict(seed=cfg.SEED, iters_per_epoch=ipe, batch_per_rank=self.batch,
                       world_size=self.world, dataset_size=len(self.dataset))
        return [
            LRScheduler(base_lr(cfg), min(round(cfg.SOLVER.WARMUP_EPOCHS * ipe), self.max_iter),
                        cfg.SOLVER.SCHEDULE, tuple(round(e * ipe) for e in cfg.SOLVER.STEPS),
                        cfg.SOLVER.GAMMA),
            NonFiniteLossGuard(),
            writer,
            WandbLogger(writer) if cfg.LOGGER.WANDB else None,
            Checkpointer(sampler, cfg.SOLVER.CHECKPOINT_PERIOD, self.provenance),
            KnnMonitor(self.knn_sets, writer, cfg.KNN.PERIOD, cfg.KNN.AT_START)
            if self.knn_sets is not None else None,
            ProgressBar(),
        ]

    def _log_start(self) -> None:
        cfg, dtype, aug_on = self.cfg, self.dtype, self.aug_on
        logger.info(f"{cfg.MODEL.METHOD} {cfg.MODEL.BACKBONE}: {len(self.dataset)} images, "
                    f"{self.world} process(es) x batch {self.batch}, {self.ipe} iterations/epoch, "
                    f"iterations {self.start_iter} -> {self.max_iter}, lr {base_lr(cfg):g}, "
                    f"AMP {dtype or 'off'}, device {self.device}, photometric augmentation "
                    f"{f'batched on {aug_on}' if aug_on else 'in the loader workers'}")

    # ------------------------------------------------------------------------- the schedule
    def log_due(self) -> bool:
        """A log line after this step (``iter`` counts it): every LOG_PERIOD and at the end."""
        return self.iter % self.cfg.LOG_PERIOD == 0 or self.iter == self.max_iter

    def save_due(self) -> bool:
        """A checkpoint after this step: every epoch end, every CHECKPOINT_ITERS, at the end."""
        every = self.cfg.SOLVER.CHECKPOINT_ITERS
        return self.iter % self.ipe == 0 or self.iter == self.max_iter or (
            every > 0 and self.iter % every == 0)

    def last_good(self) -> str:
        """The checkpoint a stopped run leaves, for its error message."""
        last_path = self.out / "last.pth"
        if last_path.exists():
            return f"last good checkpoint {last_path} (iteration {self.last_saved})"
        return "no checkpoint was written"

    # ------------------------------------------------------------------------- the loop
    def train(self) -> None:
        super().train(self.start_iter, self.max_iter)

    def before_step(self) -> None:
        self._t_start = time.perf_counter()  # the step's time includes its hooks and data
        self.epoch = self.iter // self.ipe
        super().before_step()

    def run_step(self) -> None:
        """One iteration: a batch, the method's schedule, forward, backward, optimizer step; the
        outputs stay on the device, in the step window."""
        views, _, bad = next(self._data)
        t_data = time.perf_counter()
        self.skipped.update(bad)
        x1, x2 = _views(views, self.aug_on, self.device, self.cfg.SOLVER.CHANNELS_LAST)
        self.model.before_step(self.iter / self.max_iter)  # the FA schedule reads it
        with torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext():
            outputs = self.ddp_model(x1, x2)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(outputs["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.after_step((self.iter + 1) / self.max_iter)  # momentum encoders
        self.window.add(self.iter + 1, outputs, t_data - self._t_start,
                        time.perf_counter() - self._t_start)

    def _batches(self) -> Iterator:
        """Loader batches from iteration ``iter`` on, epoch after epoch; each epoch's sampler
        starts where the run is (mid-epoch after a resume)."""
        while True:
            epoch = self.iter // self.ipe
            self.sampler.set_epoch(epoch, start=(self.iter - epoch * self.ipe) * self.batch)
            yield from self.loader

    def after_train(self) -> None:
        self._data.close()  # lets the loader's workers go
        super().after_train()
        if not (self.completed and self.main):
            return
        if self.skipped:
            names = [self.dataset.source.name(i) for i in sorted(self.skipped)]
            logger.warning(f"{len(self.skipped)} unreadable image(s) were skipped: "
                           + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
        loss = self.summary()["loss"]
        logger.info(f"done: {self.iter} iterations, last loss {loss}, checkpoint "
                    f"{self.out / 'last.pth'}")
        if self.knn_top1 is not None and self.knn_top1_init is not None:
            logger.info(f"kNN top-1 {self.knn_top1:.2f}% after pretraining, "
                        f"{self.knn_top1_init:.2f}% for the same trunk untrained")

    def summary(self) -> dict:
        """What ``train`` returns (see there)."""
        return dict(iter=self.iter, epoch=self.iter // self.ipe,
                    loss=None if self.last_record is None else self.last_record["loss"],
                    knn_top1=self.knn_top1, knn_top1_init=self.knn_top1_init,
                    skipped_images=len(self.skipped), output_dir=str(self.out), model=self.model)


def _lock_output(out: Path, resume: bool, main: bool, device: torch.device) -> ExitStack:
    """Rank 0 takes OUTPUT_DIR's lock (held until the returned stack closes) and checks again,
    under it, that no other run has filled the folder meanwhile; every rank raises when rank 0
    was refused, so none waits for it in a collective."""
    held, refusal = ExitStack(), None
    if main:
        try:
            held.enter_context(run_lock(out, "feataug pretrain"))
            check_output_dir(out, resume)
        except ConfigError as e:
            held.close()
            refusal = e
    if any_across_ranks(refusal is not None, device):
        raise refusal or ConfigError(f"OUTPUT_DIR {out}: refused by rank 0")
    return held


def _interrupted(it: int | None, last_path: Path) -> str:
    """Where an interrupted run stopped and the iteration of the checkpoint on disk."""
    where = "interrupted before training" if it is None else f"interrupted at iteration {it}"
    if not last_path.is_file():
        return f"{where}; no checkpoint yet"
    saved = load_checkpoint(last_path)["iter"]
    return f"{where}; {last_path} (iteration {saved}) is intact; --resume continues"


def _views(batch, aug_on: torch.device | None, device: torch.device,
           channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two normalised float views of a loader batch: ``(view1, view2)`` uint8, or
    ``(crop1, crop2, params1, params2)`` that ``augment`` finishes on ``aug_on``."""
    if aug_on is None:
        x1, x2 = batch
    else:
        c1, c2, p1, p2 = batch  # params stay on the host: augment reads them there
        x1, x2 = (augment(c.to(aug_on, non_blocking=True), q) for c, q in ((c1, p1), (c2, p2)))
    return _prepare(x1, device, channels_last), _prepare(x2, device, channels_last)


def _prepare(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> normalised float32 on ``device`` (channels-last: converted while
    still uint8, a quarter of the bytes; ``normalize`` keeps the memory format)."""
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return normalize(x)
