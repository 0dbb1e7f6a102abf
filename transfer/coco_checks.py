"""Checks of COCO ground truth that both readers share: ``feataug coco-eval``
(:mod:`transfer.coco_eval`) and ``feataug detect --register-coco`` (:mod:`transfer.datasets`).

The COCO API indexes images, categories and annotations by id, so a repeated id silently drops
or renames an entry (an annotation lost from the index lowers AP; a category takes another's
name) and Detectron2's loader stops with an ``AssertionError``: each is refused with one line.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# section of the file -> what one entry is called
_SECTIONS = {"images": "image", "categories": "category", "annotations": "annotation"}


def _times(n: int) -> str:
    return "twice" if n == 2 else f"{n} times"


def check_unique_ids(gt: dict, name: str, error: type[Exception]) -> None:
    """Refuse a repeated id among ``gt``'s images, categories or annotations (entries without a
    usable id are left to the other checks): ``error("NAME: annotation id 7 appears twice")``."""
    for key, kind in _SECTIONS.items():
        ids: list[Any] = [e["id"] for e in gt.get(key) or () if isinstance(e, dict)
                          and isinstance(e.get("id"), int | str) and not isinstance(e["id"], bool)]
        counts = Counter(ids)
        repeated = next((i for i in ids if counts[i] > 1), None)
        if repeated is not None:
            raise error(f"{name}: {kind} id {repeated!r} appears {_times(counts[repeated])}")
