"""Convert a pretrained ResNet trunk into Detectron2 weights, exactly or not at all.

One concern: conversion (formats, checks, renaming, the command), kept together so that every
format's rule can be read in one place.

A self-supervised checkpoint keeps the trunk somewhere inside it, under a key prefix that
depends on the code that wrote it (``module.encoder_q.`` for MoCo, ``module.encoder.`` for
SimSiam, ...). :data:`FORMATS` lists where each known format keeps it; the trunk is found by
auto-detection (or ``--format``), checked against the torchvision ResNet of the depth its keys
imply (every key present, every shape right, no unknown tensors, an ImageNet 7x7 stem), renamed
to Detectron2's ResNet names and written as the pickle Detectron2's ``DetectionCheckpointer``
reads::

    {"model": {name: numpy array}, "__author__": "feataug", "matching_heuristics": True}

Name mapping (torchvision -> Detectron2)::

    conv1                     -> stem.conv1            bn1          -> stem.conv1.norm
    layer{i}.{b}.conv{k}      -> res{i+1}.{b}.conv{k}  bn{k}        -> res{i+1}.{b}.conv{k}.norm
    layer{i}.{b}.downsample.0 -> res{i+1}.{b}.shortcut downsample.1 -> res{i+1}.{b}.shortcut.norm

Heads (``fc``), momentum encoders, queues, predictors and ``num_batches_tracked`` are dropped and
reported. Anything that would make the conversion inexact is refused with one line and no output.

Nothing in the input is run: it is read by :func:`pretrain.utils.safe_load.load_torch`, which imports
no class or function the file names beyond an allow-list (tensors, numpy arrays, containers,
``argparse.Namespace``) and keeps other objects as inert placeholders. The output is never the
input (under any path or link) and replaces an existing file only with ``--overwrite``.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import shlex
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import CheckpointError
from pretrain.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.utils import safe_load
from pretrain.utils.io import atomic_write

__all__ = [
    "FORMATS",
    "ConvertError",
    "Conversion",
    "Format",
    "convert",
    "convert_checkpoint",
    "detectron2_opts",
    "detect_format",
    "infer_depth",
    "read_checkpoint",
    "torchvision_to_detectron2",
]

# ImageNet normalisation of torchvision-style weights, in Detectron2's 0-255 pixel units.
PIXEL_MEAN = tuple(round(255 * m, 3) for m in IMAGENET_MEAN)  # (123.675, 116.28, 103.53)
PIXEL_STD = tuple(round(255 * s, 3) for s in IMAGENET_STD)  # (58.395, 57.12, 57.375)

# (blocks per stage, bottleneck?) -> depth
DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


class ConvertError(CheckpointError):
    """A checkpoint that cannot be converted exactly. The message is one line naming the file."""


@dataclass(frozen=True)
class Format:
    """Where a checkpoint format keeps its ResNet trunk.

    The trunk is the mapping found by following one of ``containers`` (a key path from the top of
    the checkpoint; ``()`` is the checkpoint itself), restricted to the keys starting with one of
    ``prefixes``. ``marker``, if set, is a top-level key auto-detection also requires.
    """

    name: str
    title: str
    containers: tuple[tuple[str, ...], ...]
    prefixes: tuple[str, ...]
    marker: str | None = None


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
        "torchvision",
        "torchvision ResNet state_dict",
        ((), ("state_dict",), ("model",)),
        ("", "module."),
    ),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)


@dataclass
class Conversion:
    """The result of a conversion and what was found on the way."""

    source: str
    format: Format
    container: tuple[str, ...]
    prefix: str
    depth: int
    model: dict[str, np.ndarray]  # Detectron2 names
    dropped: Counter = field(default_factory=Counter)  # key group -> number of tensors dropped
    ignored: list[str] = field(default_factory=list)  # other top-level keys of the checkpoint
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        where = "".join(f"[{k!r}]" for k in self.container) or "top level"
        lines = [
            f"{self.source}: {self.format.title} ({self.format.name}), ResNet-{self.depth}, "
            f"trunk at {where} with prefix {self.prefix!r}",
            f"kept {len(self.model)} tensors ({sum(a.size for a in self.model.values()):,} values)",
        ]
        if self.dropped:
            groups = ", ".join(f"{k} ({n})" for k, n in sorted(self.dropped.items()))
            lines.append(f"dropped {sum(self.dropped.values())} tensors: {groups}")
        if self.ignored:
            lines.append("ignored top-level keys: " + ", ".join(self.ignored))
        return lines + [f"note: {n}" for n in self.notes]


# ----------------------------------------------------------------------------- loading


def read_checkpoint(path: str | Path, notes: list[str] | None = None) -> Mapping:
    """Read a checkpoint on the CPU without running anything from it.

    :func:`pretrain.utils.safe_load.load_torch` with placeholders: tensors, numpy arrays, containers
    and ``argparse.Namespace`` are read; objects of any other class (hyper-parameters or
    options of training code) become inert placeholders, whose names are added to ``notes``.
    """
    try:
        ckpt = safe_load.load_torch(path, placeholders=True, notes=notes)
    except safe_load.UnsafeFileError as e:
        raise ConvertError(str(e)) from None
    foreign = safe_load.placeholder_name(ckpt)
    if foreign is not None:
        raise ConvertError(f"{path}: not a checkpoint (the top level is a {foreign} object)")
    if not isinstance(ckpt, Mapping):
        raise ConvertError(
            f"{path}: not a checkpoint (top level is a {type(ckpt).__name__}, not a dict)"
        )
    return ckpt


# ----------------------------------------------------------------------------- detection


def _follow(ckpt: Mapping, keys: tuple[str, ...]) -> Mapping | None:
    node: Any = ckpt
    for k in keys:
        node = node.get(k) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _locate(ckpt: Mapping, fmt: Format, use_marker: bool = True):
    """``(container path, container, prefix)`` of ``fmt``'s trunk in ``ckpt``, or ``None``.

    A trunk is found where some key starts with ``prefix + "layer1."`` (the first residual stage).
    """
    if use_marker and fmt.marker is not None and fmt.marker not in ckpt:
        return None
    for path in fmt.containers:
        node = _follow(ckpt, path)
        if node is None:
            continue
        for prefix in fmt.prefixes:
            probe = prefix + "layer1."
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


# ----------------------------------------------------------------------------- checking


def infer_depth(trunk: Mapping[str, Any], source: str = "checkpoint") -> int:
    """ResNet depth implied by torchvision-named trunk keys (blocks per stage, block type)."""
    blocks = []
    for i in range(1, 5):
        idx = [int(m.group(1)) for k in trunk if (m := re.match(rf"layer{i}\.(\d+)\.", k))]
        blocks.append(max(idx) + 1 if idx else 0)
    bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in trunk)
    depth = DEPTHS.get((tuple(blocks), bottleneck))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ConvertError(
            f"{source}: not a ResNet-18/34/50/101/152 trunk "
            f"({kind} blocks per stage {'-'.join(map(str, blocks))})"
        )
    return depth


@functools.cache
def _reference_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """Trunk key -> shape of torchvision's ResNet-``depth`` (built on the meta device: no memory)."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, f"resnet{depth}")()
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_trunk(trunk: Mapping[str, torch.Tensor], depth: int, source: str) -> None:
    ref = _reference_shapes(depth)
    missing = [k for k in ref if k not in trunk]
    if missing:
        raise ConvertError(f"{source}: ResNet-{depth} keys missing: {_listing(missing)}")
    unknown = [k for k in trunk if k not in ref]
    if unknown:
        raise ConvertError(
            f"{source}: trunk has tensors a torchvision ResNet-{depth} does not: {_listing(unknown)}"
        )
    wrong = [
        f"{k} {tuple(trunk[k].shape)} (expected {ref[k]})"
        for k in ref
        if tuple(trunk[k].shape) != ref[k]
    ]
    if wrong:
        raise ConvertError(f"{source}: shape mismatch for ResNet-{depth}: {_listing(wrong, 4)}")


def _check_stem(ckpt: Mapping, fmt: Format, trunk: Mapping[str, torch.Tensor], source: str):
    arch = ckpt.get("arch") if fmt.name == "feataug" else None
    if isinstance(arch, Mapping) and arch.get("stem", "imagenet") != "imagenet":
        raise ConvertError(
            f"{source}: backbone has a {arch.get('stem')!r} stem (arch.stem); Detectron2's ResNet "
            "needs the ImageNet stem (7x7 conv1 + max-pool)"
        )
    conv1 = trunk.get("conv1.weight")
    if isinstance(conv1, torch.Tensor) and conv1.dim() == 4 and tuple(conv1.shape[2:]) != (7, 7):
        k = "x".join(map(str, conv1.shape[2:]))
        raise ConvertError(
            f"{source}: conv1 is {k}, a CIFAR-style stem; Detectron2's ResNet needs the "
            "ImageNet stem (7x7 conv1 + max-pool)"
        )


# ----------------------------------------------------------------------------- renaming


_BLOCK_KEY = re.compile(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)")


def torchvision_to_detectron2(name: str) -> str:
    """``'layer2.0.downsample.1.running_var'`` -> ``'res3.0.shortcut.norm.running_var'``."""
    module, _, param = name.rpartition(".")
    if module == "conv1":
        return f"stem.conv1.{param}"
    if module == "bn1":
        return f"stem.conv1.norm.{param}"
    m = _BLOCK_KEY.fullmatch(name)
    if m is None:
        raise ValueError(f"not a torchvision ResNet trunk key: {name!r}")
    stage, block, layer, param = m.groups()
    res = f"res{int(stage) + 1}.{block}"
    layer = {
        "downsample.0": "shortcut",
        "downsample.1": "shortcut.norm",
    }.get(layer) or (f"conv{layer[2:]}.norm" if layer.startswith("bn") else layer)
    return f"{res}.{layer}.{param}"


def _group(key: str, depth: int) -> str:
    """Report group of a dropped key: its first ``depth`` dotted components."""
    parts = key.split(".")
    return ".".join(parts[:depth]) + ("." if len(parts) > depth else "")


# ----------------------------------------------------------------------------- conversion


def convert_checkpoint(path: str | Path, fmt: str = "auto") -> Conversion:
    """Read ``path``, find and check its ResNet trunk, and rename it for Detectron2."""
    source = str(path)
    notes: list[str] = []
    ckpt = read_checkpoint(path, notes)
    form, container_path, container, prefix = detect_format(ckpt, fmt, source)

    trunk: dict[str, torch.Tensor] = {}
    dropped: Counter = Counter()
    group_depth = max(1, prefix.count("."))
    for k, v in container.items():
        k = str(k)
        if not k.startswith(prefix):
            dropped[_group(k, group_depth)] += isinstance(v, torch.Tensor)
        elif k.endswith("num_batches_tracked"):
            dropped[prefix + "*.num_batches_tracked"] += 1
        elif k.startswith(prefix + "fc.") or k == prefix + "fc":
            dropped[prefix + "fc."] += 1
        elif isinstance(v, torch.Tensor):
            trunk[k[len(prefix) :]] = v
    dropped = Counter({k: n for k, n in dropped.items() if n})

    _check_stem(ckpt, form, trunk, source)
    depth = infer_depth(trunk, source)
    arch = ckpt.get("arch") if form.name == "feataug" else None
    if isinstance(arch, Mapping) and arch.get("name") not in (None, f"resnet{depth}"):
        raise ConvertError(
            f"{source}: arch.name is {arch.get('name')!r} but the trunk is ResNet-{depth}"
        )
    _check_trunk(trunk, depth, source)

    as_numpy = lambda t: t.detach().to("cpu", torch.float32).contiguous().numpy()  # noqa: E731
    model = {torchvision_to_detectron2(k): as_numpy(trunk[k]) for k in _reference_shapes(depth)}
    top = container_path[0] if container_path else None
    ignored = [str(k) for k in ckpt if k != top] if top is not None else []
    return Conversion(source, form, container_path, prefix, depth, model, dropped, ignored, notes)


def _check_output(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an output that is the input (under any spelling or link), a folder, or an existing
    file without ``overwrite``; and one whose folder cannot be written."""
    if src.exists() and dst.exists() and os.path.samefile(src, dst):
        raise ConvertError(f"{dst}: the output is the input file {src}; give another name")
    if not str(dst).endswith(".pkl"):
        raise ConvertError(
            f"{dst}: the output must end with .pkl (Detectron2 reads only .pkl as this format)"
        )
    if dst.is_dir():
        raise ConvertError(f"{dst}: is a folder; give the output file's name")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise ConvertError(f"{dst}: exists; use --overwrite to replace it")
    folder = next(p for p in dst.absolute().parents if p.exists())
    if not folder.is_dir():
        raise ConvertError(f"{dst}: cannot write: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConvertError(f"{dst}: cannot write: no write permission in {folder}")


def convert(
    src: str | Path, dst: str | Path, fmt: str = "auto", overwrite: bool = False
) -> Conversion:
    """Convert checkpoint ``src`` into the Detectron2 pickle ``dst`` (written atomically).

    ``dst`` may not be ``src`` (by any path); an existing ``dst`` is replaced only with
    ``overwrite``.
    """
    src, dst = Path(src), Path(dst)
    _check_output(src, dst, overwrite)
    conv = convert_checkpoint(src, fmt)
    payload = {"model": conv.model, "__author__": "feataug", "matching_heuristics": True,
               "feataug": {"config": detectron2_settings(conv.depth), "format": conv.format.name}}
    try:
        atomic_write(dst, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as e:
        raise ConvertError(f"{dst}: cannot write ({e.strerror or e})") from None
    return conv


def detectron2_settings(depth: int) -> dict[str, Any]:
    """Detectron2 config values these weights need: torchvision's RGB input and ImageNet
    normalisation, stride in the 3x3 conv, and the basic-block widths of ResNet-18/34. The
    converted file carries them (``"feataug": {"config": ...}``) and ``feataug detect`` checks
    the config against them."""
    settings: dict[str, Any] = {
        "INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": list(PIXEL_MEAN),
        "MODEL.PIXEL_STD": list(PIXEL_STD), "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
    }  # fmt: skip
    if depth in (18, 34):
        settings |= {"MODEL.RESNETS.RES2_OUT_CHANNELS": 64, "MODEL.RESNETS.RES5_DILATION": 1}
    return settings


def detectron2_opts(depth: int) -> list[str]:
    """:func:`detectron2_settings` as config overrides (``cfg.merge_from_list`` form)."""
    def text(v):
        return "[" + ", ".join(f"{x:.3f}" for x in v) + "]" if isinstance(v, list) else str(v)

    return [x for k, v in detectron2_settings(depth).items() for x in (k, text(v))]


# ----------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    parser.add_argument(
        "input", metavar="IN", help="pretraining checkpoint (.pth / .pth.tar / .ckpt / .torch)"
    )
    parser.add_argument("output", metavar="OUT.pkl", help="Detectron2 weights to write")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMAT_NAMES),
        help="checkpoint format (default: auto-detect)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT.pkl if it exists (never IN)"
    )


def main(args) -> int:
    try:
        conv = convert(args.input, args.output, args.format, overwrite=args.overwrite)
    except ConvertError as e:
        print(f"feataug convert: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(conv.summary()))
    print(f"wrote {args.output}")
    opts = ["MODEL.WEIGHTS", str(args.output), *detectron2_opts(conv.depth)]
    print("Detectron2 settings these weights need (config keys; the first only to load them):")
    for key, value in zip(opts[::2], opts[1::2], strict=True):
        print(f"  {key} {value}")
    print("as command-line overrides: " + " ".join(shlex.quote(o) for o in opts))
    return 0
