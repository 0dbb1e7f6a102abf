"""``feataug prepare-data``: fetch the registry datasets, verify them, convert them.

Three real datasets ship inside ordinary registry packages, so they can be fetched wherever PyPI
and Debian's archive are reachable, and nowhere else is needed:

``deepforest``
    The NEON aerial RGB images with Pascal VOC boxes inside the ``deepforest==2.1.0`` wheel (read
    straight from the zip; the package is never installed). Each image is cut into tiles of about
    ``tile_size`` pixels on a grid without overlap. A box cut by a tile edge is clipped to the tile
    and kept only in the tiles that hold at least half of its area (``MIN_VISIBLE``); it is marked
    ``truncated`` there. The split is by source image, never by tile (``DEEPFOREST_SPLITS``): the
    large Yellowstone crop trains; the other Yellowstone crop and the OSBS (Florida) and SOAP
    (California) plots are held out, so the test set has two sites never seen in training. All
    boxes are one class, ``tree`` (SOAP_061's ``Alive``/``Dead`` become ``tree``). ``unlabeled/``
    holds ``crop_size`` crops of the training image and of the wheel's unannotated photos for
    self-supervised pretraining (``extra_photos`` adds natural photos from scikit-image's wheel).

``labelme``
    The three VOC-2011 photos of the ``labelme==6.3.1`` sdist's ``examples/``: its VOC XML boxes
    rewritten with integer 1-based corners, ``difficult`` 0 and VOC class names (``potted plant``
    -> ``pottedplant``, ``tv/monitor`` -> ``tvmonitor``), and its COCO polygons with the
    ``_background_`` category dropped and ids made contiguous from 1. Three images are a smoke
    dataset: ``trainval`` and ``test`` both list all of them.

``fashion-mnist``
    The four gzipped IDX files of Debian's ``dataset-fashion-mnist`` copied verbatim (the layout
    ``DATA.FORMAT idx`` reads), plus small labeled PNG folders for kNN evaluation: ``train-knn/``
    (the first ``knn_train`` training images of each class) and ``val-knn/`` (the first ``knn_val``
    test images of each class), one sub-folder per class named ``<label>_<name>``.

Coordinates: DeepForest's and labelme's boxes are read as continuous pixel coordinates (0 at the
image's left/top edge). VOC files get the VOC convention (1-based inclusive corners: ``xmin + 1``),
which Detectron2's VOC loader maps back; COCO files get ``[x, y, w, h]`` in the continuous frame.
So the VOC and COCO files of one dataset describe identical boxes.

Every downloaded archive and every file read from it is pinned by sha256. Downloads are cached in
``$FEATAUG_CACHE`` (default ``~/.cache/feataug``). A dataset is built in a temporary folder beside
its destination and renamed into place after its marker file ``prepared.json`` is written, so a
finished dataset is recognised at once and an interrupted one leaves nothing behind.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MARKER = "prepared.json"
FORMAT_VERSION = 1
MIN_VISIBLE = 0.5  # a clipped box is kept in a tile holding at least this fraction of its area


class DataError(Exception):
    """A dataset cannot be fetched or converted; the message says what to do."""


# --------------------------------------------------------------------------- pinned sources


@dataclass(frozen=True)
class PipSource:
    """A file that ``pip download --no-deps`` fetches from PyPI, pinned by sha256."""

    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


DEEPFOREST_WHEEL = PipSource(
    "deepforest==2.1.0",
    "deepforest-2.1.0-py3-none-any.whl",
    "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54",
    ("--only-binary", ":all:"),
)
LABELME_SDIST = PipSource(
    "labelme==6.3.1",
    "labelme-6.3.1.tar.gz",
    "2947e0d8341a92faa7b3ee50cf4b672f838051c6bf24892526e95b64fd3a707e",
    ("--no-binary", ":all:"),
)
# One fixed platform wheel, so the file (and its hash) is the same on every machine.
SKIMAGE_WHEEL = PipSource(
    "scikit-image==0.25.2",
    "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
    tuple(
        "--only-binary :all: --platform manylinux_2_17_x86_64 --python-version 3.11 "
        "--implementation cp".split()
    ),
)

DEEPFOREST_PREFIX = "deepforest/data/"
DEEPFOREST_FILES = {
    "2019_YELL_2_528000_4978000_image_crop2.png": "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
    "2019_YELL_2_528000_4978000_image_crop2.xml": "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11",
    "2019_YELL_2_541000_4977000_image_crop.png": "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
    "2019_YELL_2_541000_4977000_image_crop.xml": "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631",
    # OSBS_029.xml names OSBS_029.tif; the .png beside it holds the same pixels.
    "OSBS_029.png": "d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
    "OSBS_029.xml": "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c",
    "SOAP_061.png": "256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
    "SOAP_061.xml": "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c",
    "SOAP_031.png": "506af051225465bd575e0e3ca0da1e6b8a269464d2144a0415829da78fcd1527",
    "AWPE Pigeon Lake 2020 DJI_0005.JPG": "c072df1a9756b042a1cb5a5f524b8ac3f0639c6b16dcfa66a07bd154137029b3",
}
DEEPFOREST_SPLITS = {
    "train": ("2019_YELL_2_528000_4978000_image_crop2",),
    "test": ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029", "SOAP_061"),
}
DEEPFOREST_UNLABELED_EXTRA = ("SOAP_031.png", "AWPE Pigeon Lake 2020 DJI_0005.JPG")
DEEPFOREST_CLASS = "tree"

SKIMAGE_PREFIX = "skimage/data/"
SKIMAGE_PHOTOS = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    "motorcycle_right.png": "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
}

LABELME_PREFIX = "labelme-6.3.1/examples/"
LABELME_IDS = ("2011_000003", "2011_000006", "2011_000025")
LABELME_COCO = "instance_segmentation/data_dataset_coco/annotations.json"
LABELME_FILES = {
    "bbox_detection/data_dataset_voc/Annotations/2011_000003.xml": "e7a95a42863fb82dc969bba65a5487addaebe4cea95284e0318db958a31972f3",
    "bbox_detection/data_dataset_voc/Annotations/2011_000006.xml": "4dbe3871399e1aab557074e3b0971c1851959c5eb1bace39296b8a9da6a973d7",
    "bbox_detection/data_dataset_voc/Annotations/2011_000025.xml": "185b1ea0ea083d338b6485d98ceec46fcd6881d0c206825f445917387987d6d5",
    "bbox_detection/data_dataset_voc/JPEGImages/2011_000003.jpg": "40c7f2fbf740c7e9707f97047a83593f6c36d8951a737b4287528932d809e80d",
    "bbox_detection/data_dataset_voc/JPEGImages/2011_000006.jpg": "9f58b8e4aca7f0411d3c8fe365da1ba5de9c36c729bda2f32cefbbb246ef1e1f",
    "bbox_detection/data_dataset_voc/JPEGImages/2011_000025.jpg": "52794c29522d495c942baf7d41823b91479ec55723bcc72d6080540831701b82",
    LABELME_COCO: "935081d34679b92a74e0dc1acf04e5ac97b01cba7eefe26d5572e761ebf16ec2",
}
# The 20 Pascal VOC classes in their usual order (Detectron2's CLASS_NAMES).
# fmt: off
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# fmt: on
VOC_NAME_FIXES = {"potted plant": "pottedplant", "tv/monitor": "tvmonitor"}

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


# --------------------------------------------------------------------------- locations, fetching


def default_root() -> Path:
    """``$FEATAUG_DATA``, else ``datasets/`` under the current directory."""
    return Path(os.environ.get("FEATAUG_DATA") or "datasets")


def cache_dir() -> Path:
    """``$FEATAUG_CACHE``, else ``~/.cache/feataug``."""
    return Path(os.environ.get("FEATAUG_CACHE") or Path.home() / ".cache" / "feataug")


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str, what: str) -> bytes:
    got = sha256_bytes(data)
    if got != expected:
        raise DataError(f"{what}: sha256 {got} does not match the pinned {expected}")
    return data


def fetch_pip(src: PipSource, cache: Path | None = None) -> Path:
    """Return the cached, verified ``src`` file, running ``pip download`` only when it is absent."""
    cache = Path(cache or cache_dir())
    dest = cache / src.filename
    if dest.is_file():
        check_sha256(dest.read_bytes(), src.sha256, f"{dest} (delete it to fetch it again)")
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--quiet", *src.pip_args, "--dest", tmp, src.requirement]
        print(f"downloading {src.requirement} from PyPI ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / src.filename
        if proc.returncode != 0 or not got.is_file():
            errors = [ln.strip() for ln in proc.stderr.splitlines() if "ERROR" in ln]
            why = errors[-1] if errors else f"pip exited with {proc.returncode}"
            raise DataError(
                f"`pip download --no-deps {src.requirement}` failed ({why}); check that PyPI is "
                f"reachable, or fetch {src.filename} where it is and pass it with --source FILE"
            )
        check_sha256(got.read_bytes(), src.sha256, f"downloaded {src.filename}")
        os.replace(got, dest)
    return dest


def read_members(source: str | os.PathLike, prefix: str, pins: dict[str, str]) -> dict[str, bytes]:
    """Read the files ``pins`` names (paths under ``prefix``) and verify each one's sha256.

    ``source`` is a wheel/zip, a tarball, or a directory holding the files at any depth of the
    ``prefix`` path (for example both an unpacked sdist and its ``examples/`` folder work).
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or directory")
    out: dict[str, bytes] = {}
    try:
        if source.is_dir():
            for name in pins:
                parts = Path(prefix + name).parts  # try the full path, then shorter tails
                tails = (source.joinpath(*parts[i:]) for i in range(len(parts)))
                found = next((p for p in tails if p.is_file()), None)
                if found is None:
                    raise DataError(f"{source}: does not contain {prefix + name}")
                out[name] = found.read_bytes()
        elif zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as zf:
                for name in pins:
                    out[name] = zf.read(prefix + name)
        elif tarfile.is_tarfile(source):
            with tarfile.open(source) as tf:
                for name in pins:
                    member = tf.extractfile(prefix + name)
                    if member is None:
                        raise KeyError(prefix + name)
                    out[name] = member.read()
        else:
            raise DataError(f"{source}: not a zip/wheel, a tarball or a directory")
    except KeyError as e:
        raise DataError(f"{source}: does not contain {e.args[0]}") from None
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise DataError(f"{source}: cannot be read ({e})") from None
    for name, data in out.items():
        check_sha256(data, pins[name], f"{source}: {prefix + name}")
    return out


# --------------------------------------------------------------------------- geometry, VOC, COCO


def tile_grid(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` into ``max(1, round(length / tile))`` near-equal intervals."""
    n = max(1, round(length / tile))
    edges = [i * length // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def clip_boxes(boxes: np.ndarray, tile: Sequence[int], min_visible: float = MIN_VISIBLE):
    """Boxes of one image seen through ``tile = (x0, y0, x1, y1)``.

    ``boxes``: (N, 4) ``xyxy`` in image pixels. Returns ``(kept, truncated, index)``: the boxes
    holding at least ``min_visible`` of their area inside the tile, clipped to it and shifted to
    tile coordinates (M, 4); whether clipping changed each one (M,); their rows in ``boxes`` (M,).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = tile
    clipped = np.clip(boxes, [x0, y0, x0, y0], [x1, y1, x1, y1])
    inter = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    index = np.flatnonzero((inter > 0) & (inter >= min_visible * area))
    truncated = (clipped[index] != boxes[index]).any(axis=1)
    return clipped[index] - [x0, y0, x0, y0], truncated, index


def parse_voc(xml: bytes, what: str) -> tuple[int, int, list[str], np.ndarray]:
    """``(width, height, names, boxes (N, 4) xyxy float)`` of a VOC XML file, values as written."""
    try:
        root = ET.fromstring(xml)
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        names, boxes = [], []
        for obj in root.iter("object"):
            names.append(obj.findtext("name").strip())
            boxes.append(
                [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            )
    except (ET.ParseError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{what}: not a readable VOC annotation ({e})") from None
    return width, height, names, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def voc_xml(
    filename: str, width: int, height: int, objects: Iterable[tuple[str, Sequence[int], bool]]
) -> bytes:
    """A VOC annotation. ``objects``: ``(name, (x0, y0, x1, y1), truncated)`` with integer
    continuous corners; written 1-based (``xmin = x0 + 1``) with ``difficult`` 0."""
    ann = ET.Element("annotation")

    def sub(parent, tag, text=None):
        el = ET.SubElement(parent, tag)
        if text is not None:
            el.text = str(text)
        return el

    sub(ann, "folder", "JPEGImages")
    sub(ann, "filename", filename)
    size = sub(ann, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        sub(size, tag, value)
    sub(ann, "segmented", 0)
    for name, (x0, y0, x1, y1), truncated in objects:
        obj = sub(ann, "object")
        sub(obj, "name", name)
        sub(obj, "pose", "Unspecified")
        sub(obj, "truncated", int(truncated))
        sub(obj, "difficult", 0)
        box = sub(obj, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            sub(box, tag, int(value))
    ET.indent(ann)
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def coco_json(
    images: list[dict], annotations: list[dict], categories: Sequence[str], description: str
) -> dict:
    """A COCO instances dict; image, annotation and category ids are numbered from 1 in order.

    ``images``: ``{"file_name", "width", "height"}``; ``annotations``: ``{"image", "category",
    "bbox" [x, y, w, h], "area"}`` plus optional ``"segmentation"``, where ``image`` indexes
    ``images`` and ``category`` indexes ``categories``.
    """
    out_anns = []
    for i, a in enumerate(annotations, 1):
        ann = {
            "id": i,
            "image_id": a["image"] + 1,
            "category_id": a["category"] + 1,
            "bbox": [float(v) for v in a["bbox"]],
            "area": float(a["area"]),
            "iscrowd": 0,
        }
        if "segmentation" in a:
            ann["segmentation"] = a["segmentation"]
        out_anns.append(ann)
    return {
        "info": {"description": description, "version": str(FORMAT_VERSION)},
        "licenses": [],
        "images": [{"id": i, **im} for i, im in enumerate(images, 1)],
        "annotations": out_anns,
        "categories": [
            {"id": i, "name": n, "supercategory": n} for i, n in enumerate(categories, 1)
        ],
    }


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def _open_rgb(data: bytes, what: str):
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except OSError as e:
        raise DataError(f"{what}: not a readable image ({e})") from None
    return im.convert("RGB")


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not enabled, leave=False)


# --------------------------------------------------------------------------- building in place


def _publish(out: Path, build: Callable[[Path], dict], force: bool) -> dict:
    """Return ``out``'s summary if it is already prepared; else ``build(tmp)`` in a temporary
    folder beside ``out``, write the marker there last, and rename the folder to ``out``."""
    marker = out / MARKER
    if marker.is_file() and not force:
        try:
            summary = json.loads(marker.read_text())
        except ValueError:
            summary = {}
        if summary.get("format") == FORMAT_VERSION:
            return {**summary, "reused": True}
    elif out.exists() and not force:
        raise DataError(
            f"{out} exists but is not a prepared dataset (no {MARKER}); remove it or pass --force"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        summary = {"format": FORMAT_VERSION, **build(tmp)}
        _write_json(tmp / MARKER, summary)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return {**summary, "reused": False}


# --------------------------------------------------------------------------- DeepForest


def _grid_crops(image, size: int):
    """Non-overlapping ``size`` x ``size`` crops on a grid from the top-left; edges dropped."""
    w, h = image.size
    for r in range(h // size):
        for c in range(w // size):
            yield r, c, image.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))


def _write_tiles(out: Path, stem: str, image, boxes: np.ndarray, tile_size: int):
    """Save the tiles of one source image (JPEG + VOC XML); yield ``(tile_id, w, h, boxes)``
    with the tile's boxes as integer ``xyxy`` in tile coordinates."""
    for ty0, ty1 in tile_grid(image.height, tile_size):
        for tx0, tx1 in tile_grid(image.width, tile_size):
            tile_id = f"{stem}_{tx0:04d}_{ty0:04d}"
            kept, truncated, _ = clip_boxes(boxes, (tx0, ty0, tx1, ty1))
            kept = kept.round().astype(int)
            tile = image.crop((tx0, ty0, tx1, ty1))
            tile.save(out / "JPEGImages" / f"{tile_id}.jpg", quality=95, subsampling=0)
            objects = [
                (DEEPFOREST_CLASS, box, t)
                for box, t in zip(kept.tolist(), truncated.tolist(), strict=True)
            ]
            xml = voc_xml(f"{tile_id}.jpg", tile.width, tile.height, objects)
            (out / "Annotations" / f"{tile_id}.xml").write_bytes(xml)
            yield tile_id, tile.width, tile.height, kept


def _build_deepforest(
    out: Path,
    files: dict[str, bytes],
    photos: dict[str, bytes],
    tile_size: int,
    crop_size: int,
    progress: bool,
) -> dict:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "unlabeled"):
        (out / sub).mkdir(parents=True)
    images = {
        stem: _open_rgb(files[stem + ".png"], stem + ".png")
        for stems in DEEPFOREST_SPLITS.values()
        for stem in stems
    }
    n_tiles = sum(
        len(tile_grid(im.width, tile_size)) * len(tile_grid(im.height, tile_size))
        for im in images.values()
    )
    bar = _progress(None, n_tiles, "tiling", progress)
    splits = {}
    for split, stems in DEEPFOREST_SPLITS.items():
        ids, coco_images, coco_anns = [], [], []
        for stem in stems:
            width, height, _, boxes = parse_voc(files[stem + ".xml"], stem + ".xml")
            if (width, height) != images[stem].size:
                raise DataError(
                    f"{stem}.xml: size {width}x{height} but the image is {images[stem].size}"
                )
            for tile_id, tw, th, kept in _write_tiles(out, stem, images[stem], boxes, tile_size):
                coco_anns += [
                    {"image": len(ids), "category": 0, "area": (x1 - x0) * (y1 - y0),
                     "bbox": [x0, y0, x1 - x0, y1 - y0]}
                    for x0, y0, x1, y1 in kept.tolist()
                ]  # fmt: skip
                coco_images.append({"file_name": f"{tile_id}.jpg", "width": tw, "height": th})
                ids.append(tile_id)
                bar.update()
        _write_lines(out / "ImageSets" / "Main" / f"{split}.txt", ids)
        description = f"DeepForest 2.1.0 NEON tiles ({split})"
        coco = coco_json(coco_images, coco_anns, [DEEPFOREST_CLASS], description)
        _write_json(out / f"instances_{split}.json", coco)
        splits[split] = {"images": len(ids), "boxes": len(coco_anns), "sources": list(stems)}
    bar.close()
    _write_lines(out / "labels.txt", [DEEPFOREST_CLASS])

    unlabeled = {stem + ".png": images[stem] for stem in DEEPFOREST_SPLITS["train"]}
    unlabeled |= {
        name: _open_rgb(files.get(name) or photos[name], name)
        for name in (*DEEPFOREST_UNLABELED_EXTRA, *photos)
    }
    n_crops = 0
    for name, image in unlabeled.items():
        stem = Path(name).stem.replace(" ", "_")
        for r, c, crop in _grid_crops(image, crop_size):
            crop.save(out / "unlabeled" / f"{stem}_{r:02d}_{c:02d}.jpg", quality=95, subsampling=0)
            n_crops += 1
    return {
        "dataset": "deepforest",
        "splits": splits,
        "unlabeled": {"images": n_crops, "crop_size": crop_size, "sources": list(unlabeled)},
        "tile_size": tile_size,
        "min_visible": MIN_VISIBLE,
        "classes": [DEEPFOREST_CLASS],
    }


def prepare_deepforest(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    *,
    tile_size: int = 400,
    crop_size: int = 128,
    extra_photos: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build ``ROOT/deepforest`` (VOC + COCO tiles, ``unlabeled/`` crops); return its summary.

    ``source``: the deepforest 2.1.0 wheel or a folder holding its ``deepforest/data`` files;
    by default the wheel is downloaded (once) into the cache.
    """
    out = Path(root or default_root()) / "deepforest"

    def build(tmp: Path) -> dict:
        files = read_members(
            source or fetch_pip(DEEPFOREST_WHEEL), DEEPFOREST_PREFIX, DEEPFOREST_FILES
        )
        photos = (
            read_members(fetch_pip(SKIMAGE_WHEEL), SKIMAGE_PREFIX, SKIMAGE_PHOTOS)
            if extra_photos
            else {}
        )
        return _build_deepforest(tmp, files, photos, tile_size, crop_size, progress)

    return _publish(out, build, force)


# --------------------------------------------------------------------------- labelme


def voc_name(name: str) -> str:
    """labelme's class name as Pascal VOC spells it."""
    return VOC_NAME_FIXES.get(name, name)


def _polygon_area(segmentation: list[list[float]], height: int, width: int) -> float:
    """Pixel area of the union of the polygons, rasterized as COCO does."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects(segmentation, height, width)
    return float(mask_utils.area(mask_utils.merge(rles)))


def _build_labelme(out: Path, files: dict[str, bytes]) -> dict:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True)
    voc_dir = "bbox_detection/data_dataset_voc/"
    present, n_boxes = set(), 0
    for image_id in LABELME_IDS:
        what = f"{LABELME_PREFIX}{voc_dir}Annotations/{image_id}.xml"
        width, height, names, boxes = parse_voc(files[f"{voc_dir}Annotations/{image_id}.xml"], what)
        names = [voc_name(n) for n in names]
        unknown = sorted(set(names) - set(VOC_CLASSES))
        if unknown:
            raise DataError(f"{what}: classes {unknown} are not Pascal VOC classes")
        ints = np.clip(np.round(boxes), 0, [width, height, width, height]).astype(int)
        objects = [(n, b, False) for n, b in zip(names, ints.tolist(), strict=True)]
        (out / "Annotations" / f"{image_id}.xml").write_bytes(
            voc_xml(f"{image_id}.jpg", width, height, objects)
        )
        (out / "JPEGImages" / f"{image_id}.jpg").write_bytes(
            files[f"{voc_dir}JPEGImages/{image_id}.jpg"]
        )
        present.update(names)
        n_boxes += len(objects)
    for split in ("trainval", "test"):
        _write_lines(out / "ImageSets" / "Main" / f"{split}.txt", LABELME_IDS)
    _write_lines(out / "labels.txt", [c for c in VOC_CLASSES if c in present])

    try:
        src = json.loads(files[LABELME_COCO])
        keep = [
            c
            for c in sorted(src["categories"], key=lambda c: c["id"])
            if c["name"] != "_background_"
        ]
        cat_index = {c["id"]: i for i, c in enumerate(keep)}
        img_index = {im["id"]: i for i, im in enumerate(src["images"])}
        images = [
            {"file_name": Path(im["file_name"]).name, "width": im["width"], "height": im["height"]}
            for im in src["images"]
        ]
        anns = []
        for a in src["annotations"]:
            if a["category_id"] not in cat_index:
                continue  # an instance of `_background_` is no object
            image = images[img_index[a["image_id"]]]
            xy = np.concatenate(
                [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in a["segmentation"]]
            )
            (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
            anns.append(
                {
                    "image": img_index[a["image_id"]],
                    "category": cat_index[a["category_id"]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": a["segmentation"],
                    "area": _polygon_area(a["segmentation"], image["height"], image["width"]),
                }
            )
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"{LABELME_PREFIX}{LABELME_COCO}: unexpected COCO content ({e!r})"
        ) from None
    categories = [voc_name(c["name"]) for c in keep]
    _write_json(
        out / "instances.json", coco_json(images, anns, categories, "labelme 6.3.1 examples")
    )
    return {
        "dataset": "labelme",
        "splits": {
            "voc": {"images": len(LABELME_IDS), "boxes": n_boxes},
            "coco": {"images": len(images), "boxes": len(anns)},
        },
        "voc_classes": [c for c in VOC_CLASSES if c in present],
        "coco_categories": categories,
    }


def prepare_labelme(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> dict:
    """Build ``ROOT/labelme`` (VOC ``Annotations/`` + COCO ``instances.json`` with polygons).

    ``source``: the labelme 6.3.1 sdist or a folder holding its ``examples/``; by default the sdist
    is downloaded (once) into the cache.
    """
    out = Path(root or default_root()) / "labelme"

    def build(tmp: Path) -> dict:
        return _build_labelme(
            tmp, read_members(source or fetch_pip(LABELME_SDIST), LABELME_PREFIX, LABELME_FILES)
        )

    return _publish(out, build, force)


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(data: bytes, what: str) -> np.ndarray:
    """An IDX array of unsigned bytes (gzip-compressed or not)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{what}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(dims)):
        raise DataError(f"{what}: {len(data) - offset} data bytes for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


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
        images = read_idx(files[f"{part}-images-idx3-ubyte.gz"], f"{part}-images-idx3-ubyte.gz")
        labels = read_idx(files[f"{part}-labels-idx1-ubyte.gz"], f"{part}-labels-idx1-ubyte.gz")
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


# --------------------------------------------------------------------------- command line

PREPARERS = {
    "deepforest": prepare_deepforest,
    "labelme": prepare_labelme,
    "fashion-mnist": prepare_fashion_mnist,
}


def format_summary(name: str, out: Path, summary: dict) -> str:
    state = "already prepared" if summary.get("reused") else "prepared"
    boxes = any("boxes" in counts for counts in summary["splits"].values())
    lines = [
        f"{name}: {state} in {out}",
        f"  {'split':<12}{'images':>8}" + (f"{'boxes':>8}" if boxes else ""),
    ]
    for split, counts in summary["splits"].items():
        lines.append(
            f"  {split:<12}{counts['images']:>8}"
            + (f"{counts.get('boxes', ''):>8}" if boxes else "")
        )
    if "unlabeled" in summary:
        u = summary["unlabeled"]
        lines.append(f"  {'unlabeled':<12}{u['images']:>8}  ({u['crop_size']} px crops)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from feataug import scenes

    choices = [*PREPARERS, scenes.NAME]
    parser.add_argument("dataset", choices=choices, help="which dataset to prepare")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="output root (default: $FEATAUG_DATA, else ./datasets)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="use this local file/folder instead of downloading: the deepforest "
        "wheel, the labelme sdist, or a folder with the 4 Fashion-MNIST .gz files",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument(
        "--extra-photos",
        action="store_true",
        help="deepforest: add scikit-image's sample photos to unlabeled/",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    scenes.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from feataug import scenes

    if args.dataset == scenes.NAME:
        return scenes.main(args)
    root = Path(args.root or default_root())
    kwargs = {"source": args.source, "force": args.force}
    if args.dataset == "deepforest":
        kwargs |= {"extra_photos": args.extra_photos, "progress": not args.no_progress}
    try:
        summary = PREPARERS[args.dataset](root, **kwargs)
    except DataError as e:
        print(f"feataug prepare-data: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(args.dataset, root / args.dataset, summary))
    return 0
