"""A study's disk use, estimated before it runs (``feataug study --dry-run`` prints it).

What a job keeps that matters is its checkpoints: ``last.pth``, plus a copy
``checkpoint_EPOCH.pth`` every ``SOLVER.CHECKPOINT_PERIOD`` epochs where the grid asks for them
(a study job's default is none, ``jobs.STUDY_DEFAULTS``); metrics, logs and records are small
beside them, and a ``random_init`` job writes no checkpoint. The size of ``last.pth`` is measured,
not modelled: the job's model is built with uninitialised memory (on the ``meta`` device, so no
weight is drawn), its optimizer gets the momentum buffer a step gives every trainable parameter,
and the checkpoint ``pretrain.checkpoint.build_checkpoint`` makes of them is serialised with
``torch.save`` into a byte counter. That is the file's size to within the few bytes by which the
configs' text differs, and the small per-step entries a run adds (skipped images, CUDA RNG state,
an fp16 GradScaler's state). Runs that agree on the keys a checkpoint's size follows share one
model build, and checkpoints of one shape are serialised once: a ResNet-18 grid takes ~50 ms a
distinct model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pretrain.solver import total_iterations
from pretrain.utils.io import nearest_existing

from .grid import Grid
from .jobs import RESULT, Job, make_jobs

__all__ = ["RunDisk", "checkpoint_bytes", "checkpoint_files", "estimate", "format_disk",
           "free_bytes", "human"]


@dataclass(frozen=True)
class RunDisk:
    """One run's share: ``checkpoint`` bytes per file (0: no checkpoint), ``files`` checkpoint
    files per seed (``last.pth`` and the numbered copies; None: unknown, the run's data is not
    readable yet to tell its epochs, counted as ``last.pth`` alone), over ``seeds`` seeds."""

    run: str
    checkpoint: int
    files: int | None
    seeds: int

    @property
    def total(self) -> int:
        return self.checkpoint * (self.files or 1) * self.seeds


class _ByteCounter:
    """A write-only file that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _on_cuda(cfg) -> bool:
    """Whether the job will train on CUDA here (``pretrain.engine.launch.init_distributed``)."""
    import torch

    return cfg.DEVICE == "cuda" or (cfg.DEVICE == "auto" and torch.cuda.is_available())


def _meta_model(cfg):
    """The model of ``cfg`` on the ``meta`` device (shapes, no memory, no weight drawn; ~30 ms
    for a ResNet-50 method), None where a module cannot be built there."""
    import torch

    from pretrain.build import build_model

    try:
        with torch.device("meta"):
            return build_model(cfg)
    except Exception:  # noqa: BLE001 - whatever "meta" refuses, a real build does (_measure)
        return None


def _size_key(cfg) -> str:
    """The config keys a checkpoint's size follows: the model (method, trunk, heads, MoCo queue),
    FA's node when it is on (its modules), what the optimizer keeps per parameter, the parameter
    groups, the memory layout and whether the model lives on CUDA."""
    s = cfg.SOLVER
    return json.dumps([cfg.MODEL, cfg.FA if cfg.FA.ENABLED else None, s.OPTIMIZER,
                       s.MOMENTUM != 0, s.FIX_PRED_LR, s.CHANNELS_LAST, _on_cuda(cfg)],
                      sort_keys=True, default=str)


_SIZES: dict[str, int] = {}  # _size_key -> bytes
_SHAPES: dict[tuple, int] = {}  # _shape -> bytes


def checkpoint_bytes(cfg) -> int:
    """Bytes of the ``last.pth`` a run of ``cfg`` writes (see the module's docstring). The model
    is built on ``meta`` once per ``_size_key``, and for real (empty memory) and serialised once
    per checkpoint shape."""
    key = _size_key(cfg)
    if key not in _SIZES:
        shape = _shape(cfg)
        if shape is None:
            _SIZES[key] = _measure(cfg)
        else:
            if shape not in _SHAPES:
                _SHAPES[shape] = _measure(cfg)
            _SIZES[key] = _SHAPES[shape]
    return _SIZES[key]


def _shape(cfg) -> tuple | None:
    """What a checkpoint's size follows besides the config's text: every state tensor's name,
    shape and dtype, the parameter groups (their keys and tensors), the optimizer's state per
    parameter, the memory layout and the device. None where the model cannot be built on meta."""
    model = _meta_model(cfg)
    if model is None:
        return None
    s = cfg.SOLVER
    tensors = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    groups = tuple((tuple(sorted(g)), tuple(tuple(p.shape) for p in g["params"]))
                   for g in model.param_groups())
    return (tensors, groups, s.OPTIMIZER, s.MOMENTUM != 0, s.CHANNELS_LAST, _on_cuda(cfg))


def _measure(cfg, meta: bool = True) -> int:
    """Bytes of ``torch.save`` of the checkpoint of ``cfg``'s model and optimizer state, built
    with uninitialised memory where ``meta`` allows (values do not change the size)."""
    import torch

    from pretrain.build import build_model
    from pretrain.checkpoint import build_checkpoint
    from pretrain.solver import build_optimizer

    model = _meta_model(cfg) if meta else None
    if model is not None:
        model = model.to_empty(device="cpu")
    else:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
            model = build_model(cfg)
    if cfg.SOLVER.CHANNELS_LAST:  # the trunk's copy is then contiguous memory of its own
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    if cfg.SOLVER.OPTIMIZER == "lars" or cfg.SOLVER.MOMENTUM:  # solver.SGD / LARS: one buffer
        for group in optimizer.param_groups:  # per trainable parameter from its first step on
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.empty_like(p)
    sampler = dict(seed=cfg.SEED, iters_per_epoch=0, batch_per_rank=cfg.SOLVER.BATCH_SIZE,
                   world_size=1, dataset_size=0)
    ckpt = build_checkpoint(cfg=cfg, model=model, optimizer=optimizer, epoch=0, iteration=0,
                            sampler=sampler)
    if _on_cuda(cfg):  # the trunk's CPU copy shares no memory with a model on the GPU
        ckpt["backbone"] = {k: v.clone() for k, v in ckpt["backbone"].items()}
    counter = _ByteCounter()
    torch.save(ckpt, counter)
    return counter.n


_IMAGES: dict[tuple, int] = {}  # (DATA.ROOT, DATA.FORMAT, DATA.MAX_IMAGES) -> images


def _images(root: str, fmt: str, max_images: int) -> int | None:
    """Number of pretraining images (None: not readable, e.g. not prepared yet; not kept, so
    the data can be prepared in between)."""
    from pretrain.data import load_source
    from pretrain.errors import FeatAugError

    key = (root, fmt, max_images)
    if key not in _IMAGES:
        try:
            _IMAGES[key] = len(load_source(root, fmt, max_images))
        except (FeatAugError, OSError, ValueError):
            return None
    return _IMAGES[key]


def checkpoint_files(cfg) -> int | None:
    """``last.pth`` plus the numbered copies a one-process run of ``cfg`` writes: one at the end
    of every ``CHECKPOINT_PERIOD``-th completed epoch (``hooks.Checkpointer``). None when that
    needs the number of images (a run of ``SOLVER.MAX_ITER`` iterations) and the data cannot be
    read."""
    s = cfg.SOLVER
    if s.CHECKPOINT_PERIOD <= 0:
        return 1
    if s.EPOCHS > 0 and s.MAX_ITER <= 0:
        epochs = s.EPOCHS
    else:
        images = _images(cfg.DATA.ROOT, cfg.DATA.FORMAT, cfg.DATA.MAX_IMAGES)
        if images is None:
            return None
        ipe = max(images // s.BATCH_SIZE, 1)  # (fewer images than one batch: the run refuses)
        epochs = total_iterations(cfg, ipe) // ipe
    return 1 + epochs // s.CHECKPOINT_PERIOD


def estimate(grid: Grid, out: str | Path, seeds: Sequence[int],
             pending_only: bool = False) -> list[RunDisk]:
    """Per run of ``grid``: its checkpoint size and files over ``seeds`` (with ``pending_only``,
    over the seeds whose job in ``out`` has no result yet)."""
    rows = []
    jobs = make_jobs(grid, Path(out), seeds)
    for run in grid.runs:
        mine: list[Job] = [j for j in jobs if j.run is run and not (
            pending_only and (Path(j.output_dir) / RESULT).is_file())]
        if not mine:
            continue
        if run.random_init:
            rows.append(RunDisk(run.name, 0, 0, len(mine)))
            continue
        cfg = mine[0].cfg()
        rows.append(RunDisk(run.name, checkpoint_bytes(cfg), checkpoint_files(cfg), len(mine)))
    return rows


def free_bytes(out: str | Path) -> tuple[int, Path]:
    """Free bytes of the file system ``out`` will be on, and the existing folder asked."""
    folder = nearest_existing(out)
    return shutil.disk_usage(folder).free, folder


def human(n: float) -> str:
    """Bytes in MB below a GB, else GB (decimal units, as ``df -H``)."""
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def format_disk(rows: Sequence[RunDisk], out: str | Path, jobs: int) -> tuple[str, str | None]:
    """The estimate as printed after the plan, and a warning line when the study needs more than
    the free space of ``out``'s file system (None otherwise). "Needs" counts, beside the files
    kept, one checkpoint's atomic-write temporary for each of the ``jobs`` jobs run at once."""
    lines = ["disk (estimated): last.pth size x checkpoint files per seed (last.pth + numbered "
             "copies) x seeds"]
    for r in rows:
        if r.checkpoint == 0:
            lines.append(f"  {r.run:<40} no checkpoint")
            continue
        files = "?" if r.files is None else str(r.files)
        lines.append(f"  {r.run:<40} {human(r.checkpoint):>9} x {files} x {r.seeds} "
                     f"= {human(r.total)}")
    total = sum(r.total for r in rows)
    temporaries = min(jobs, sum(r.seeds for r in rows if r.checkpoint)) * max(
        (r.checkpoint for r in rows), default=0)
    free, folder = free_bytes(out)
    lines.append(f"  total {human(total)} (+ up to {human(temporaries)} of temporaries while "
                 f"{jobs} job(s) write a checkpoint); free: {human(free)} on the file system of "
                 f"{folder}")
    if any(r.files is None for r in rows):
        lines.append("  ?: numbered copies not counted, the run's DATA.ROOT is not readable yet "
                     "(its epochs follow from the number of images)")
    warning = None
    if total + temporaries > free:
        warning = (f"warning: the study needs about {human(total + temporaries)} of disk, more "
                   f"than the {human(free)} free on the file system of {folder}")
    return "\n".join(lines), warning
