"""Register PASCAL-VOC-format and COCO-format detection datasets with Detectron2.

VOC layout (``ROOT``)::

    Annotations/<id>.xml            one file per image
    JPEGImages/<id>.<any extension> the image (jpg, png, tif, ...)
    ImageSets/Main/<split>.txt      the ids of the split, one a line

The reader accepts what real exports contain: float box coordinates, an empty or missing
``<difficult/>``, a missing ``<size>`` (read from the image), class names with spaces or
slashes. Records keep each object's ``difficult`` flag; the VOC evaluator
(``transfer.evaluation.VOCEvaluator``) evaluates against these records instead of re-reading the XML.

Boxes follow Detectron2's VOC convention: VOC coordinates are 1-based inclusive pixel
indices, so ``xmin``/``ymin`` are shifted by -1 into Detectron2's continuous coordinates.
A box reaching at most :data:`CLIP_TOLERANCE` pixels outside its image (``<size>``, or the image
when there is none) is clipped to it, with one warning per split counting them; a box farther
out, or with no area left inside, is refused. Split files hold one id a line; a line with
whitespace inside (an id with a space, or a per-class ``<id> <label>`` file) is refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASS_NAMES
from detectron2.structures import BoxMode

from pretrain.errors import FeatAugError, reason
from pretrain.utils.io import read_regular
from transfer.coco_checks import COCOEvalError, check_gt
from transfer.voc import DatasetError, parse_voc_xml

__all__ = [
    "CLIP_TOLERANCE",
    "DatasetError",
    "VOC_CLASS_NAMES",
    "STANDARD_VOC_SPLITS",
    "read_class_names",
    "voc_class_names_from_data",
    "load_voc",
    "register_voc",
    "register_coco",
    "register_standard_voc",
    "datasets_root",
    "check_records",
]

logger = logging.getLogger(__name__)

# How far (pixels) a box may reach outside its image and still be clipped rather than refused:
# exporters round, or write 0-based coordinates into the 1-based VOC format.
CLIP_TOLERANCE = 2.0

# Preferred image extensions when several files share an id (first wins).
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

# Standard names -> (directory under DETECTRON2_DATASETS, split, year). VOC07+12 training is
# DATASETS.TRAIN ('voc_2007_trainval', 'voc_2012_trainval').
STANDARD_VOC_SPLITS = {
    "voc_2007_trainval": ("VOC2007", "trainval", 2007),
    "voc_2007_train": ("VOC2007", "train", 2007),
    "voc_2007_val": ("VOC2007", "val", 2007),
    "voc_2007_test": ("VOC2007", "test", 2007),
    "voc_2012_trainval": ("VOC2012", "trainval", 2012),
    "voc_2012_train": ("VOC2012", "train", 2012),
    "voc_2012_val": ("VOC2012", "val", 2012),
}


def datasets_root() -> Path:
    """``$DETECTRON2_DATASETS`` or ``./datasets`` (Detectron2's convention)."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _utf8_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (OSError as raised); other bytes are one error line."""
    data = read_regular(path)
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
                           f"{e.start})") from None


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name a line; blank lines and ``#`` comments skipped; duplicates refused."""
    path = Path(path)
    try:
        lines = _utf8_lines(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read class names ({e.strerror})") from None
    names = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not names:
        raise DatasetError(f"{path}: no class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{path}: duplicate class names {dup}")
    return names


# ---------------------------------------------------------------------------------- VOC
def _parse_voc_xml(path: str) -> tuple[tuple[int, int] | None, tuple[tuple, ...]]:
    """:func:`transfer.voc.parse_voc_xml` of a file, cached per (path, modification time, size):
    class collection and loading read each file once."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    return _parse_voc_xml_cached(path, st.st_mtime_ns, st.st_size)


@cache
def _parse_voc_xml_cached(path: str, mtime_ns: int, size: int):
    try:
        data = read_regular(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_voc_xml(data, path)


def _read_split(root: Path, split: str) -> list[str]:
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        lines = _utf8_lines(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: split file not found") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    ids = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) > 1:
            raise DatasetError(
                f"{path}: line {n} {line.strip()!r} is not one image id (ids cannot contain "
                "whitespace; a per-class <id> <label> file is not a split)"
            )
        ids += fields
    if not ids:
        raise DatasetError(f"{path}: empty split")
    return ids


def _image_index(root: Path) -> dict[str, str]:
    """Image id (file stem) -> path under ``JPEGImages/``, any extension."""
    folder = root / "JPEGImages"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    rank = {ext: i for i, ext in enumerate(_IMAGE_EXTS)}
    index: dict[str, str] = {}
    for name in sorted(
        os.listdir(folder), key=lambda n: rank.get(Path(n).suffix.lower(), len(rank))
    ):
        stem, ext = os.path.splitext(name)
        if ext and stem not in index:
            index[stem] = str(folder / name)
    return index


def voc_class_names_from_data(root: str | os.PathLike) -> list[str]:
    """Sorted names of every object class in ``ROOT/Annotations/*.xml`` (all splits)."""
    folder = Path(root) / "Annotations"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: annotation folder not found")
    names = {o[0] for f in sorted(folder.glob("*.xml")) for o in _parse_voc_xml(str(f))[1]}
    if not names:
        raise DatasetError(f"{folder}: no annotated objects to take class names from")
    return sorted(names)


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from None


def _clip(box: list[float], width: int, height: int, xml: Path, what: str) -> float:
    """Clip ``box`` (Detectron2 coordinates) to the image in place; how far it reached out."""
    x0, y0, x1, y1 = box
    out = max(-x0, -y0, x1 - width, y1 - height, 0.0)
    if out == 0:
        return 0.0
    if out > CLIP_TOLERANCE:
        raise DatasetError(
            f"{xml}: {what} reaches {out:g} px outside the {width}x{height} image "
            f"(more than {CLIP_TOLERANCE:g} px: wrong <size> or coordinates?)"
        )
    box[:] = [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(f"{xml}: {what} has no area inside the {width}x{height} image")
    return out


def load_voc(root: str | os.PathLike, split: str, class_names: Sequence[str]) -> list[dict]:
    """Detectron2 dataset dicts of a VOC-format split.

    Each annotation has ``bbox`` (XYXY_ABS, Detectron2 coordinates, clipped to the image within
    :data:`CLIP_TOLERANCE`), ``category_id`` (index in ``class_names``) and ``difficult`` (bool,
    kept for evaluation; training uses all boxes, as Detectron2's VOC loader does).
    """
    root = Path(root)
    images = _image_index(root)
    class_to_id = {c: i for i, c in enumerate(class_names)}
    clipped, farthest = 0, 0.0
    dicts = []
    for image_id in _read_split(root, split):
        xml = root / "Annotations" / f"{image_id}.xml"
        if image_id not in images:
            raise DatasetError(
                f"{root / 'JPEGImages'}: no image for id {image_id!r} (split {split})"
            )
        wh, objects = _parse_voc_xml(str(xml))
        width, height = wh or _image_size(images[image_id])
        annotations = []
        for k, (name, (x1, y1, x2, y2), difficult) in enumerate(objects):
            if name not in class_to_id:
                raise DatasetError(
                    f"{xml}: class {name!r} is not among the {len(class_names)} classes"
                )
            box = [x1 - 1.0, y1 - 1.0, x2, y2]
            out = _clip(box, int(width), int(height), xml, f"object {k} ({name})")
            clipped, farthest = clipped + (out > 0), max(farthest, out)
            annotations.append(
                {
                    "category_id": class_to_id[name],
                    "bbox": box,
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "difficult": difficult,
                }
            )
        dicts.append(
            {
                "file_name": images[image_id],
                "image_id": image_id,
                "height": int(height),
                "width": int(width),
                "annotations": annotations,
            }
        )
    if clipped:
        logger.warning(
            f"{root} split {split}: clipped {clipped} boxes to their image "
            f"(reaching up to {farthest:g} px outside)"
        )
    return dicts


def _unregister(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_voc(
    name: str,
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str] | str | os.PathLike | None = None,
    year: int | None = None,
    replace: bool = False,
) -> None:
    """Register a VOC-format split as ``name`` (``evaluator_type`` ``"pascal_voc"``).

    ``class_names``: a list, a file with one name a line, or None to collect them from all of
    ``ROOT/Annotations``. ``year``: 2007 selects the VOC2007 11-point AP; by default 2007 when the
    name contains "2007", else 2012 (area under the PR curve). The split file and folders are
    checked now; the records are read when Detectron2 asks for them. ``replace``: drop an
    existing registration of ``name`` first.
    """
    root = Path(root)
    for sub in ("Annotations", "JPEGImages"):
        if not (root / sub).is_dir():
            raise DatasetError(f"{root / sub}: folder not found (VOC root {root})")
    _read_split(root, split)
    if class_names is None:
        class_names = voc_class_names_from_data(root)
    elif isinstance(class_names, (str, os.PathLike)):
        class_names = read_class_names(class_names)
    class_names = list(class_names)
    if year is None:
        year = 2007 if "2007" in name else 2012
    if replace:
        _unregister(name)
    elif name in DatasetCatalog.list():
        raise DatasetError(f"dataset {name!r} is already registered")
    DatasetCatalog.register(name, lambda: load_voc(root, split, class_names))
    MetadataCatalog.get(name).set(
        thing_classes=class_names,
        dirname=str(root),
        split=split,
        year=year,
        evaluator_type="pascal_voc",
    )


def register_standard_voc(root: str | os.PathLike | None = None) -> list[str]:
    """(Re-)register ``voc_2007_*`` / ``voc_2012_*`` under ``root`` (default
    :func:`datasets_root`) with this module's tolerant reader; returns the names whose folders
    exist. Names whose folder is missing keep Detectron2's registration.
    """
    root = Path(root) if root is not None else datasets_root()
    done = []
    for name, (folder, split, year) in STANDARD_VOC_SPLITS.items():
        if (root / folder / "ImageSets" / "Main" / f"{split}.txt").is_file():
            register_voc(name, root / folder, split, VOC_CLASS_NAMES, year=year, replace=True)
            done.append(name)
    return done


def check_records(names: Sequence[str]) -> None:
    """Read the records of the datasets ``names`` now (their ``DatasetCatalog`` functions), so that
    bad data (a box far outside its image, a split id without an image, ...) is refused before a
    model is built or a file written; a Detectron2 loader's own failure becomes one line too."""
    for name in dict.fromkeys(names):
        try:
            DatasetCatalog.get(name)
        except FeatAugError:
            raise
        except (AssertionError, KeyError, TypeError, ValueError, OSError) as e:
            raise DatasetError(
                f"dataset {name!r}: cannot read its records ({reason(e, with_type=True)})"
            ) from None


# --------------------------------------------------------------------------------- COCO
def _check_image_files(images: list[dict], json_file: Path, image_root: Path) -> None:
    """Every image of the json names a file that exists under ``image_root``."""
    for i, image in enumerate(images):
        if not isinstance(image.get("file_name"), str):
            raise DatasetError(f"{json_file}: images[{i}] has no 'file_name'")
    missing = [im["file_name"] for im in images if not (image_root / im["file_name"]).is_file()]
    if missing:
        raise DatasetError(
            f"{image_root / missing[0]}: image file not found ({len(missing)} of the "
            f"{len(images)} images of {json_file} are missing)"
        )


def register_coco(
    name: str, json_file: str | os.PathLike, image_root: str | os.PathLike, replace: bool = False
) -> None:
    """Register a COCO-format json + image folder as ``name`` (``evaluator_type`` ``"coco"``).

    The json is read now to check it (ids as ``feataug coco-eval`` checks them, and every
    image file present under ``image_root``) and to set ``thing_classes`` (categories sorted by
    id, as Detectron2's loader does), so ``DATASETS.AUTO_NUM_CLASSES`` works before training.
    ``replace``: drop an existing registration of ``name`` first.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    if not image_root.is_dir():
        raise DatasetError(f"{image_root}: image folder not found")
    try:
        data = json.loads(json_file.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{json_file}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{json_file}: expected a COCO object with images/annotations/categories"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_file}: missing or malformed {key!r} list")
    if not data["categories"]:
        raise DatasetError(f"{json_file}: no categories")
    try:  # the checks of `feataug coco-eval`: integer ids, none repeated
        check_gt(data, name=str(json_file))
    except COCOEvalError as e:
        raise DatasetError(str(e)) from None
    _check_image_files(data["images"], json_file, image_root)
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        classes = [c["name"] for c in cats]
    except (KeyError, TypeError):
        raise DatasetError(f"{json_file}: every category needs an 'id' and a 'name'") from None
    if replace:
        _unregister(name)
    elif name in DatasetCatalog.list():
        raise DatasetError(f"dataset {name!r} is already registered")
    register_coco_instances(name, {}, str(json_file), str(image_root))
    MetadataCatalog.get(name).set(
        thing_classes=classes,
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
    )
