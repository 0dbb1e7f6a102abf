"""Convert a pretrained ResNet trunk into Detectron2 weights, exactly or not at all.

One concern: conversion (formats, checks, renaming, the command), kept together so that every
format's rule can be read in one place.

A self-supervised checkpoint keeps the trunk somewhere inside it, under a key prefix that
depends on the code that wrote it (``module.encoder_q.`` for MoCo, ``module.encoder.`` for
SimSiam, ...). :data:`FORMATS` lists where each known format keeps it; the trunk is found by
auto-detection (or ``--format``), checked against the torchvision ResNet its keys and shapes
imply (:class:`Arch`: the depth, and the groups and widths of ResNeXt, Wide ResNet and VISSL's
width-multiplied trunks; every key present, every shape right, no unknown tensors, an ImageNet
7x7 stem), renamed to Detectron2's ResNet names and written as the pickle Detectron2's
``DetectionCheckpointer`` reads::

    {"model": {name: numpy array}, "__author__": "feataug", "matching_heuristics": True}

Name mapping (torchvision -> Detectron2)::

    conv1                     -> stem.conv1            bn1          -> stem.conv1.norm
    layer{i}.{b}.conv{k}      -> res{i+1}.{b}.conv{k}  bn{k}        -> res{i+1}.{b}.conv{k}.norm
    layer{i}.{b}.downsample.0 -> res{i+1}.{b}.shortcut downsample.1 -> res{i+1}.{b}.shortcut.norm

A trunk saved as torchvision's ResNet children in an ``nn.Sequential`` (lightly's examples:
``0.`` conv1, ``1.`` bn1, ``4.`` .. ``7.`` layer1..layer4) is first renamed to torchvision's names.

Heads (``fc``), momentum encoders, queues, predictors and ``num_batches_tracked`` are dropped and
reported. Anything that would make the conversion inexact is refused with one line and no output.

Nothing in the input is run: it is read by :func:`pretrain.utils.safe_load.load_torch`, which imports
no class or function the file names beyond an allow-list (tensors, numpy arrays, containers,
``argparse.Namespace``) and keeps other objects as inert placeholders; a plain pickle
(``pickle.dump``) is read by its restricted unpickler. The output is never the input (under any
path or link) and replaces an existing file only with ``--overwrite``.
"""

from __future__ import annotations

import functools
import pickle
import re
import shlex
import zipfile
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
from pretrain.utils.io import atomic_write, check_output

__all__ = [
    "FORMATS",
    "Arch",
    "ConvertError",
    "Conversion",
    "Format",
    "convert",
    "convert_checkpoint",
    "detectron2_opts",
    "detect_format",
    "infer_arch",
    "infer_depth",
    "read_checkpoint",
    "reference_shapes",
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
    ``sequential``: the trunk is torchvision's ResNet children as an ``nn.Sequential`` (keys
    ``0.`` conv1, ``1.`` bn1, ``4.`` .. ``7.`` layer1..layer4; see :data:`SEQUENTIAL_CHILDREN`).
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


# torchvision ResNet.children() in order: index in nn.Sequential(*children) -> child name.
# relu (2), maxpool (3) and avgpool (8) hold no tensors; fc (9) appears only when kept.
SEQUENTIAL_CHILDREN = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4",
                       9: "fc"}  # fmt: skip


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


@dataclass
class Conversion:
    """The result of a conversion and what was found on the way."""

    source: str
    format: Format
    container: tuple[str, ...]
    prefix: str
    arch: Arch
    model: dict[str, np.ndarray]  # Detectron2 names
    dropped: Counter = field(default_factory=Counter)  # key group -> number of tensors dropped
    ignored: list[str] = field(default_factory=list)  # other top-level keys of the checkpoint
    notes: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return self.arch.depth

    def summary(self) -> list[str]:
        where = "".join(f"[{k!r}]" for k in self.container) or "top level"
        lines = [
            f"{self.source}: {self.format.title} ({self.format.name}), {self.arch.title}, "
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
    A plain pickle (``pickle.dump``) is read with the numpy allow-list, its arrays as tensors.
    """
    try:
        ckpt = safe_load.load_torch(path, placeholders=True, notes=notes)
    except safe_load.UnsafeFileError as e:
        ckpt = _plain_pickle(Path(path), e)
        if isinstance(ckpt, Mapping) and not _count_tensors(ckpt):
            keys = _listing([str(k) for k in ckpt])
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


# ----------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Arch:
    """A torchvision-layout ResNet trunk: its depth and, for bottleneck trunks, its widths.

    Stage ``i`` (0 for res2) of a bottleneck trunk has ``groups * width_per_group * 2**i``
    channels inside its blocks (3x3 conv in ``groups`` groups) and ``256 * multiplier * 2**i``
    out; the stem has ``64 * multiplier``. That covers torchvision's ResNet (1, 64, 1),
    ``wide_resnet50_2`` / ``101_2`` (1, 128, 1), ``resnext50_32x4d`` (32, 4, 1),
    ``resnext101_32x8d`` / ``64x4d``, and VISSL's ``WIDTH_MULTIPLIER`` m trunks (torchvision
    blocks with m times the planes: (1, 64m, m)). ``width_per_group`` is Detectron2's
    ``MODEL.RESNETS.WIDTH_PER_GROUP`` (not torchvision's base width, which is it divided by m).
    """

    depth: int
    groups: int = 1
    width_per_group: int = 64
    multiplier: int = 1

    @property
    def bottleneck(self) -> bool:
        return self.depth >= 50

    @property
    def stem(self) -> int:
        return 64 * self.multiplier

    @property
    def res2_out(self) -> int:
        return (256 if self.bottleneck else 64) * self.multiplier

    @property
    def title(self) -> str:
        g, w, m, d = self.groups, self.width_per_group, self.multiplier, self.depth
        if (g, w, m) == (1, 64, 1):
            return f"ResNet-{d}"
        if m == 1 and g == 1 and w % 64 == 0:
            return f"Wide ResNet-{d}-{w // 64}"
        if m == 1:
            return f"ResNeXt-{d} {g}x{w}d"
        if g == 1 and w == 64 * m:
            return f"ResNet-{d} w{m}"
        return f"ResNet-{d} (groups {g}, width per group {w}, width x{m})"

    @property
    def torchvision_name(self) -> str | None:
        """torchvision's builder name (``resnet50``, ``wide_resnet50_2``, ``resnext50_32x4d``;
        a name in that pattern where torchvision has no builder), or None for VISSL widths."""
        g, w, m, d = self.groups, self.width_per_group, self.multiplier, self.depth
        if m != 1:
            return None
        if (g, w) == (1, 64):
            return f"resnet{d}"
        if g == 1 and w % 64 == 0:
            return f"wide_resnet{d}_{w // 64}"
        return f"resnext{d}_{g}x{w}d"


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


def infer_arch(trunk: Mapping[str, Any], source: str = "checkpoint") -> Arch:
    """:class:`Arch` of torchvision-named trunk keys: the depth from the keys, the stem width
    from ``conv1``, the groups and res2 width from ``layer1.0.conv2`` (the full shape check
    comes after, against :func:`reference_shapes` of the result)."""
    depth = infer_depth(trunk, source)
    if depth < 50:
        return Arch(depth)

    def dims(key: str) -> tuple[int, ...]:
        v = trunk.get(key)
        return tuple(v.shape) if isinstance(v, torch.Tensor) and v.dim() == 4 else ()

    stem = (dims("conv1.weight") or (64,))[0]
    multiplier = stem // 64 if stem >= 64 and stem % 64 == 0 else 1
    conv2 = dims("layer1.0.conv2.weight")
    if conv2 and conv2[1] > 0 and conv2[0] % conv2[1] == 0:
        groups = conv2[0] // conv2[1]
        return Arch(depth, groups, conv2[1], multiplier)
    return Arch(depth, 1, 64 * multiplier, multiplier)


def _bn(name: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{p}": (n,) for p in ("weight", "bias", "running_mean", "running_var")}


@functools.cache
def reference_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Trunk key -> shape of the torchvision-layout ResNet ``arch`` (no ``fc``, no
    ``num_batches_tracked``), in torchvision's ``state_dict`` order. A block's ``downsample``
    (1x1 conv + BN) exists where its input and output differ, as in torchvision."""
    blocks = next(b for (b, bottleneck), d in DEPTHS.items() if d == arch.depth)
    shapes = {"conv1.weight": (arch.stem, 3, 7, 7), **_bn("bn1", arch.stem)}
    c_in = arch.stem
    for i, n in enumerate(blocks):
        out = arch.res2_out * 2**i
        inner = arch.groups * arch.width_per_group * 2**i if arch.bottleneck else out
        for b in range(n):
            pre = f"layer{i + 1}.{b}."
            if arch.bottleneck:
                shapes |= {pre + "conv1.weight": (inner, c_in, 1, 1), **_bn(pre + "bn1", inner),
                           pre + "conv2.weight": (inner, inner // arch.groups, 3, 3),
                           **_bn(pre + "bn2", inner), pre + "conv3.weight": (out, inner, 1, 1),
                           **_bn(pre + "bn3", out)}  # fmt: skip
            else:
                shapes |= {pre + "conv1.weight": (out, c_in, 3, 3), **_bn(pre + "bn1", out),
                           pre + "conv2.weight": (out, out, 3, 3),
                           **_bn(pre + "bn2", out)}  # fmt: skip
            if b == 0 and (i > 0 or c_in != out):
                shapes |= {pre + "downsample.0.weight": (out, c_in, 1, 1),
                           **_bn(pre + "downsample.1", out)}  # fmt: skip
            c_in = out
    return shapes


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_trunk(trunk: Mapping[str, torch.Tensor], arch: Arch, source: str) -> None:
    ref = reference_shapes(arch)
    missing = [k for k in ref if k not in trunk]
    if missing:
        raise ConvertError(f"{source}: {arch.title} keys missing: {_listing(missing)}")
    unknown = [k for k in trunk if k not in ref]
    if unknown:
        raise ConvertError(
            f"{source}: trunk has tensors a torchvision {arch.title} does not: {_listing(unknown)}"
        )
    wrong = [
        f"{k} {tuple(trunk[k].shape)} (expected {ref[k]})"
        for k in ref
        if tuple(trunk[k].shape) != ref[k]
    ]
    if wrong:
        raise ConvertError(f"{source}: shape mismatch for {arch.title}: {_listing(wrong, 4)}")
    not_finite = [k for k in ref if trunk[k].is_floating_point() and not trunk[k].isfinite().all()]
    if not_finite:  # a diverged run: detection would fine-tune NaN weights
        raise ConvertError(f"{source}: non-finite values (NaN or inf) in {_listing(not_finite)}")


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


def _from_sequential(trunk: dict[str, torch.Tensor]):
    """Keys of torchvision's ResNet children as ``nn.Sequential`` -> torchvision names.

    Returns ``(renamed, fc, stray)``: the trunk, the ``fc`` keys (index 9, a classifier kept in
    the Sequential), and keys at indices where torchvision's children hold no tensors."""
    renamed, fc, stray = {}, [], []
    for key, v in trunk.items():
        index, _, rest = key.partition(".")
        child = SEQUENTIAL_CHILDREN.get(int(index)) if index.isdigit() else None
        if child == "fc":
            fc.append(key)
        elif child is None or not rest:
            stray.append(key)
        else:
            renamed[f"{child}.{rest}"] = v
    return renamed, fc, stray


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
    stray: list[str] = []
    if form.sequential:
        trunk, fc, stray = _from_sequential(trunk)
        dropped[prefix + "9. (fc)"] += len(fc)
    dropped = Counter({k: n for k, n in dropped.items() if n})

    _check_stem(ckpt, form, trunk, source)
    if stray:
        raise ConvertError(
            f"{source}: {prefix}{stray[0]}: torchvision's ResNet children as nn.Sequential hold "
            f"tensors at 0 (conv1), 1 (bn1) and 4-7 (layer1-4) only ({len(stray)} such keys)"
        )
    arch = infer_arch(trunk, source)
    recorded = ckpt.get("arch") if form.name == "feataug" else None
    if isinstance(recorded, Mapping) and recorded.get("name") not in (None, arch.torchvision_name):
        raise ConvertError(
            f"{source}: arch.name is {recorded.get('name')!r} but the trunk is {arch.title}"
        )
    _check_trunk(trunk, arch, source)

    as_numpy = lambda t: t.detach().to("cpu", torch.float32).contiguous().numpy()  # noqa: E731
    model = {torchvision_to_detectron2(k): as_numpy(trunk[k]) for k in reference_shapes(arch)}
    top = container_path[0] if container_path else None
    ignored = [str(k) for k in ckpt if k != top] if top is not None else []
    return Conversion(source, form, container_path, prefix, arch, model, dropped, ignored, notes)


def _check_output(src: Path, dst: Path, overwrite: bool) -> None:
    """:func:`pretrain.utils.io.check_output` (never the input, a folder, or an existing file
    without ``overwrite``), and a ``.pkl`` name."""
    check_output(dst, inputs={"input": src}, overwrite=overwrite, error=ConvertError)
    if not str(dst).endswith(".pkl"):
        raise ConvertError(
            f"{dst}: the output must end with .pkl (Detectron2 reads only .pkl as this format)"
        )


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
               "feataug": {"config": detectron2_settings(conv.arch), "format": conv.format.name}}
    try:
        atomic_write(dst, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as e:
        raise ConvertError(f"{dst}: cannot write ({e.strerror or e})") from None
    return conv


def detectron2_settings(arch: Arch | int) -> dict[str, Any]:
    """Detectron2 config values these weights need: torchvision's RGB input and ImageNet
    normalisation, stride in the 3x3 conv, the basic-block widths of ResNet-18/34, and the
    widths of bottleneck trunks (``NUM_GROUPS``, ``WIDTH_PER_GROUP``, ``STEM_OUT_CHANNELS``,
    ``RES2_OUT_CHANNELS``: Detectron2's ResNet has res2 blocks of ``NUM_GROUPS x
    WIDTH_PER_GROUP`` channels, doubled per stage, as :class:`Arch`). ``arch``: an
    :class:`Arch`, or a depth for torchvision's plain ResNet. The converted file carries them
    (``"feataug": {"config": ...}``) and ``feataug detect`` checks the config against them."""
    arch = Arch(arch) if isinstance(arch, int) else arch
    settings: dict[str, Any] = {
        "INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": list(PIXEL_MEAN),
        "MODEL.PIXEL_STD": list(PIXEL_STD), "MODEL.RESNETS.DEPTH": arch.depth,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
    }  # fmt: skip
    if not arch.bottleneck:
        settings |= {"MODEL.RESNETS.RES2_OUT_CHANNELS": 64, "MODEL.RESNETS.RES5_DILATION": 1}
    else:
        settings |= {"MODEL.RESNETS.NUM_GROUPS": arch.groups,
                     "MODEL.RESNETS.WIDTH_PER_GROUP": arch.width_per_group,
                     "MODEL.RESNETS.STEM_OUT_CHANNELS": arch.stem,
                     "MODEL.RESNETS.RES2_OUT_CHANNELS": arch.res2_out}  # fmt: skip
    return settings


def detectron2_opts(arch: Arch | int) -> list[str]:
    """:func:`detectron2_settings` as config overrides (``cfg.merge_from_list`` form)."""
    def text(v):
        return "[" + ", ".join(f"{x:.3f}" for x in v) + "]" if isinstance(v, list) else str(v)

    return [x for k, v in detectron2_settings(arch).items() for x in (k, text(v))]


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
    conv = convert(args.input, args.output, args.format, overwrite=args.overwrite)
    print("\n".join(conv.summary()))
    print(f"wrote {args.output}")
    opts = ["MODEL.WEIGHTS", str(args.output), *detectron2_opts(conv.arch)]
    print("Detectron2 settings these weights need (config keys; the first only to load them):")
    for key, value in zip(opts[::2], opts[1::2], strict=True):
        print(f"  {key} {value}")
    print("as command-line overrides: " + " ".join(shlex.quote(o) for o in opts))
    return 0
