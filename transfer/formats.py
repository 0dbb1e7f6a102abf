"""Pretraining checkpoints: read without running anything from them, and where each known
format keeps its ResNet trunk.

A self-supervised checkpoint keeps the trunk somewhere inside it, under a key prefix that depends
on the code that wrote it (``module.encoder_q.`` for MoCo, ``module.encoder.`` for SimSiam, ...).
:data:`FORMATS` lists where each known format keeps it; :func:`detect_format` finds it, by
auto-detection or for a named format.

:func:`read_checkpoint` reads a file with :func:`pretrain.utils.safe_load.load_torch`, which
imports no class or function the file names beyond an allow-list (tensors, numpy arrays,
containers, ``argparse.Namespace``) and keeps other objects as inert placeholders; a plain pickle
(``pickle.dump``) is read by its restricted unpickler.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import CheckpointError
from pretrain.utils import safe_load

__all__ = ["FORMATS", "FORMAT_NAMES", "ConvertError", "Format", "detect_format", "listing",
           "read_checkpoint"]  # fmt: skip


class ConvertError(CheckpointError):
    """A checkpoint that cannot be converted exactly. The message is one line naming the file."""


def listing(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` of ``keys``, comma-separated, with the count when there are more."""
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """Where a checkpoint format keeps its ResNet trunk.

    The trunk is the mapping found by following one of ``containers`` (a key path from the top of
    the checkpoint; ``()`` is the checkpoint itself), restricted to the keys starting with one of
    ``prefixes``. ``marker``, if set, is a top-level key auto-detection also requires.
    ``sequential``: the trunk is torchvision's ResNet children as an ``nn.Sequential`` (keys
    ``0.`` conv1, ``1.`` bn1, ``4.`` .. ``7.`` layer1..layer4; see
    :data:`transfer.resnet_trunk.SEQUENTIAL_CHILDREN`).
    """

    name: str
    title: str
    containers: tuple[tuple[str, ...], ...]
    prefixes: tuple[str, ...]
    marker: str | None = None
    sequential: bool = False

    @property
    def probe(self) -> str:
        """What a key of the first residual stage starts with, after the prefix."""
        return "4.0.conv1." if self.sequential else "layer1."


# Order matters for auto-detection: the first format whose trunk is found wins.
FORMATS: tuple[Format, ...] = (
    Format("feataug", "FeatAug pretraining checkpoint", (("backbone",),), ("",)),
    Format("moco", "MoCo v1/v2", (("state_dict",),), ("module.encoder_q.",)),
    Format("simsiam", "SimSiam", (("state_dict",),), ("module.encoder.",)),
    Format("mocov3", "MoCo v3", (("state_dict",),), ("module.base_encoder.",)),
    Format(
        "solo-learn",
        "solo-learn (PyTorch Lightning)",
        (("state_dict",),),
        ("backbone.",),
        marker="pytorch-lightning_version",
    ),
    Format("densecl", "DenseCL / mmselfsup", (("state_dict",),), ("backbone.",)),
    Format("pixpro", "PixPro", (("model",),), ("module.encoder.",)),
    Format(
        "vissl",
        "VISSL",
        (("classy_state_dict", "base_model", "model", "trunk"),),
        ("_feature_blocks.",),
    ),
    Format(
        "lightly",
        "lightly (torchvision ResNet children as nn.Sequential)",
        ((), ("state_dict",), ("model",)),
        ("backbone.", "module.backbone.", "", "module."),
        sequential=True,
    ),
    Format(
        "torchvision",
        "torchvision ResNet state_dict",
        ((), ("state_dict",), ("model",)),
        ("", "module."),
    ),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, notes: list[str] | None = None) -> Mapping:
    """Read a checkpoint on the CPU without running anything from it.

    :func:`pretrain.utils.safe_load.load_torch` with placeholders: tensors, numpy arrays,
    containers and ``argparse.Namespace`` are read; objects of any other class (hyper-parameters
    or options of training code) become inert placeholders, whose names are added to ``notes``.
    A plain pickle (``pickle.dump``) is read with the numpy allow-list, its arrays as tensors.
    """
    try:
        ckpt = safe_load.load_torch(path, placeholders=True, notes=notes)
    except safe_load.UnsafeFileError as e:
        ckpt = _plain_pickle(Path(path), e)
        if isinstance(ckpt, Mapping) and not _count_tensors(ckpt):
            keys = listing([str(k) for k in ckpt])
            raise ConvertError(
                f"{path}: a plain pickle with no model weights (keys: {keys})"
            ) from None
    foreign = safe_load.placeholder_name(ckpt)
    if foreign is not None:
        raise ConvertError(f"{path}: not a checkpoint (the top level is a {foreign} object)")
    if not isinstance(ckpt, Mapping):
        raise ConvertError(
            f"{path}: not a checkpoint (top level is a {type(ckpt).__name__}, not a dict)"
        )
    return ckpt


def _plain_pickle(path: Path, torch_error: Exception) -> Any:
    """``path`` read as a plain pickle (numpy arrays become tensors); ``torch_error`` where it
    is no pickle, or a legacy ``torch.save`` file that torch could not read."""
    if zipfile.is_zipfile(path):
        raise ConvertError(str(torch_error))
    try:
        obj = safe_load.load_pickle(path)
    except safe_load.UnsafeFileError as e:  # a refused global is named; else torch's reason
        raise ConvertError(str(e if "refused to load" in str(e) else torch_error)) from None
    if type(obj) is int and obj == torch.serialization.MAGIC_NUMBER:  # a legacy torch file
        raise ConvertError(str(torch_error))

    def tensors(node: Any) -> Any:
        if isinstance(node, np.ndarray):
            return torch.from_numpy(np.array(node))  # a writable copy
        return {k: tensors(v) for k, v in node.items()} if isinstance(node, Mapping) else node

    return tensors(obj)


def _count_tensors(node: Any) -> int:
    if isinstance(node, torch.Tensor):
        return 1
    return sum(map(_count_tensors, node.values())) if isinstance(node, Mapping) else 0


# ----------------------------------------------------------------------------- detection


def _follow(ckpt: Mapping, keys: tuple[str, ...]) -> Mapping | None:
    node: Any = ckpt
    for k in keys:
        node = node.get(k) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _locate(ckpt: Mapping, fmt: Format, use_marker: bool = True):
    """``(container path, container, prefix)`` of ``fmt``'s trunk in ``ckpt``, or ``None``.

    A trunk is found where some key starts with ``prefix + fmt.probe`` (the first residual stage).
    """
    if use_marker and fmt.marker is not None and fmt.marker not in ckpt:
        return None
    for path in fmt.containers:
        node = _follow(ckpt, path)
        if node is None:
            continue
        for prefix in fmt.prefixes:
            probe = prefix + fmt.probe
            if any(isinstance(k, str) and k.startswith(probe) for k in node):
                return path, node, prefix
    return None


def _seen(ckpt: Mapping) -> str:
    """A short description of what a checkpoint holds, for 'no trunk found' messages."""
    top = [str(k) for k in ckpt]
    prefixes: Counter = Counter()
    for k, v in ckpt.items():
        if isinstance(v, Mapping):
            for kk in v:
                parts = str(kk).split(".")
                prefixes[f"{k}: " + ".".join(parts[:2]) + ("." if len(parts) > 2 else "")] += 1
        elif isinstance(v, torch.Tensor):
            parts = str(k).split(".")
            prefixes[".".join(parts[:2]) + ("." if len(parts) > 2 else "")] += 1
    shown = ", ".join(p for p, _ in prefixes.most_common(8))
    return f"top-level keys [{', '.join(top[:12])}{', ...' if len(top) > 12 else ''}]" + (
        f"; key prefixes [{shown}]" if shown else ""
    )


def detect_format(ckpt: Mapping, name: str = "auto", source: str = "checkpoint"):
    """``(Format, container path, container, prefix)`` of the trunk in ``ckpt``.

    ``name="auto"`` tries :data:`FORMATS` in order; a format name forces that format.
    """
    if name == "auto":
        candidates, use_marker = FORMATS, True
    else:
        if name not in FORMAT_NAMES:
            raise ConvertError(f"unknown format {name!r} (known: {', '.join(FORMAT_NAMES)})")
        candidates, use_marker = tuple(f for f in FORMATS if f.name == name), False
    for fmt in candidates:
        found = _locate(ckpt, fmt, use_marker)
        if found is not None:
            return (fmt, *found)
    what = "no ResNet trunk found" if name == "auto" else f"no {name} ResNet trunk found"
    raise ConvertError(f"{source}: {what}; {_seen(ckpt)}")
