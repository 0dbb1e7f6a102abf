"""The pretraining loop, single process or under ``torchrun``.

One iteration: two augmented views -> ``model.before_step(progress)`` -> ``model(x1, x2)["loss"]``
-> SGD/LARS step at the scheduled lr -> ``model.after_step(progress)``. Around it (``hooks``, ``pretrain.checkpoint``): metrics, a
progress bar, checkpoints, the kNN monitor.

Exact resume rests on three facts: every random choice of the data pipeline is a function of
``(SEED, epoch, image index)`` (``ResumableSampler``), the sampler can start mid-epoch, and the
checkpoint holds every process's RNG states next to the model, optimizer and scaler.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..build import build_model, check_cfg
from ..checkpoint import (
    check_output_dir,
    check_resume_config,
    load_checkpoint,
    remove_stale_temporaries,
    resume_run,
    save_run,
)
from ..data import ResumableSampler, build_dataset, collate, worker_init
from ..errors import DataError, TrainingError
from ..evaluation import build_knn_sets
from ..solver import base_lr, build_optimizer, check_solver, lr_factor, set_lr
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
from ..utils.logger import setup_logging
from .hooks import Metrics, accumulate, knn_hook, plot_curves, summarize
from .launch import init_distributed, set_determinism, wrap_ddp

logger = logging.getLogger("pretrain")


def train(cfg, resume: bool = False) -> dict:
    """Pretrain ``cfg`` (frozen CfgNode); with ``resume``, continue from OUTPUT_DIR/last.pth.

    Returns a summary: ``iter``, ``epoch``, ``loss`` (last logged), ``knn_top1`` (last, or
    None), ``knn_top1_init`` (the untrained trunk), ``skipped_images``, ``output_dir`` and
    ``model`` (the trained, unwrapped module). Raises a ``FeatAugError`` subclass on bad input.
    """
    check_cfg(cfg)
    out = Path(cfg.OUTPUT_DIR)
    check_output_dir(out, resume)
    device, created_pg = init_distributed(cfg)
    det_before = set_determinism(cfg.DETERMINISTIC)
    metrics = bar = None
    try:
        rank, world, main = get_rank(), get_world_size(), is_main_process()
        batch = check_solver(cfg, world)
        dtype = amp_dtype(cfg.SOLVER.AMP, device.type)

        # data
        dataset = build_dataset(cfg)
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

        # outputs: only once the data is usable and the folder may be written
        last_path = out / "last.pth"
        ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
        if ckpt is not None:
            check_resume_config(ckpt, cfg, last_path)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)
        setup_logging(["pretrain"], out / "log.txt", main=main)
        if cfg.KNN.PERIOD > 0 and knn_sets is None:
            logger.warning("KNN.PERIOD is set but DATA.KNN_TRAIN_ROOT / KNN_VAL_ROOT are not: "
                           "no kNN monitor")

        # model (same initial weights on every rank), optimizer
        seed_all(cfg.SEED)
        model = build_model(cfg).to(device)
        if cfg.SOLVER.CHANNELS_LAST:
            model = model.to(memory_format=torch.channels_last)
        if world > 1 and (cfg.MODEL.METHOD != "moco" or not cfg.MODEL.MOCO.SHUFFLE_BN):
            if device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                logger.warning("SyncBatchNorm needs CUDA: BN statistics stay per process on CPU")
        optimizer = build_optimizer(cfg, model)
        lr = base_lr(cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        start_iter, skipped = 0, set()
        seed_all(cfg.SEED + rank)
        if ckpt is not None:
            start_iter, skipped = resume_run(ckpt, last_path, model, optimizer, scaler, rank,
                                             world, dict(size=len(dataset), ipe=ipe, batch=batch))
        elif resume:
            logger.info(f"--resume: no {last_path} yet, starting from scratch")
        if main:  # the config of the run that now owns the folder
            atomic_write_text(out / "config.yaml", cfg.dump())
        ddp_model = wrap_ddp(model, device, static=_same_graph_every_step(model)) if world > 1 \
            else model
        metrics = Metrics(out, start_iter, main, cfg.TENSORBOARD)
        logger.info(f"{cfg.MODEL.METHOD} {cfg.MODEL.BACKBONE}: {len(dataset)} images, "
                    f"{world} process(es) x batch {batch}, {ipe} iterations/epoch, "
                    f"iterations {start_iter} -> {total}, lr {lr:g}, AMP {dtype or 'off'}, "
                    f"device {device}")

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
        window: dict[str, float] = {}
        t_last = time.perf_counter()
        while it < total:
            epoch = it // ipe
            sampler.set_epoch(epoch, start=(it - epoch * ipe) * batch)
            for (x1, x2), _, bad in loader:
                t_data = time.perf_counter()
                skipped.update(bad)
                x1, x2 = (_prepare(x, device, cfg.SOLVER.CHANNELS_LAST) for x in (x1, x2))
                set_lr(optimizer, lr, lr_factor(it, total, warmup, cfg.SOLVER.SCHEDULE, steps,
                                                cfg.SOLVER.GAMMA))
                unwrap(ddp_model).before_step(it / total)  # the FA schedule reads it
                with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                    outputs = ddp_model(x1, x2)
                loss = outputs["loss"]
                loss_value = loss.item()
                if any_across_ranks(not math.isfinite(loss_value), device):
                    raise TrainingError(f"loss is {loss_value} at iteration {it + 1} (epoch "
                                        f"{epoch}); stopped, {_last_good(last_path, last_saved)}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                it += 1
                unwrap(ddp_model).after_step(it / total)

                t_step = time.perf_counter()
                accumulate(window, outputs, loss_value, t_data - t_last, t_step - t_last)
                t_last = t_step
                if main:
                    bar.update(1)
                if it % cfg.LOG_PERIOD == 0 or it == total:
                    skipped = set().union(*all_gather_object(skipped))
                    record = summarize(window, it, epoch, optimizer, len(skipped))
                    last_loss = record["loss"]
                    metrics.write(record)
                    if main:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.3g}")
                epoch_end = it % ipe == 0
                if epoch_end or it == total or (cfg.SOLVER.CHECKPOINT_ITERS > 0
                                                and it % cfg.SOLVER.CHECKPOINT_ITERS == 0):
                    done_epochs = it // ipe
                    numbered = epoch_end and done_epochs % max(cfg.SOLVER.CHECKPOINT_PERIOD, 1) == 0
                    if not _finite_weights(model):  # never replace a good checkpoint with NaNs
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
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
        torch.use_deterministic_algorithms(det_before)
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


def _same_graph_every_step(model) -> bool:
    """False when FA has parameters that the schedule leaves unused in some steps."""
    fa = getattr(model, "fa", None)
    scheduled = fa is not None and (fa.start > 0 or fa.ramp > 0)
    return not (scheduled and any(p.requires_grad for p in fa.parameters()))


def _last_good(last_path: Path, iteration: int) -> str:
    if last_path.exists():
        return f"last good checkpoint {last_path} (iteration {iteration})"
    return "no checkpoint was written"


@torch.no_grad()
def _finite_weights(model: torch.nn.Module) -> bool:
    norms = [torch.linalg.vector_norm(p.float()) for p in model.parameters()]
    return bool(torch.isfinite(torch.stack(norms)).all())


def _prepare(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = normalize(x.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
