"""FeatAug: self-supervised pretraining with feature augmentation, proven on detection.

The application layer: the ``feataug`` command, the demo, the study runner, the benchmarks and
data preparation, over the ``pretrain`` and ``transfer`` libraries.

Config files (``detection/``, ``pretrain/``, ``study/``) ship inside the package as
``feataug/configs``: in a checkout a link to the repository's ``configs/``, in an installed
wheel its package data. :func:`configs_dir` finds them, ``$FEATAUG_CONFIGS`` first.
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"

CONFIGS_ENV = "FEATAUG_CONFIGS"


def configs_dir() -> Path:
    """FeatAug's config folder: ``$FEATAUG_CONFIGS`` when set, else the package's own copy."""
    env = os.environ.get(CONFIGS_ENV)
    if env:
        return Path(env).expanduser()
    return (Path(__file__).parent / "configs").resolve()


def find_config(path: str | os.PathLike) -> Path:
    """``path`` when it exists or is absolute; else the same relative path in
    :func:`configs_dir`, a leading ``configs/`` dropped (``configs/study/cpu.yaml`` works from
    any folder), when that exists; else ``path`` as given, for the caller's "not found"."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    packaged = configs_dir().joinpath(*parts)
    return packaged if parts and packaged.exists() else given
