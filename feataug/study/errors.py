"""The study's error class and its one-line check (their own module: the grid and the sbatch
checks both raise it)."""

from __future__ import annotations

from pretrain.errors import FeatAugError

__all__ = ["StudyError", "need"]


class StudyError(FeatAugError):
    """A grid or output folder that cannot be used; the message names the file and the problem."""


def need(cond: bool, where: str, msg: str) -> None:
    """StudyError ``WHERE: MSG`` unless ``cond``."""
    if not cond:
        raise StudyError(f"{where}: {msg}")
