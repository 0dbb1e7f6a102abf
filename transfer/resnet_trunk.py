"""ResNet trunks in torchvision's layout: the architecture their keys and shapes imply, the
checks that make a conversion exact, and Detectron2's names for their tensors.

:class:`Arch` covers the depth and the groups and widths of ResNeXt, Wide ResNet and VISSL's
width-multiplied trunks. A trunk converts exactly when every key of :func:`reference_shapes` is
present with its shape, no other tensor is, every value is finite and the stem is ImageNet's
(7x7 conv1 + max-pool). Name mapping (torchvision -> Detectron2)::

    conv1                     -> stem.conv1            bn1          -> stem.conv1.norm
    layer{i}.{b}.conv{k}      -> res{i+1}.{b}.conv{k}  bn{k}        -> res{i+1}.{b}.conv{k}.norm
    layer{i}.{b}.downsample.0 -> res{i+1}.{b}.shortcut downsample.1 -> res{i+1}.{b}.shortcut.norm

A trunk saved as torchvision's ResNet children in an ``nn.Sequential`` (lightly's examples:
``0.`` conv1, ``1.`` bn1, ``4.`` .. ``7.`` layer1..layer4) is first renamed to torchvision's names
(:func:`from_sequential`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from transfer.formats import ConvertError, listing

__all__ = ["DEPTHS", "SEQUENTIAL_CHILDREN", "STEMS", "Arch", "check_stem", "check_trunk",
           "from_sequential", "infer_arch", "infer_depth", "reference_shapes", "trunk_shapes",
           "trunk_stem", "torchvision_to_detectron2"]  # fmt: skip

# conv1's kernel per stem: torchvision's ImageNet stem (7x7/2 conv + max-pool) and FeatAug's CIFAR
# stem (3x3/1 conv with padding 1, no max-pool; pretrain.backbone)
STEMS = {"imagenet": (7, 7), "cifar": (3, 3)}

# (blocks per stage, bottleneck?) -> depth
DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}

# torchvision ResNet.children() in order: index in nn.Sequential(*children) -> child name.
# relu (2), maxpool (3) and avgpool (8) hold no tensors; fc (9) appears only when kept.
SEQUENTIAL_CHILDREN = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4",
                       9: "fc"}  # fmt: skip


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


def trunk_shapes(arch: Arch, stem: str = "imagenet") -> dict[str, tuple[int, ...]]:
    """:func:`reference_shapes` with ``stem``'s conv1 (:data:`STEMS`), in the same order."""
    ref = reference_shapes(arch)
    if stem == "imagenet":
        return ref
    return {**ref, "conv1.weight": (arch.stem, 3, *STEMS[stem])}


def check_trunk(trunk: Mapping[str, torch.Tensor], arch: Arch, source: str,
                stem: str = "imagenet") -> None:
    """Every tensor of :func:`trunk_shapes` with its shape, no other tensor, finite values."""
    ref = trunk_shapes(arch, stem)
    missing = [k for k in ref if k not in trunk]
    if missing:
        raise ConvertError(f"{source}: {arch.title} keys missing: {listing(missing)}")
    unknown = [k for k in trunk if k not in ref]
    if unknown:
        raise ConvertError(
            f"{source}: trunk has tensors a torchvision {arch.title} does not: {listing(unknown)}"
        )
    wrong = [
        f"{k} {tuple(trunk[k].shape)} (expected {ref[k]})"
        for k in ref
        if tuple(trunk[k].shape) != ref[k]
    ]
    if wrong:
        raise ConvertError(f"{source}: shape mismatch for {arch.title}: {listing(wrong, 4)}")
    not_finite = [k for k in ref if trunk[k].is_floating_point() and not trunk[k].isfinite().all()]
    if not_finite:  # a diverged run: detection would fine-tune NaN weights
        raise ConvertError(f"{source}: non-finite values (NaN or inf) in {listing(not_finite)}")


def check_stem(recorded: Any, trunk: Mapping[str, torch.Tensor], source: str) -> None:
    """ImageNet's stem, which Detectron2's ResNet has: refused when the checkpoint's own record
    (``recorded``: a FeatAug checkpoint's ``arch``, else None) names another, or ``conv1`` is not
    7x7 (a CIFAR-style stem)."""
    if isinstance(recorded, Mapping) and recorded.get("stem", "imagenet") != "imagenet":
        raise ConvertError(
            f"{source}: backbone has a {recorded.get('stem')!r} stem (arch.stem); Detectron2's "
            "ResNet needs the ImageNet stem (7x7 conv1 + max-pool)"
        )
    conv1 = trunk.get("conv1.weight")
    if isinstance(conv1, torch.Tensor) and conv1.dim() == 4 and tuple(conv1.shape[2:]) != (7, 7):
        k = "x".join(map(str, conv1.shape[2:]))
        raise ConvertError(
            f"{source}: conv1 is {k}, a CIFAR-style stem; Detectron2's ResNet needs the "
            "ImageNet stem (7x7 conv1 + max-pool)"
        )


def trunk_stem(recorded: Any, trunk: Mapping[str, torch.Tensor], source: str) -> str:
    """The stem of a trunk read for evaluation in torchvision's layout (not Detectron2's, which
    :func:`check_stem` guards): ``"imagenet"`` for a 7x7 conv1; ``"cifar"`` for a 3x3 conv1 where
    the checkpoint records FeatAug's CIFAR stem (``recorded``: a FeatAug checkpoint's ``arch``).
    A 3x3 conv1 without that record is refused: its padding (1 in FeatAug's stem and most CIFAR
    ResNets, 2 in solo-learn's) is not in the weights, and it changes every feature."""
    want = recorded.get("stem", "imagenet") if isinstance(recorded, Mapping) else None
    if want is not None and want not in STEMS:
        raise ConvertError(f"{source}: arch.stem {want!r} is not one of: {', '.join(STEMS)}")
    conv1 = trunk.get("conv1.weight")
    kernel = tuple(conv1.shape[2:]) if isinstance(conv1, torch.Tensor) and conv1.dim() == 4 else None
    found = next((name for name, k in STEMS.items() if k == kernel), None)
    if kernel is None or (want is None and found == "imagenet"):
        return "imagenet"  # a missing conv1 is check_trunk's to report
    k = "x".join(map(str, kernel))
    if want is None and found == "cifar":
        raise ConvertError(
            f"{source}: conv1 is 3x3, a CIFAR-style stem whose padding the weights do not record "
            "(1 in FeatAug's and most CIFAR ResNets, 2 in solo-learn's); only FeatAug "
            "checkpoints, whose arch.stem records it, are evaluated with it"
        )
    if want is None or found != want:
        expected = f"arch.stem {want!r} has a {'x'.join(map(str, STEMS[want]))} conv1" \
            if want else "the ImageNet stem has a 7x7 conv1"
        raise ConvertError(f"{source}: conv1 is {k}, but {expected}")
    return want


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


def from_sequential(trunk: dict[str, torch.Tensor]):
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
