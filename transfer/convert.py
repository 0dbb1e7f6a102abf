"""Convert a pretrained ResNet trunk into Detectron2 weights, exactly or not at all.

The trunk is found in the checkpoint (:mod:`transfer.formats`: the known formats, read
without running anything), checked against the torchvision ResNet its keys and shapes imply and
renamed to Detectron2's ResNet names (:mod:`transfer.resnet_trunk`), and written as the pickle
Detectron2's ``DetectionCheckpointer`` reads::

    {"model": {name: numpy array}, "__author__": "feataug", "matching_heuristics": True,
     "feataug": {"config": {KEY: value}, "format": name}}

``feataug.config`` holds the config values the weights need (:func:`detectron2_settings`), which
``feataug detect`` checks. Heads (``fc``), momentum encoders, queues, predictors and
``num_batches_tracked`` are dropped and reported. Anything that would make the conversion inexact
is refused with one line and no output. The output is never the input (under any path or link)
and replaces an existing file only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import pickle
import shlex
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.utils.io import atomic_write, check_output
from transfer.formats import (
    FORMAT_NAMES,
    FORMATS,
    ConvertError,
    Format,
    detect_format,
    read_checkpoint,
)
from transfer.resnet_trunk import (
    DEPTHS,
    Arch,
    check_stem,
    check_trunk,
    from_sequential,
    infer_arch,
    infer_depth,
    reference_shapes,
    torchvision_to_detectron2,
    trunk_shapes,
    trunk_stem,
)

__all__ = [
    "DEPTHS",
    "FORMATS",
    "FORMAT_NAMES",
    "Arch",
    "ConvertError",
    "Conversion",
    "Format",
    "Trunk",
    "convert",
    "convert_checkpoint",
    "detectron2_opts",
    "detectron2_settings",
    "detect_format",
    "infer_arch",
    "infer_depth",
    "read_checkpoint",
    "read_trunk",
    "reference_shapes",
    "torchvision_to_detectron2",
    "trunk_of",
]

# ImageNet normalisation of torchvision-style weights, in Detectron2's 0-255 pixel units.
PIXEL_MEAN = tuple(round(255 * m, 3) for m in IMAGENET_MEAN)  # (123.675, 116.28, 103.53)
PIXEL_STD = tuple(round(255 * s, 3) for s in IMAGENET_STD)  # (58.395, 57.12, 57.375)


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


# ----------------------------------------------------------------------------- conversion


def _group(key: str, depth: int) -> str:
    """Report group of a dropped key: its first ``depth`` dotted components."""
    parts = key.split(".")
    return ".".join(parts[:depth]) + ("." if len(parts) > depth else "")


def _split(container: Mapping, prefix: str, sequential: bool):
    """``(trunk, counters, dropped, stray)`` of a format's container: the trunk's tensors under
    torchvision names, its BN ``num_batches_tracked`` counters (torchvision names; not part of
    the trunk's checks), the count of dropped tensors per key group, and keys of a Sequential
    trunk at indices where torchvision's children hold no tensors."""
    trunk: dict[str, torch.Tensor] = {}
    counters: dict[str, torch.Tensor] = {}
    dropped: Counter = Counter()
    group_depth = max(1, prefix.count("."))
    for k, v in container.items():
        k = str(k)
        if not k.startswith(prefix):
            dropped[_group(k, group_depth)] += isinstance(v, torch.Tensor)
        elif k.endswith("num_batches_tracked"):
            dropped[prefix + "*.num_batches_tracked"] += 1
            if isinstance(v, torch.Tensor):
                counters[k[len(prefix) :]] = v
        elif k.startswith(prefix + "fc.") or k == prefix + "fc":
            dropped[prefix + "fc."] += 1
        elif isinstance(v, torch.Tensor):
            trunk[k[len(prefix) :]] = v
    stray: list[str] = []
    if sequential:
        trunk, fc, stray = from_sequential(trunk)
        counters = from_sequential(counters)[0]
        dropped[prefix + "9. (fc)"] += len(fc)
    return trunk, counters, Counter({k: n for k, n in dropped.items() if n}), stray


@dataclass
class Trunk:
    """A checkpoint's ResNet trunk in torchvision's names, checked exact (:func:`trunk_of`)."""

    source: str
    format: Format
    container: tuple[str, ...]
    prefix: str
    arch: Arch
    stem: str  # "imagenet" | "cifar" (transfer.resnet_trunk.STEMS)
    state: dict[str, torch.Tensor]  # exactly trunk_shapes(arch, stem), in its order
    counters: dict[str, torch.Tensor]  # BN num_batches_tracked found beside it
    dropped: Counter = field(default_factory=Counter)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def trunk_of(ckpt: Mapping, fmt: str = "auto", source: str = "checkpoint",
             notes: list[str] | None = None, cifar: bool = False) -> Trunk:
    """The checked trunk of a checkpoint read by :func:`read_checkpoint`.

    ``fmt``: a format name or ``"auto"`` (:func:`detect_format`). The architecture comes from
    the trunk's keys and shapes (:func:`infer_arch`, agreeing with a FeatAug checkpoint's
    ``arch.name``); every tensor must be there with its shape, nothing else, all finite
    (:func:`check_trunk`). ``cifar``: FeatAug's recorded CIFAR stem is accepted
    (:func:`trunk_stem`; linear evaluation), else only the ImageNet stem Detectron2 has
    (:func:`check_stem`; conversion). Each refusal is one :class:`ConvertError` line."""
    form, container_path, container, prefix = detect_format(ckpt, fmt, source)
    trunk, counters, dropped, stray = _split(container, prefix, form.sequential)
    recorded = ckpt.get("arch") if form.name == "feataug" else None
    if cifar:
        stem = trunk_stem(recorded, trunk, source)
    else:
        check_stem(recorded, trunk, source)
        stem = "imagenet"
    if stray:
        raise ConvertError(
            f"{source}: {prefix}{stray[0]}: torchvision's ResNet children as nn.Sequential hold "
            f"tensors at 0 (conv1), 1 (bn1) and 4-7 (layer1-4) only ({len(stray)} such keys)"
        )
    arch = infer_arch(trunk, source)
    if isinstance(recorded, Mapping) and recorded.get("name") not in (None, arch.torchvision_name):
        raise ConvertError(
            f"{source}: arch.name is {recorded.get('name')!r} but the trunk is {arch.title}"
        )
    check_trunk(trunk, arch, source, stem)
    top = container_path[0] if container_path else None
    ignored = [str(k) for k in ckpt if k != top] if top is not None else []
    state = {k: trunk[k] for k in trunk_shapes(arch, stem)}
    return Trunk(source, form, container_path, prefix, arch, stem, state, counters, dropped,
                 ignored, list(notes or []))


def read_trunk(path: str | Path, fmt: str = "auto", cifar: bool = False) -> Trunk:
    """:func:`trunk_of` the checkpoint file ``path`` (:func:`read_checkpoint`: nothing in it
    runs)."""
    notes: list[str] = []
    ckpt = read_checkpoint(path, notes)
    return trunk_of(ckpt, fmt, str(path), notes, cifar)


def convert_checkpoint(path: str | Path, fmt: str = "auto") -> Conversion:
    """Read ``path``, find and check its ResNet trunk, and rename it for Detectron2."""
    t = read_trunk(path, fmt)
    as_numpy = lambda v: v.detach().to("cpu", torch.float32).contiguous().numpy()  # noqa: E731
    model = {torchvision_to_detectron2(k): as_numpy(v) for k, v in t.state.items()}
    return Conversion(t.source, t.format, t.container, t.prefix, t.arch, model, t.dropped,
                      t.ignored, t.notes)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def main(args: argparse.Namespace) -> int:
    conv = convert(args.input, args.output, args.format, overwrite=args.overwrite)
    print("\n".join(conv.summary()))
    print(f"wrote {args.output}")
    opts = ["MODEL.WEIGHTS", str(args.output), *detectron2_opts(conv.arch)]
    print("Detectron2 settings these weights need (config keys; the first only to load them):")
    for key, value in zip(opts[::2], opts[1::2], strict=True):
        print(f"  {key} {value}")
    print("as command-line overrides: " + " ".join(shlex.quote(o) for o in opts))
    return 0
