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
==============  =====================================================================

Everything in it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feataug.io import atomic_torch_save

VERSION = 1
REQUIRED_KEYS = ("version", "config", "epoch", "iter", "model", "optimizer", "backbone", "arch")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or is not a pretraining checkpoint."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


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
                     skipped: list[int] | None = None) -> dict[str, Any]:
    m = unwrap(model)
    return {
        "version": VERSION,
        "config": cfg.dump(),
        "epoch": int(epoch),
        "iter": int(iteration),
        "model": m.state_dict(),
        "optimizer": optimizer.state_dict(),
        "backbone": backbone_state(m),
        "arch": dict(m.arch()),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng if rng is not None else [rng_state()],
        "sampler": sampler or {},
        "skipped": sorted(skipped or []),
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically: readers see the previous file or the complete new one."""
    atomic_torch_save(ckpt, path)


def load_failure(e: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``; names a refused global."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found:
        return (f"refused: the file asks to run {found.group(1)}, which is not a tensor, array or "
                "plain container (nothing was executed)")
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"not a readable checkpoint ({reason[:200]})"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a pretraining checkpoint, checking the schema; raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        raise CheckpointError(f"{path}: {load_failure(e)}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a pretraining checkpoint (a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a FeatAug pretraining checkpoint "
                              f"(missing {', '.join(missing)})")
    if ckpt["version"] > VERSION:
        raise CheckpointError(f"{path}: schema version {ckpt['version']} is newer than this "
                              f"FeatAug's ({VERSION}); upgrade FeatAug")
    return ckpt
