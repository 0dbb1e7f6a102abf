"""Pretraining datasets: image folders, path lists and IDX arrays, robust to bad files.

Three sources (``DATA.FORMAT``), all yielding RGB ``uint8`` arrays of shape [H, W, 3]:

- ``folder``: every image file under ``DATA.ROOT``, recursively, in sorted order. When all
  images sit inside first-level sub-folders (ImageNet layout ``ROOT/<class>/.../x.jpg``) the
  sub-folder names are class labels, used only by evaluation (kNN monitor, linear probe).
- ``list``: ``DATA.ROOT`` is a text file with one image path per line (relative paths are
  relative to the list file); an optional integer label may follow after a tab or space;
  blank lines and ``#`` comments are ignored.
- ``idx``: IDX arrays as distributed for (Fashion-)MNIST, gzipped or not. ``DATA.ROOT`` is the
  images file (``*-images-idx3-ubyte[.gz]``) or a folder holding ``train-images-idx3-ubyte[.gz]``;
  the matching ``*-labels-idx1-ubyte[.gz]`` beside it gives labels.

A file that cannot be decoded (missing, empty, truncated, not an image) never stops a run:
``ImageDataset`` uses the next readable image in its place and reports the bad index, so the
engine can count distinct bad files and print them.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .errors import DataError
from .utils.io import read_regular, walk_files

logger = logging.getLogger("pretrain")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FORMATS = ("folder", "list", "idx")
# One OpenCV thread per process: parallelism comes from loader workers, and a process that forks
# workers after OpenCV started its thread pool can deadlock them (the pool does not survive fork).
cv2.setNumThreads(1)
# IDX type codes -> numpy dtypes (big-endian on disk)
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- decoding
def decode_image(path: str | os.PathLike) -> np.ndarray | None:
    """Decode an image file to RGB ``uint8`` [H, W, 3]; ``None`` when it cannot be read.

    OpenCV converts grayscale, palette, alpha and 16-bit images to 8-bit 3-channel, and
    refuses truncated files (returns ``None``) instead of padding them with gray.
    """
    try:
        buf = np.frombuffer(read_regular(path), dtype=np.uint8)
        if buf.size == 0:
            return None
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except (OSError, ValueError, cv2.error):
        return None
    if img is None or img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- sources
class ImageFiles:
    """Image files on disk, optionally labelled (label -1: none)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None = None,
                 classes: Sequence[str] = ()):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray | None:
        return decode_image(self.paths[i])

    def name(self, i: int) -> str:
        return self.paths[i]


class ArrayImages:
    """Images held in memory, [N, H, W] (gray) or [N, H, W, 3] ``uint8`` (IDX files)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, origin: str):
        self.images = images
        self.labels = [int(v) for v in labels] if labels is not None else [-1] * len(images)
        n_cls = max(self.labels) + 1 if labels is not None and len(labels) else 0
        self.classes = [str(c) for c in range(n_cls)]
        self.origin = origin

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> np.ndarray:
        img = self.images[i]
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else np.ascontiguousarray(img)

    def name(self, i: int) -> str:
        return f"{self.origin}[{i}]"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str | os.PathLike) -> ImageFiles:
    """All image files under ``root`` (recursive, sorted, symlinks followed, each real folder
    once: a link to a folder already scanned, or to one that contains it, is skipped and
    counted in one warning).

    Labels come from the first-level sub-folder when no image lies directly in ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (DATA.FORMAT folder)")
    files, skipped = walk_files(root)
    paths = [p for p in files if _is_image(os.path.basename(p))]
    if skipped:
        logger.warning(f"{root}: skipped {len(skipped)} linked folder(s) already scanned: "
                       f"{skipped[0]}{' ...' if len(skipped) > 1 else ''}")
    rel = [Path(p).relative_to(root).parts for p in paths]
    if paths and all(len(parts) > 1 for parts in rel):
        classes = sorted({parts[0] for parts in rel})
        index = {c: k for k, c in enumerate(classes)}
        return ImageFiles(paths, [index[parts[0]] for parts in rel], classes)
    return ImageFiles(paths)


def read_list(list_file: str | os.PathLike) -> ImageFiles:
    """Paths (and optional integer labels) from a text file, one image per line."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"{list_file}: no such list file (DATA.FORMAT list)")
    paths, labels = [], []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label = -1
        head, _, tail = line.rpartition("\t") if "\t" in line else line.rpartition(" ")
        if head and tail.lstrip("-").isdigit():
            line, label = head.strip(), int(tail)
        path = Path(line)
        paths.append(str(path if path.is_absolute() else list_file.parent / path))
        labels.append(label)
    n_cls = max(labels, default=-1) + 1
    return ImageFiles(paths, labels, [str(c) for c in range(n_cls)])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array with native byte order."""
    path = Path(path)
    try:
        data = read_regular(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    return parse_idx(data, str(path))


def parse_idx(data: bytes, what: str) -> np.ndarray:
    """The array in the bytes of an IDX file (gzip-compressed or not); ``what`` names it in errors.

    Format: two zero bytes, a type code, the number of dimensions D, D big-endian uint32
    sizes, then the values, big-endian, C order.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{what}: cannot decompress IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{what}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{what}: IDX header truncated")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{what}: IDX data has {len(data) - header} bytes, "
                        f"shape {shape} needs {expected}")
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _idx_images_file(root: Path) -> Path:
    if root.is_file():
        return root
    if root.is_dir():
        for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
            if (root / name).is_file():
                return root / name
        found = sorted(p for p in root.iterdir() if "images-idx3" in p.name)
        if len(found) == 1:
            return found[0]
        raise DataError(f"{root}: no train-images-idx3-ubyte[.gz] here; give the images file itself")
    raise DataError(f"{root}: no such IDX file or folder (DATA.FORMAT idx)")


def load_idx(root: str | os.PathLike) -> ArrayImages:
    """IDX images (+ labels from the matching ``labels-idx1`` file when present)."""
    images_file = _idx_images_file(Path(root))
    images = read_idx(images_file)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
        images.ndim == 4 and images.shape[3] != 3
    ):
        raise DataError(f"{images_file}: expected uint8 images [N,H,W] or [N,H,W,3], "
                        f"got {images.dtype} {images.shape}")
    labels = None
    labels_file = images_file.with_name(images_file.name.replace("images-idx3", "labels-idx1"))
    if labels_file != images_file and labels_file.is_file():
        labels = read_idx(labels_file)
        if labels.shape != (len(images),):
            raise DataError(f"{labels_file}: {labels.shape[0]} labels for {len(images)} images")
    return ArrayImages(images, labels, str(images_file))


def load_source(root: str, fmt: str, max_images: int = 0) -> ImageFiles | ArrayImages:
    """The images named by ``(DATA.ROOT, DATA.FORMAT)``; raises ``DataError`` when there are none."""
    if not root:
        raise DataError("DATA.ROOT is empty; set it to an image folder, list file or IDX file")
    if fmt == "folder":
        source = scan_folder(root)
    elif fmt == "list":
        source = read_list(root)
    elif fmt == "idx":
        source = load_idx(root)
    else:
        raise DataError(f"DATA.FORMAT {fmt!r} unknown; choose one of {', '.join(FORMATS)}")
    if len(source) == 0:
        what = {"folder": f"image files ({', '.join(IMAGE_EXTENSIONS)})",
                "list": "paths", "idx": "images"}[fmt]
        raise DataError(f"{root}: no {what} found (DATA.FORMAT {fmt})")
    if max_images > 0 and len(source) > max_images:
        if isinstance(source, ArrayImages):
            labels = np.asarray(source.labels[:max_images]) if source.classes else None
            source = ArrayImages(source.images[:max_images], labels, source.origin)
        else:
            source = ImageFiles(source.paths[:max_images], source.labels[:max_images],
                                source.classes)
    return source


# ----------------------------------------------------------------------------- dataset
class ImageDataset(torch.utils.data.Dataset):
    """``transform(image, rng)`` of each image, with bad files replaced and reported.

    An item key is an index or ``(index, seed)``; the seed makes the augmentation a function
    of the key alone (``random.Random(seed)`` draws every random parameter), so the same
    epoch replays identically whatever the worker count or the point a run resumed from.

    ``__getitem__`` returns ``(output, label, bad)`` where ``bad`` lists the indices of
    unreadable files met on the way (the next readable image is used instead).
    """

    def __init__(self, source: ImageFiles | ArrayImages, transform: Callable, max_tries: int = 64):
        self.source = source
        self.transform = transform
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> list[int]:
        return self.source.labels

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        n, bad = len(self.source), []
        for k in range(min(self.max_tries, n)):
            j = (index + k) % n
            img = self.source.load(j)
            if img is not None:
                break
            bad.append(j)
        else:
            raise DataError(f"{self.source.name(index)}: this and the next {len(bad) - 1} "
                            "images are unreadable; check the dataset")
        return self.transform(img, random.Random(seed)), self.source.labels[j], bad


def collate(batch):
    """Stack outputs (a tensor or a tuple of view tensors), labels, and concatenate bad indices."""
    outputs, labels, bad = zip(*batch, strict=True)
    if isinstance(outputs[0], (tuple, list)):
        images = tuple(torch.stack(views) for views in zip(*outputs, strict=True))
    else:
        images = torch.stack(outputs)
    return images, torch.tensor(labels), [j for b in bad for j in b]


# ----------------------------------------------------------------------------- sampler
class ResumableSampler(torch.utils.data.Sampler):
    """A distributed sampler whose epoch order is a function of ``(seed, epoch)`` only.

    Like ``DistributedSampler`` (drop_last mode): the epoch permutation is drawn from a
    generator seeded with ``seed + epoch``, cut to a multiple of ``world_size`` and dealt
    ``rank::world_size``. It also draws one augmentation seed per image, yielding
    ``(index, seed)`` keys for ``ImageDataset``, and ``set_epoch(epoch, start)`` can skip the
    first ``start`` keys of this rank's share, so a run resumed mid-epoch sees exactly the
    batches an uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard_size(self) -> int:
        return self.size // self.world_size

    def keys(self) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        order = order[: self.shard_size() * self.world_size][self.rank :: self.world_size]
        return list(zip(order.tolist(), seeds[order].tolist(), strict=True))

    def __iter__(self):
        return iter(self.keys()[self.start :])

    def __len__(self) -> int:
        return max(self.shard_size() - self.start, 0)


def worker_init(_worker_id: int) -> None:
    """One torch thread per loader worker: the workers are the parallelism."""
    torch.set_num_threads(1)


def build_dataset(cfg, split: bool = False) -> ImageDataset:
    """The pretraining dataset of ``cfg``: two augmented views of every image, or with ``split``
    their worker half, ``(crop1, crop2, params1, params2)``, for ``device_aug.augment`` to finish
    (the same random draws either way)."""
    from pretrain.transforms import build_pretrain_transform

    source = load_source(cfg.DATA.ROOT, cfg.DATA.FORMAT, cfg.DATA.MAX_IMAGES)
    return ImageDataset(source, build_pretrain_transform(cfg, split=split))


def build_eval_dataset(cfg, root: str, transform: Callable) -> ImageDataset:
    """A labelled evaluation split (kNN, linear probe) in ``DATA.KNN_FORMAT`` (or ``DATA.FORMAT``)."""
    return ImageDataset(load_source(root, cfg.DATA.KNN_FORMAT or cfg.DATA.FORMAT), transform)
