"""``feataug env``: what the pipeline will run on."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys


def _version(module: str) -> str:
    """``module``'s version, or why it does not import."""
    from pretrain.utils.provenance import package_version

    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report any import failure as text
        return f"not available ({type(e).__name__}: {e})".splitlines()[0]
    return package_version(module) or "installed"


def _detectron2_ops() -> str:
    try:
        from detectron2 import _C  # noqa: F401
    except Exception:  # noqa: BLE001
        return "no (pure-Python build: Faster/Mask R-CNN work; rotated boxes, deformable conv do not)"
    return "yes"


def collect() -> list[tuple[str, str]]:
    import torch

    rows = [
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("feataug", _version("feataug")),
        ("torch", torch.__version__),
        ("torchvision", _version("torchvision")),
        ("detectron2", _version("detectron2")),
    ]
    if not rows[-1][1].startswith("not available"):
        rows.append(("detectron2 compiled ops", _detectron2_ops()))
    cuda = torch.cuda.is_available()
    rows.append(("CUDA available", str(cuda)))
    if cuda:
        rows.append(("CUDA version", str(torch.version.cuda)))
        rows += [(f"GPU {i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
    rows.append(("CPU threads", str(torch.get_num_threads())))
    rows += [
        ("fvcore", _version("fvcore")),
        ("faster-coco-eval", _version("faster_coco_eval")),
        ("pycocotools", _version("pycocotools")),
        ("opencv", _version("cv2")),
        ("numpy", _version("numpy")),
    ]
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def main(args: argparse.Namespace | None = None) -> int:
    rows = collect()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
