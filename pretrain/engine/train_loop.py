"""The pretraining loop, single process or under ``torchrun``.

One iteration: two augmented views -> ``model.before_step(progress)`` -> ``model(x1, x2)["loss"]``
-> SGD/LARS step at the scheduled lr -> ``model.after_step(progress)``. Around it (``hooks``,
``pretrain.checkpoint``): metrics, a progress bar, checkpoints, the kNN monitor.

The views come whole from the loader workers (``DATA.AUG_DEVICE cpu``), or as uint8 crops and
parameter vectors that ``device_aug.augment`` finishes on the device (``cuda``; ``cpu_split``
runs that path on the CPU). No step waits for the device: the logged values stay there
(``hooks.StepWindow``) and are read every ``LOG_PERIOD`` iterations and before every checkpoint,
where a non-finite loss (or, before a checkpoint, non-finite weights) stops the run; a
checkpoint is written only after that check, so none holds NaNs.

Exact resume rests on three facts: every random choice of the data pipeline is a function of
``(SEED, epoch, image index)`` (``ResumableSampler``), the sampler can start mid-epoch, and the
checkpoint holds every process's RNG states next to the model, optimizer and scaler.
"""

from __future__ import annotations

import logging
import time
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
    save_run,
)
from ..data import ResumableSampler, build_dataset, collate, worker_init
from ..device_aug import augment
from ..errors import ConfigError, DataError, TrainingError
from ..evaluation import build_knn_sets
from ..solver import base_lr, build_optimizer, check_solver, lr_factor, set_lr, use_step_kernels
from ..transforms import normalize
from ..utils.amp import amp_dtype
from ..utils.dist import (
    all_gather_object,
    any_across_ranks,
    get_rank,
    get_world_size,
    is_main_process,
    unwrap,
)
from ..utils.env import seed_all
from ..utils.io import atomic_write_text
from ..utils.lock import run_lock
from ..utils.logger import setup_logging
from .hooks import Metrics, StepWindow, knn_hook, plot_curves
from .launch import (
    aug_device,
    compile_encoders,
    init_distributed,
    set_determinism,
    wrap_ddp,
)

logger = logging.getLogger("pretrain")


def train(cfg, resume: bool = False) -> dict:
    """Pretrain ``cfg`` (frozen CfgNode); with ``resume``, continue from OUTPUT_DIR/last.pth.

    Returns a summary: ``iter``, ``epoch``, ``loss`` (last logged), ``knn_top1`` (last, or
    None), ``knn_top1_init`` (the untrained trunk), ``skipped_images``, ``output_dir`` and
    ``model`` (the trained, unwrapped module). Raises a ``FeatAugError`` subclass on bad input,
    and on Ctrl-C a ``KeyboardInterrupt`` whose message says where the run stopped.
    """
    check_cfg(cfg)
    out = Path(cfg.OUTPUT_DIR)
    last_path = out / "last.pth"
    check_output_dir(out, resume)
    check_data_paths(cfg)
    device, created_pg = init_distributed(cfg)
    det_before = set_determinism(cfg.DETERMINISTIC)
    metrics = bar = held = it = None
    try:
        rank, world, main = get_rank(), get_world_size(), is_main_process()
        batch = check_solver(cfg, world)
        dtype = amp_dtype(cfg.SOLVER.AMP, device.type)
        aug_on = aug_device(cfg, device)  # None: the workers make whole views

        # data
        dataset = build_dataset(cfg, split=aug_on is not None)
        sampler = ResumableSampler(len(dataset), seed=cfg.SEED, rank=rank, world_size=world)
        ipe = sampler.shard_size() // batch
        if ipe == 0:
            raise DataError(f"{cfg.DATA.ROOT}: {len(dataset)} images, fewer than one batch "
                            f"({batch} per process x {world})")
        workers = cfg.DATALOADER.NUM_WORKERS
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=device.type == "cuda", drop_last=True, worker_init_fn=worker_init,
            persistent_workers=workers > 0 and cfg.DATALOADER.PERSISTENT_WORKERS,
            generator=torch.Generator(),  # the loader never draws from the global RNG
        )
        knn_sets = build_knn_sets(cfg) if cfg.KNN.PERIOD > 0 else None
        total = ipe * cfg.SOLVER.EPOCHS if cfg.SOLVER.EPOCHS > 0 else cfg.SOLVER.MAX_ITER
        if cfg.SOLVER.MAX_ITER > 0:
            total = min(total, cfg.SOLVER.MAX_ITER)
        warmup = min(round(cfg.SOLVER.WARMUP_EPOCHS * ipe), total)
        steps = tuple(round(e * ipe) for e in cfg.SOLVER.STEPS)

        # outputs: only once the data is usable and the folder is this run's alone
        held = _lock_output(out, resume, main, device)
        ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
        if ckpt is not None:
            check_resume_config(ckpt, cfg, last_path)
        if main:
            remove_stale_temporaries(out)
        setup_logging(["pretrain"], out / "log.txt", main=main)
        if cfg.KNN.PERIOD > 0 and knn_sets is None:
            logger.warning("KNN.PERIOD is set but DATA.KNN_TRAIN_ROOT / KNN_VAL_ROOT are not: "
                           "no kNN monitor")

        # model (same initial weights on every rank), optimizer
        seed_all(cfg.SEED)
        model = build_model(cfg).to(device)
        if cfg.SOLVER.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        if world > 1 and (cfg.MODEL.METHOD != "moco" or not cfg.MODEL.MOCO.SHUFFLE_BN):
            if device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                logger.warning("SyncBatchNorm needs CUDA: BN statistics stay per process on CPU")
        if cfg.SOLVER.COMPILE:
            compile_encoders(model)
        optimizer = build_optimizer(cfg, model)
        lr = base_lr(cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        start_iter, skipped = 0, set()
        seed_all(cfg.SEED + rank)
        if ckpt is not None:
            start_iter, skipped = resume_run(ckpt, last_path, model, optimizer, scaler, rank,
                                             world, dict(size=len(dataset), ipe=ipe, batch=batch))
            use_step_kernels(optimizer)
        elif resume:
            logger.info(f"--resume: no {last_path} yet, starting from scratch")
        if main:  # the config of the run that now owns the folder
            atomic_write_text(out / "config.yaml", cfg.dump())
        ddp_model = wrap_ddp(model, device, static=model.same_graph_every_step()) if world > 1 \
            else model
        metrics = Metrics(out, start_iter, main, cfg.TENSORBOARD)
        logger.info(f"{cfg.MODEL.METHOD} {cfg.MODEL.BACKBONE}: {len(dataset)} images, "
                    f"{world} process(es) x batch {batch}, {ipe} iterations/epoch, "
                    f"iterations {start_iter} -> {total}, lr {lr:g}, AMP {dtype or 'off'}, "
                    f"device {device}, photometric augmentation "
                    f"{f'batched on {aug_on}' if aug_on else 'in the loader workers'}")

        state = dict(cfg=cfg, model=model, optimizer=optimizer, scaler=scaler, out=out,
                     sampler=dict(seed=cfg.SEED, iters_per_epoch=ipe, batch_per_rank=batch,
                                  world_size=world, dataset_size=len(dataset)))
        it, knn_top1, last_saved, last_loss = start_iter, None, start_iter, None
        knn_init = None  # the same trunk untrained: what pretraining has to beat
        if knn_sets is not None and start_iter == 0 and cfg.KNN.AT_START:
            knn_init = knn_hook(cfg, model, knn_sets, device, 0, 0, metrics)  # draws no randoms
        if main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start_iter, desc="pretrain", dynamic_ncols=True,
                       mininterval=1.0)
        window = StepWindow()
        t_last = time.perf_counter()
        while it < total:
            epoch = it // ipe
            sampler.set_epoch(epoch, start=(it - epoch * ipe) * batch)
            for views, _, bad in loader:
                t_data = time.perf_counter()
                skipped.update(bad)
                x1, x2 = _views(views, aug_on, device, cfg.SOLVER.CHANNELS_LAST)
                set_lr(optimizer, lr, lr_factor(it, total, warmup, cfg.SOLVER.SCHEDULE, steps,
                                                cfg.SOLVER.GAMMA))
                unwrap(ddp_model).before_step(it / total)  # the FA schedule reads it
                with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                    outputs = ddp_model(x1, x2)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(outputs["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
                it += 1
                unwrap(ddp_model).after_step(it / total)

                t_step = time.perf_counter()
                window.add(it, outputs, t_data - t_last, t_step - t_last)
                if main:
                    bar.update(1)
                log_now = it % cfg.LOG_PERIOD == 0 or it == total
                epoch_end = it % ipe == 0
                save_now = epoch_end or it == total or (cfg.SOLVER.CHECKPOINT_ITERS > 0
                                                        and it % cfg.SOLVER.CHECKPOINT_ITERS == 0)
                if log_now or save_now:  # the one place the host waits for the device
                    losses, sums = window.read()
                    _stop_if_non_finite(window.first_non_finite(losses), device, ipe,
                                        _last_good(last_path, last_saved))
                if log_now:
                    skipped = set().union(*all_gather_object(skipped))
                    record = window.summarize(losses, sums, it, epoch, optimizer, len(skipped))
                    last_loss = record["loss"]
                    metrics.write(record)
                    if main:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.3g}")
                if save_now:
                    done_epochs = it // ipe
                    numbered = epoch_end and done_epochs % max(cfg.SOLVER.CHECKPOINT_PERIOD, 1) == 0
                    # never replace a good checkpoint with NaNs
                    if any_across_ranks(not _finite_weights(model), device):
                        raise TrainingError(f"weights became non-finite at iteration {it} (epoch "
                                            f"{epoch}); stopped, {_last_good(last_path, last_saved)}")
                    skipped = save_run(state, it, done_epochs, skipped, numbered)
                    last_saved = it
                if knn_sets is not None and (
                    (epoch_end and (it // ipe) % cfg.KNN.PERIOD == 0) or it == total
                ):
                    knn_top1 = knn_hook(cfg, model, knn_sets, device, it, epoch, metrics)
                t_last = time.perf_counter()
                if it >= total:
                    break
        if bar is not None:
            bar.close()
        if skipped and main:
            names = [dataset.source.name(i) for i in sorted(skipped)]
            logger.warning(f"{len(skipped)} unreadable image(s) were skipped: "
                           + ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
        metrics.close()
        if main:
            plot_curves(metrics.path, out / "curves.png")
            logger.info(f"done: {it} iterations, last loss {last_loss}, checkpoint {last_path}")
            if knn_top1 is not None and knn_init is not None:
                logger.info(f"kNN top-1 {knn_top1:.2f}% after pretraining, {knn_init:.2f}% "
                            "for the same trunk untrained")
        return dict(iter=it, epoch=it // ipe, loss=last_loss, knn_top1=knn_top1,
                    knn_top1_init=knn_init, skipped_images=len(skipped), output_dir=str(out),
                    model=model)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted(it, last_path)) from None
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
        torch.use_deterministic_algorithms(det_before)
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()
        if held is not None:
            held.close()


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


def _last_good(last_path: Path, iteration: int) -> str:
    if last_path.exists():
        return f"last good checkpoint {last_path} (iteration {iteration})"
    return "no checkpoint was written"


def _stop_if_non_finite(bad: tuple[int, float] | None, device: torch.device, ipe: int,
                        last_good: str) -> None:
    """Raise on every rank when any rank read a non-finite loss; ``bad``: (iteration, value)."""
    if any_across_ranks(bad is not None, device):
        it, value = min(b for b in all_gather_object(bad) if b is not None)
        raise TrainingError(f"loss is {value} at iteration {it} (epoch {(it - 1) // ipe}); "
                            f"stopped, {last_good}")


@torch.no_grad()
def _finite_weights(model: torch.nn.Module) -> bool:
    """All parameters finite: max |w| per tensor (NaN propagates), one read-back."""
    peaks = torch._foreach_norm(list(model.parameters()), float("inf"))
    return bool(torch.isfinite(torch.stack(peaks)).all())


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
