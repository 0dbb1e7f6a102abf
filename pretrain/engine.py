"""``feataug pretrain``: the pretraining loop, single process or under ``torchrun``.

One iteration: two augmented views -> ``model(x1, x2)["loss"]`` -> SGD/LARS step with warm-up +
cosine learning rate -> ``model.after_step(progress)``. Around it: DDP (env://, NCCL on CUDA,
gloo on CPU), AMP (bf16, or fp16 with a GradScaler), atomic checkpoints that make a resumed run
bit-identical to an uninterrupted one, ``metrics.jsonl`` + TensorBoard + a progress bar, an
optional weighted-kNN monitor and a loss plot at the end.

Exact resume rests on three facts: every random choice of the data pipeline is a function of
``(SEED, epoch, image index)`` (``ResumableSampler``), the sampler can start mid-epoch, and the
checkpoint holds every process's RNG states next to the model, optimizer and scaler.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from feataug.io import atomic_open, atomic_write, atomic_write_text
from pretrain.checkpoint import (
    CheckpointError,
    build_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from pretrain.config import ConfigError, config_differences, load_cfg
from pretrain.data import DataError, ResumableSampler, build_dataset, collate, worker_init
from pretrain.dist import get_rank, get_world_size, is_main_process
from pretrain.transforms import normalize

logger = logging.getLogger("pretrain")


class TrainingError(Exception):
    """A run that had to stop (e.g. a non-finite loss)."""


# ----------------------------------------------------------------------------- setup
def init_distributed(cfg) -> tuple[torch.device, bool]:
    """Device of this process, and whether a process group was created here (torchrun env://)."""
    want = cfg.DEVICE
    if want not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"DEVICE '{want}' is not one of: auto, cpu, cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE cuda: no CUDA device is available")
    cuda = want != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
        created = True
    return device, created


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """SOLVER.AMP -> autocast dtype (None: full precision)."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError("SOLVER.AMP fp16 needs CUDA; use bf16 or off on the CPU")
        return torch.float16
    raise ConfigError(f"SOLVER.AMP '{mode}' is not one of: auto, off, bf16, fp16")


def check_solver(cfg, world_size: int) -> int:
    """Validate solver keys; returns the per-process batch size."""
    s = cfg.SOLVER
    if s.OPTIMIZER not in ("sgd", "lars"):
        raise ConfigError(f"SOLVER.OPTIMIZER '{s.OPTIMIZER}' is not one of: sgd, lars")
    if s.SCHEDULE not in ("cosine", "step", "constant"):
        raise ConfigError(f"SOLVER.SCHEDULE '{s.SCHEDULE}' is not one of: cosine, step, constant")
    if s.BATCH_SIZE <= 0 or s.BATCH_SIZE % world_size:
        raise ConfigError(f"SOLVER.BATCH_SIZE {s.BATCH_SIZE} must be a positive multiple of the "
                          f"{world_size} processes")
    if s.EPOCHS <= 0 and s.MAX_ITER <= 0:
        raise ConfigError("set SOLVER.EPOCHS or SOLVER.MAX_ITER to a positive number")
    if cfg.MODEL.METHOD == "moco" and cfg.MODEL.MOCO.K < s.BATCH_SIZE:
        raise ConfigError(f"MODEL.MOCO.K {cfg.MODEL.MOCO.K} is smaller than the global batch "
                          f"SOLVER.BATCH_SIZE {s.BATCH_SIZE}: the queue must hold one batch of keys")
    return s.BATCH_SIZE // world_size


# ----------------------------------------------------------------------------- optimizer
class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each tensor is scaled by the trust ratio
    eta * ||w|| / ||g + wd * w|| (You et al. 2017); groups marked ``lars_exclude`` (biases,
    BN) take plain SGD steps."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                if not g["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, 1.0)
                    d = d * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or LARS over ``model.param_groups()``; lr = BASE_LR x BATCH_SIZE / 256 for every group."""
    lr = cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256
    groups = unwrap(model).param_groups()
    kw = dict(lr=lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    if cfg.SOLVER.OPTIMIZER == "lars":
        return LARS(groups, **kw)
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    return torch.optim.SGD(groups, **kw)


def lr_factor(it: int, total: int, warmup: int, schedule: str = "cosine",
              steps: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Multiplier of the base lr for iteration ``it`` (0-based) of ``total``.

    Linear warm-up (it + 1) / warmup for the first ``warmup`` iterations, then
    cosine: 0.5 (1 + cos(pi (it - warmup) / (total - warmup))), step: gamma^(#steps <= it),
    or constant 1.
    """
    if it < warmup:
        return (it + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(total - warmup, 1)))
    if schedule == "step":
        return gamma ** sum(it >= s for s in steps)
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Apply ``base_lr * factor`` to every group except ``fix_lr`` ones (they keep ``base_lr``)."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr if g.get("fix_lr") else base_lr * factor
    return base_lr * factor


# ----------------------------------------------------------------------------- monitoring
def setup_logging(output_dir: Path, main: bool) -> None:
    """Log to stdout and OUTPUT_DIR/log.txt on rank 0; warnings only elsewhere."""
    for h in list(logger.handlers):
        if getattr(h, "_feataug", False):
            logger.removeHandler(h)
            h.close()
    logger.setLevel(logging.INFO if main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s pretrain] %(message)s", "%m/%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if main:
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        h._feataug = True
        logger.addHandler(h)


class Metrics:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars, rank 0."""

    def __init__(self, output_dir: Path, start_iter: int, enabled: bool, tensorboard: bool):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.file = self.tb = None
        if not enabled:
            return
        kept = []
        if start_iter > 0 and self.path.exists():  # drop what a killed run logged after its checkpoint
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["iter"] <= start_iter:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        atomic_write_text(self.path, "".join(kept))
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tb"), purge_step=start_iter or None)

    def write(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("iter", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["iter"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        self.file = self.tb = None


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    """Loss (and kNN top-1 when present) against iteration, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    loss = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
    knn = [(r["iter"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    if not loss:
        return
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(10 if knn else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*loss, strict=True), lw=1.2)
    ax.set(xlabel="iteration", ylabel="loss", title="pretraining loss")
    ax.grid(alpha=0.3)
    if knn:
        ax = axes[0][1]
        ax.plot(*zip(*knn, strict=True), "o-")
        ax.set(xlabel="iteration", ylabel="top-1 (%)", title="weighted kNN")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- distributed helpers
def _all_gather_object(obj) -> list:
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _any_across_ranks(flag: bool, device: torch.device) -> bool:
    if get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def _wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # static_graph: parameters some configs never use (e.g. an FA generator whose output is
    # detached) are found once, without a graph search every iteration.
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   static_graph=True)


# ----------------------------------------------------------------------------- training
def train(cfg, resume: bool = False) -> dict:
    """Pretrain ``cfg`` (frozen CfgNode); with ``resume``, continue from OUTPUT_DIR/last.pth.

    Returns a summary: ``iter``, ``epoch``, ``loss`` (last logged), ``knn_top1`` (last, or
    None), ``skipped_images``, ``output_dir`` and ``model`` (the trained, unwrapped module).
    Raises ``ConfigError``, ``DataError``, ``CheckpointError`` or ``TrainingError``.
    """
    from pretrain.build import build_model, check_cfg
    from pretrain.knn import build_knn_sets

    check_cfg(cfg)
    check_output_dir(Path(cfg.OUTPUT_DIR), resume)

    device, created_pg = init_distributed(cfg)
    det_before = torch.are_deterministic_algorithms_enabled()
    metrics = bar = None
    try:
        rank, world = get_rank(), get_world_size()
        main = is_main_process()
        batch = check_solver(cfg, world)
        dtype = amp_dtype(cfg.SOLVER.AMP, device)
        if cfg.DETERMINISTIC:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        else:
            torch.backends.cudnn.benchmark = True
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

        # outputs: only once the data is known to be usable and the folder may be written
        out = Path(cfg.OUTPUT_DIR)
        last_path = out / "last.pth"
        ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
        if ckpt is not None:
            check_resume_config(ckpt, cfg, last_path)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)
        setup_logging(out, main)
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
        base_lr = cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        start_iter, skipped = 0, set()
        seed_all(cfg.SEED + rank)
        if ckpt is not None:
            start_iter, skipped = _resume(ckpt, last_path, model, optimizer, scaler, rank, world,
                                          dict(size=len(dataset), ipe=ipe, batch=batch))
        elif resume:
            logger.info(f"--resume: no {last_path} yet, starting from scratch")
        if main:  # the config of the run that now owns the folder
            atomic_write_text(out / "config.yaml", cfg.dump())
        ddp_model = _wrap_ddp(model, device) if world > 1 else model
        metrics = Metrics(out, start_iter, main, cfg.TENSORBOARD)
        logger.info(f"{cfg.MODEL.METHOD} {cfg.MODEL.BACKBONE}: {len(dataset)} images, "
                    f"{world} process(es) x batch {batch}, {ipe} iterations/epoch, "
                    f"iterations {start_iter} -> {total}, lr {base_lr:g}, AMP {dtype or 'off'}, "
                    f"device {device}")

        state = dict(cfg=cfg, model=model, optimizer=optimizer, scaler=scaler, out=out,
                     sampler=dict(seed=cfg.SEED, iters_per_epoch=ipe, batch_per_rank=batch,
                                  world_size=world, dataset_size=len(dataset)))
        it, knn_top1, last_saved, last_loss = start_iter, None, start_iter, None
        knn_init = None  # the same trunk untrained: what pretraining has to beat
        if knn_sets is not None and start_iter == 0 and cfg.KNN.AT_START:
            knn_init = _knn(cfg, model, knn_sets, device, 0, 0, metrics)  # draws no random numbers
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
                set_lr(optimizer, base_lr, lr_factor(it, total, warmup, cfg.SOLVER.SCHEDULE,
                                                     steps, cfg.SOLVER.GAMMA))
                with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
                    outputs = ddp_model(x1, x2)
                loss = outputs["loss"]
                loss_value = loss.item()
                if _any_across_ranks(not math.isfinite(loss_value), device):
                    raise TrainingError(f"loss is {loss_value} at iteration {it + 1} (epoch "
                                        f"{epoch}); stopped, {_last_good(last_path, last_saved)}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                it += 1
                unwrap(ddp_model).after_step(it / total)

                t_step = time.perf_counter()
                _accumulate(window, outputs, loss_value, t_data - t_last, t_step - t_last)
                t_last = t_step
                if main:
                    bar.update(1)
                if it % cfg.LOG_PERIOD == 0 or it == total:
                    skipped = set().union(*_all_gather_object(skipped))
                    record = _summarize(window, it, epoch, optimizer, len(skipped))
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
                    skipped = _save(state, it, done_epochs, skipped, numbered)
                    last_saved = it
                if knn_sets is not None and (
                    (epoch_end and (it // ipe) % cfg.KNN.PERIOD == 0) or it == total
                ):
                    knn_top1 = _knn(cfg, model, knn_sets, device, it, epoch, metrics)
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
                    knn_top1_init=knn_init,
                    skipped_images=len(skipped), output_dir=str(out), model=model)
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
        torch.use_deterministic_algorithms(det_before)
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


# Files a run writes in OUTPUT_DIR; their atomic-write temporaries are ``.NAME.*.tmp``.
RUN_FILES = ("last.pth", "checkpoint_*.pth", "metrics.jsonl", "config.yaml", "curves.png",
             "log.txt")


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse an OUTPUT_DIR that is not a folder, or one that holds another run's checkpoints
    or metrics unless resuming it: a fresh run never replaces them."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUTPUT_DIR {out}: exists and is not a folder")
    if resume or not out.is_dir():
        return
    held = sorted(p.name for pattern in ("last.pth", "checkpoint_*.pth", "metrics.jsonl")
                  for p in out.glob(pattern) if p.is_file() and p.stat().st_size > 0)
    if held:
        raise ConfigError(f"OUTPUT_DIR {out} already holds a run ({', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}): use --resume to continue it, "
                          "or another OUTPUT_DIR")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete what killed atomic writes of this run's own files left behind."""
    stale = [p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_resume_config(ckpt: dict, cfg, path: Path) -> None:
    """A resumed run must train what the checkpoint trained: every key outside
    ``RESUME_FREE_KEYS`` equals the checkpoint's stored config."""
    saved = load_cfg(text=ckpt["config"], source=f"{path} (its stored config)")
    diff = config_differences(saved, cfg)
    if diff:
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ConfigError(f"{path} was written with another config ({'; '.join(diff[:4])}{more}): "
                          "resume with the checkpoint's settings, or start in another OUTPUT_DIR")


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


def _accumulate(window: dict, outputs: dict, loss_value: float, data_time: float,
                step_time: float) -> None:
    window["n"] = window.get("n", 0) + 1
    window["loss"] = window.get("loss", 0.0) + loss_value
    window["data_time"] = window.get("data_time", 0.0) + data_time
    window["time"] = window.get("time", 0.0) + step_time
    for k, v in outputs.items():
        if k != "loss" and (not torch.is_tensor(v) or v.numel() == 1):
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            window[k] = window.get(k, 0.0) + v


def _summarize(window: dict, it: int, epoch: int, optimizer, skipped: int) -> dict:
    n = window.pop("n")
    record = {"iter": it, "epoch": epoch,
              "lr": next(g["lr"] for g in optimizer.param_groups if not g.get("fix_lr"))}
    for k, v in window.items():
        record[k] = round(float(v) / n, 6 if k in ("time", "data_time") else 8)
    record["skipped_images"] = skipped
    window.clear()
    return record


def _save(state: dict, it: int, epoch: int, skipped: set, numbered: bool) -> set:
    """Write last.pth (and checkpoint_EPOCH.pth) on rank 0 with every rank's RNG state."""
    rngs = _all_gather_object(rng_state())
    skipped = set().union(*_all_gather_object(skipped))
    if is_main_process():
        ckpt = build_checkpoint(cfg=state["cfg"], model=state["model"],
                                optimizer=state["optimizer"], scaler=state["scaler"], epoch=epoch,
                                iteration=it, rng=rngs, sampler=state["sampler"],
                                skipped=sorted(skipped))
        last = state["out"] / "last.pth"
        save_checkpoint(ckpt, last)
        if numbered:
            with open(last, "rb") as src:
                atomic_write(state["out"] / f"checkpoint_{epoch:04d}.pth",
                             lambda f: f.write(src.read()))
    return skipped


def _resume(ckpt: dict, path: Path, model, optimizer, scaler, rank: int, world: int,
            data: dict):
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not fit the model of this config ({first})") from None
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    s = ckpt.get("sampler", {})
    if (s.get("dataset_size"), s.get("iters_per_epoch"), s.get("world_size")) != (
        data["size"], data["ipe"], world
    ):
        logger.warning(f"{path} was written with {s.get('dataset_size')} images, "
                       f"{s.get('iters_per_epoch')} iterations/epoch, {s.get('world_size')} "
                       "processes: the data order will differ from an uninterrupted run")
    rngs = ckpt.get("rng") or []
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    else:
        seed_all(int(ckpt["iter"]) * 1000 + rank)
    logger.info(f"resumed from {path} at iteration {ckpt['iter']} (epoch {ckpt['epoch']})")
    return int(ckpt["iter"]), set(ckpt.get("skipped", []))


def _knn(cfg, model, knn_sets, device, it: int, epoch: int, metrics: Metrics) -> float | None:
    """kNN top-1 of the trunk on rank 0 (the other ranks wait)."""
    from pretrain.knn import evaluate_knn

    acc = None
    if is_main_process():
        acc = evaluate_knn(unwrap(model).backbone, *knn_sets, device, k=cfg.KNN.K, t=cfg.KNN.T,
                           batch_size=max(cfg.SOLVER.BATCH_SIZE // get_world_size(), 64),
                           num_workers=cfg.DATALOADER.NUM_WORKERS,
                           channels_last=cfg.SOLVER.CHANNELS_LAST)
        metrics.write({"iter": it, "epoch": epoch, "knn_top1": round(acc, 4)}, "knn")
        logger.info(f"iteration {it}: kNN top-1 {acc:.2f}%")
    if get_world_size() > 1:
        dist.barrier()
    return acc


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default="", metavar="FILE", help="YAML config")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last.pth when it exists")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.MAX_ITER 100 DATA.ROOT imgs/")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_cfg(args.config_file or None, args.opts)
        train(cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"feataug pretrain: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"feataug pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0
