"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (see
``feataug/data/__init__.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pretrain.data import parse_idx
from pretrain.errors import DataError

from .fetch import cache_dir, default_root, read_members
from .layout import _publish, _write_lines

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
# fmt: off
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
# fmt: on


def find_fashion_mnist(cache: Path | None = None) -> Path:
    """The folder of the installed Debian package's IDX files; if the package is not installed,
    ``apt-get download`` it (no root needed) and unpack it into the cache."""
    try:
        listed = subprocess.run(
            ["dpkg", "-L", FASHION_MNIST_PACKAGE], capture_output=True, text=True
        )
        for line in listed.stdout.splitlines() if listed.returncode == 0 else []:
            if line.endswith("/train-images-idx3-ubyte.gz"):
                return Path(line).parent
    except OSError:
        pass
    unpacked = Path(cache or cache_dir()) / FASHION_MNIST_PACKAGE
    found = unpacked / FASHION_MNIST_DIR.lstrip("/")
    if all((found / name).is_file() for name in FASHION_MNIST_SHA256):
        return found
    hint = (
        f"install it with `apt-get install {FASHION_MNIST_PACKAGE}` or pass --source DIR "
        f"holding {', '.join(FASHION_MNIST_SHA256)}"
    )
    with tempfile.TemporaryDirectory(prefix=".download-", dir=_mkdir(unpacked.parent)) as tmp:
        print(f"downloading the Debian package {FASHION_MNIST_PACKAGE} ...", file=sys.stderr)
        try:
            got = subprocess.run(
                ["apt-get", "download", FASHION_MNIST_PACKAGE],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            debs = list(Path(tmp).glob("*.deb"))
            if got.returncode != 0 or len(debs) != 1:
                raise DataError(
                    f"{FASHION_MNIST_PACKAGE} is not installed and `apt-get download` "
                    f"failed; {hint}"
                )
            subprocess.run(
                ["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")],
                check=True,
                capture_output=True,
            )
        except (OSError, subprocess.CalledProcessError):
            raise DataError(f"{FASHION_MNIST_PACKAGE} is not installed; {hint}") from None
        shutil.rmtree(unpacked, ignore_errors=True)
        os.replace(Path(tmp) / "x", unpacked)
    return found


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_fashion_mnist(out: Path, source: Path, knn_train: int, knn_val: int) -> dict:
    from PIL import Image

    files = read_members(source, "", FASHION_MNIST_SHA256)
    for name, data in files.items():
        (out / name).write_bytes(data)
    _write_lines(out / "classes.txt", FASHION_MNIST_CLASSES)
    splits = {}
    for part, folder, per_class in (
        ("train", "train-knn", knn_train),
        ("t10k", "val-knn", knn_val),
    ):
        images = parse_idx(files[f"{part}-images-idx3-ubyte.gz"], f"{part}-images-idx3-ubyte.gz")
        labels = parse_idx(files[f"{part}-labels-idx1-ubyte.gz"], f"{part}-labels-idx1-ubyte.gz")
        if (
            images.ndim != 3
            or labels.shape != images.shape[:1]
            or labels.max() >= len(FASHION_MNIST_CLASSES)
        ):
            raise DataError(
                f"{source}: {part} images {images.shape} and labels {labels.shape} do not match"
            )
        splits[part] = {"images": len(labels)}
        count = 0
        for label, name in enumerate(FASHION_MNIST_CLASSES):
            class_dir = _mkdir(out / folder / f"{label}_{name}")
            for index in np.flatnonzero(labels == label)[:per_class]:
                Image.fromarray(images[index]).save(class_dir / f"{part}_{index:05d}.png")
                count += 1
        splits[folder] = {"images": count}
    return {"dataset": "fashion-mnist", "splits": splits, "classes": list(FASHION_MNIST_CLASSES)}


def prepare_fashion_mnist(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    *,
    knn_train: int = 100,
    knn_val: int = 50,
    force: bool = False,
) -> dict:
    """Build ``ROOT/fashion-mnist``: the four IDX ``.gz`` files and the kNN PNG folders
    (``knn_train`` / ``knn_val`` images per class)."""
    out = Path(root or default_root()) / "fashion-mnist"

    def build(tmp: Path) -> dict:
        return _build_fashion_mnist(
            tmp, Path(source) if source else find_fashion_mnist(), knn_train, knn_val
        )

    return _publish(out, build, force)
