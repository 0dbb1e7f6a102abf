"""Pretraining checkpoints: the schema every other tool reads, written atomically.

A checkpoint is a ``torch.save`` dict:

==============  =====================================================================
``version``     schema version (``VERSION``)
``config``      the run's full config as a YAML string
``epoch``       completed epochs
``iter``        completed iterations (optimizer steps)
``model``       the full model ``state_dict`` (MoCo's queue and pointer are buffers in it)
``optimizer``   optimizer ``state_dict``
``backbone``    the query/online ResNet trunk in torchvision names, without ``fc``
``arch``        ``{"name": "resnet50", "stem": "imagenet" | "cifar"}``
``scaler``      GradScaler ``state_dict`` (``None`` without fp16)
``rng``         per-rank RNG states: python, numpy, torch and CUDA
``sampler``     data-order state: seed, epoch, iterations per epoch, per-rank batch, world size
``skipped``     indices of unreadable images found so far
``provenance``  what produced the run: the record in ``provenance.json``
                (``pretrain.utils.provenance``), plain data; None when built outside a run,
                absent from checkpoints written before it (they load all the same)
==============  =====================================================================

Everything in it loads with ``torch.load(weights_only=True)``; FeatAug reads it, as every file,
through ``pretrain.utils.safe_load``: a file that asks for any other Python object is refused,
nothing in it runs.

The rest of this module is the run folder's side of checkpoints: a fresh run never replaces
another's files, a resumed run must train what its checkpoint trained, and the temporaries of
killed writes are removed.
"""

from __future__ import annotations

import logging
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import config_differences, load_cfg
from .errors import CheckpointError, ConfigError, reason
from .utils.dist import all_gather_object, is_main_process, unwrap
from .utils.env import seed_all
from .utils.io import atomic_torch_save, atomic_write, check_output_folder
from .utils.lock import LOCK_NAME
from .utils.safe_load import UnsafeFileError, load_torch

logger = logging.getLogger("pretrain")

VERSION = 1
REQUIRED_KEYS = ("version", "config", "epoch", "iter", "model", "optimizer", "backbone", "arch")


def rng_state() -> dict[str, Any]:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def backbone_state(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The trunk's weights in torchvision names, without ``fc``, contiguous, on the CPU."""
    sd = unwrap(model).backbone.state_dict()
    return OrderedDict((k, v.detach().cpu().contiguous()) for k, v in sd.items()
                       if not k.startswith("fc."))


def build_checkpoint(*, cfg, model, optimizer, epoch: int, iteration: int, scaler=None,
                     rng: list | None = None, sampler: dict | None = None,
                     skipped: list[int] | None = None,
                     provenance: dict | None = None) -> dict[str, Any]:
    m = unwrap(model)
    return {
        "version": VERSION,
        "config": cfg.dump(),
        "epoch": int(epoch),
        "iter": int(iteration),
        "model": m.state_dict(),
        "optimizer": optimizer.state_dict(),
        "backbone": backbone_state(m),
        "arch": m.backbone_spec(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng if rng is not None else [rng_state()],
        "sampler": sampler or {},
        "skipped": sorted(skipped or []),
        "provenance": provenance,
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically: readers see the previous file or the complete new one."""
    atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a pretraining checkpoint, checking the schema; raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = load_torch(path)  # nothing from the file runs
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a pretraining checkpoint (a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a FeatAug pretraining checkpoint "
                              f"(missing {', '.join(missing)})")
    kinds = {"version": int, "config": str, "epoch": int, "iter": int, "model": dict,
             "optimizer": dict, "backbone": dict, "arch": dict}
    wrong = [f"{k} is a {type(ckpt[k]).__name__}, not {t.__name__}" for k, t in kinds.items()
             if not isinstance(ckpt[k], t) or isinstance(ckpt[k], bool)]
    if not isinstance(ckpt.get("provenance") or {}, dict):  # optional: older ones lack it
        wrong.append(f"provenance is a {type(ckpt['provenance']).__name__}, not dict")
    if wrong:
        raise CheckpointError(f"{path}: not a FeatAug pretraining checkpoint ({'; '.join(wrong)})")
    if ckpt["version"] > VERSION:
        raise CheckpointError(f"{path}: schema version {ckpt['version']} is newer than this "
                              f"FeatAug's ({VERSION}); upgrade FeatAug")
    bad = next((k for k, v in ckpt["backbone"].items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: backbone[{bad!r}] is a "
                              f"{type(ckpt['backbone'][bad]).__name__}, not a tensor")
    return ckpt


# ----------------------------------------------------------------------------- the run folder
# Files a run writes in OUTPUT_DIR; their atomic-write temporaries are ``.NAME.*.tmp``.
RUN_FILES = ("last.pth", "checkpoint_*.pth", "metrics.jsonl", "config.yaml", "curves.png",
             "log.txt", "provenance.json")


def check_output_dir(out: Path, resume: bool) -> None:
    """Refuse an OUTPUT_DIR that is not a folder or cannot be created or written, or one that
    holds another run's checkpoints or metrics unless resuming it: a fresh run never replaces
    them. A folder with only a lock file (``pretrain.utils.lock``) holds no run."""
    check_output_folder(out, ConfigError)
    if resume or not out.is_dir():
        return
    held = sorted(p.name for pattern in ("last.pth", "checkpoint_*.pth", "metrics.jsonl")
                  for p in out.glob(pattern) if p.is_file() and p.stat().st_size > 0)
    if held:
        raise ConfigError(f"OUTPUT_DIR {out} already holds a run ({', '.join(held[:3])}"
                          f"{', ...' if len(held) > 3 else ''}): use --resume to continue it, "
                          "or another OUTPUT_DIR")


def check_data_paths(cfg) -> None:
    """Refuse image folders that would hold a run's own files (``curves.png`` read as an image):
    OUTPUT_DIR inside DATA.ROOT, DATA.KNN_TRAIN_ROOT or DATA.KNN_VAL_ROOT; DATA.ROOT inside
    OUTPUT_DIR or inside any folder holding a FeatAug run (``last.pth`` and ``config.yaml``, or
    a lock file). Links are resolved; only folder-format data is scanned, so only it is checked."""
    out = Path(os.path.realpath(cfg.OUTPUT_DIR))
    knn = cfg.DATA.KNN_FORMAT or cfg.DATA.FORMAT
    for key, fmt in (("ROOT", cfg.DATA.FORMAT), ("KNN_TRAIN_ROOT", knn), ("KNN_VAL_ROOT", knn)):
        value = cfg.DATA[key]
        if value and fmt == "folder" and out.is_relative_to(os.path.realpath(value)):
            raise ConfigError(f"OUTPUT_DIR {cfg.OUTPUT_DIR} is inside DATA.{key} {value}: the "
                              "run's files would be read as images; use an OUTPUT_DIR outside it")
    if not cfg.DATA.ROOT or cfg.DATA.FORMAT != "folder":
        return
    root = Path(os.path.realpath(cfg.DATA.ROOT))
    if root.is_relative_to(out):
        raise ConfigError(f"DATA.ROOT {cfg.DATA.ROOT} is inside OUTPUT_DIR {cfg.OUTPUT_DIR}: the "
                          "run's files would be read as images; keep the data outside it")
    run = next((p for p in (root, *root.parents) if _holds_run(p)), None)
    if run is not None:
        raise ConfigError(f"DATA.ROOT {cfg.DATA.ROOT} is inside {run}, the OUTPUT_DIR of a "
                          "FeatAug run: its files would be read as images; keep the data "
                          "outside it")


def _holds_run(folder: Path) -> bool:
    return ((folder / "last.pth").is_file() and (folder / "config.yaml").is_file()) or \
        (folder / LOCK_NAME).exists()


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete what killed atomic writes of this run's own files left behind."""
    stale = [p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_resume_config(ckpt: dict, cfg, path: Path) -> None:
    """A resumed run must train what the checkpoint trained: every key outside
    ``config.RESUME_FREE_KEYS`` equals the checkpoint's stored config."""
    saved = load_cfg(text=ckpt["config"], source=f"{path} (its stored config)")
    diff = config_differences(saved, cfg)
    if diff:
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ConfigError(f"{path} was written with another config ({'; '.join(diff[:4])}{more}): "
                          "resume with the checkpoint's settings, or start in another OUTPUT_DIR")


def save_run(state: dict, it: int, epoch: int, skipped: set, numbered: bool) -> set:
    """Write ``last.pth`` (and ``checkpoint_EPOCH.pth``) on rank 0 with every rank's RNG state;
    returns the union of every rank's skipped images."""
    rngs = all_gather_object(rng_state())
    skipped = set().union(*all_gather_object(skipped))
    if is_main_process():
        ckpt = build_checkpoint(cfg=state["cfg"], model=state["model"],
                                optimizer=state["optimizer"], scaler=state["scaler"], epoch=epoch,
                                iteration=it, rng=rngs, sampler=state["sampler"],
                                skipped=sorted(skipped), provenance=state.get("provenance"))
        last = state["out"] / "last.pth"
        save_checkpoint(ckpt, last)
        if numbered:
            with open(last, "rb") as src:
                atomic_write(state["out"] / f"checkpoint_{epoch:04d}.pth",
                             lambda f: f.write(src.read()))
    return skipped


def resume_run(ckpt: dict, path: Path, model, optimizer, scaler, rank: int, world: int,
               data: dict) -> tuple[int, set]:
    """Load model, optimizer, scaler and this rank's RNG state; returns (iteration, skipped)."""
    try:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not fit the model of this config ({first})") from None
    fields = [("scaler", scaler.load_state_dict)] if scaler.is_enabled() and ckpt.get("scaler") \
        else []
    s = ckpt.get("sampler", {})
    if (s.get("dataset_size"), s.get("iters_per_epoch"), s.get("world_size")) != (
        data["size"], data["ipe"], world
    ):
        logger.warning(f"{path} was written with {s.get('dataset_size')} images, "
                       f"{s.get('iters_per_epoch')} iterations/epoch, {s.get('world_size')} "
                       "processes: the data order will differ from an uninterrupted run")
    rngs = ckpt.get("rng") or []
    if isinstance(rngs, list) and len(rngs) == world:
        fields.append(("rng", lambda rngs: set_rng_state(rngs[rank])))
    else:
        seed_all(int(ckpt["iter"]) * 1000 + rank)
    for field, load in fields:  # plain data a crafted file may shape in any way: one line
        try:
            load(ckpt[field])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{path}: field '{field}' does not fit this run "
                                  f"({reason(e, with_type=True)})") from None
    logger.info(f"resumed from {path} at iteration {ckpt['iter']} (epoch {ckpt['epoch']})")
    return int(ckpt["iter"]), set(ckpt.get("skipped", []))
