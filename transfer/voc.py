"""Reading PASCAL VOC annotation XML, as real exports write it.

Float box coordinates, an empty or missing ``<difficult/>``, a missing or zero ``<size>`` and
class names with spaces or slashes are accepted; anything else wrong is one ``DatasetError`` line
naming the file and the object. No Detectron2 needed: dataset preparation uses it too.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from pretrain.errors import DataError


class DatasetError(DataError):
    """A dataset that cannot be registered or read; the message names the file."""


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = None if node is None else node.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip() or None


def _number(node: ET.Element | None, tag: str, file: str, what: str) -> float:
    s = _text(node, tag)
    if s is None:
        raise DatasetError(f"{file}: {what} has no <{tag}>")
    try:
        value = float(s)
    except ValueError:
        raise DatasetError(f"{file}: {what} <{tag}> is not a number: {s!r}") from None
    if not math.isfinite(value):  # "nan", "inf": float() takes them
        raise DatasetError(f"{file}: {what} <{tag}> is not a finite number: {s!r}")
    return value


def parse_voc_xml(data: bytes, file: str) -> tuple[tuple[int, int] | None, tuple[tuple, ...]]:
    """``((width, height) or None, ((name, (x1, y1, x2, y2), difficult), ...))`` of the XML
    ``data``, coordinates in VOC units as written; ``file`` names it in errors."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DatasetError(f"{file}: invalid XML ({e})") from None
    size = root.find("size")
    wh = None
    if _text(size, "width") and _text(size, "height"):
        wh = (
            round(_number(size, "width", file, "<size>")),
            round(_number(size, "height", file, "<size>")),
        )
        if wh[0] <= 0 or wh[1] <= 0:
            wh = None  # some exporters write 0; read the image instead
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        if name is None:
            raise DatasetError(f"{file}: object {k} has no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{file}: object {k} ({name}) has no <bndbox>")
        what = f"object {k} ({name}) <bndbox>"
        x1, y1, x2, y2 = (_number(box, t, file, what) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise DatasetError(f"{file}: object {k} ({name}) has xmax < xmin or ymax < ymin")
        difficult = _text(obj, "difficult")
        try:
            difficult = int(float(difficult)) if difficult is not None else 0
        except (ValueError, OverflowError):  # OverflowError: "inf"
            raise DatasetError(
                f"{file}: object {k} ({name}) <difficult> is {difficult!r}"
            ) from None
        objects.append((name, (x1, y1, x2, y2), bool(difficult)))
    return wh, tuple(objects)
