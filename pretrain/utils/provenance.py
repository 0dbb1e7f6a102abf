"""What produced an output folder: ``provenance.json`` and the head of ``log.txt``, for
pretraining runs (:func:`collect_pretrain`) and, through ``transfer.provenance``, detection runs.

:func:`collect` records the command line (``sys.argv``), the working folder, the UTC start time,
the versions of the packages the numbers depend on, this project's git commit (and whether the
work tree had uncommitted changes) when it runs from a git checkout (None when installed), the
process count and the Python version; a caller adds its own fields (pretraining: the data, with
:func:`data_fingerprint`; detection: the weights and the environment). The final config is
``config.yaml`` beside it. Every value is plain data (str, int, float, bool, None, lists and
dicts of them), so a checkpoint can carry the record and still load with
``torch.load(weights_only=True)``. Nothing here fails a run: a value that cannot be found is None.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from .io import atomic_write_text, walk_files

__all__ = ["PACKAGES", "PRETRAIN_PACKAGES", "collect", "collect_pretrain", "data_fingerprint",
           "file_sha256", "git_state", "header", "package_version", "write"]

# module -> distribution names that may provide it (the first names it in ``versions``)
PACKAGES = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "detectron2": ("detectron2",),
    "faster_coco_eval": ("faster-coco-eval",),
    "numpy": ("numpy",),
}
PRETRAIN_PACKAGES = ("torch", "torchvision", "numpy")
# The data paths of a pretraining config that :func:`collect_pretrain` fingerprints, when set.
DATA_KEYS = ("ROOT", "KNN_TRAIN_ROOT", "KNN_VAL_ROOT")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_version(module: str, must_import: bool = False) -> str | None:
    """The version of the package that provides ``module``: its ``__version__``, else the
    installed distribution's (``PACKAGES``, else the module's own name); "unknown" when it imports
    but names no version; None when it neither imports nor is installed, or (``must_import``)
    when it does not import. The one version lookup
    (provenance, ``feataug env``, the benchmarks' machine record)."""
    imported = True
    try:
        found = getattr(importlib.import_module(module), "__version__", None)
    except Exception:  # a package that fails to import has no version to record
        if must_import:
            return None
        found, imported = None, False
    if found:
        return str(found)
    for dist in PACKAGES.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown" if imported else None  # importable, but it names no version


def _installed(dist: str) -> str | None:
    """The installed distribution's version, without importing it (pretrain imports nothing of
    the application)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state() -> dict:
    """``{"commit", "dirty"}`` of the git checkout these packages run from; both None when they
    run from an installed copy (a ``site-packages`` inside some other repository included)."""
    folder = Path(__file__).resolve().parents[2]  # the folder holding pretrain/
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != folder:
        return {"commit": None, "dirty": None}
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def data_fingerprint(path: str | os.PathLike) -> dict:
    """What a data path held, from names alone: ``files`` (how many) and ``names_sha256`` (the
    sha256 of their sorted names, one a line). A folder counts every file under it (links
    followed, as ``pretrain.data`` reads it), named relative to it; a single file (an IDX
    ``.gz``, a list file) counts as 1, named by its file name and size. No file is opened, so it
    costs a folder listing even on ImageNet; in a folder, a file added, removed or renamed
    changes the fingerprint, a file rewritten under the same name does not (names only). Both
    are None when ``path`` does not exist."""
    p = Path(path)
    record = {"path": str(path), "resolved": os.path.realpath(p), "files": None,
              "names_sha256": None}
    if p.is_file():
        names = [f"{p.name}\t{p.stat().st_size}"]
    elif p.is_dir():
        files, _ = walk_files(p)
        names = sorted(Path(f).relative_to(p).as_posix() for f in files)
    else:
        return record
    text = "".join(f"{name}\n" for name in names)
    record["files"] = len(names)
    record["names_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    return record


def collect(argv: Sequence[str] | None = None, world_size: int = 1,
            packages: Sequence[str] = tuple(PACKAGES), **fields) -> dict:
    """The provenance record of a run started by ``argv`` (default ``sys.argv``) in
    ``world_size`` processes, with the versions of ``packages`` (module names); ``fields`` go
    in after the start time (``weights``, ``data``)."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "command": argv,
        "command_line": shlex.join(argv),
        "cwd": os.getcwd(),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "versions": {"feataug": _installed("feataug"),
                     **{PACKAGES.get(m, (m,))[0]: package_version(m) for m in packages}},
        "git": git_state(),
        "world_size": world_size,
        "config": "config.yaml",
        "python": sys.version.split()[0],
    }


def collect_pretrain(cfg, argv: Sequence[str] | None = None, world_size: int = 1,
                     start_iter: int = 0) -> dict:
    """The record of a pretraining run of ``cfg``: :func:`collect`'s fields, ``data`` (the
    :func:`data_fingerprint` of each of ``DATA.ROOT``, ``DATA.KNN_TRAIN_ROOT``,
    ``DATA.KNN_VAL_ROOT`` that is set, keyed by its config name, with the format) and
    ``start_iter`` (0, or the iteration a resumed run continues from)."""
    data = {}
    for key in DATA_KEYS:
        if cfg.DATA[key]:
            fmt = cfg.DATA.FORMAT if key == "ROOT" else cfg.DATA.KNN_FORMAT or cfg.DATA.FORMAT
            data[f"DATA.{key}"] = {**data_fingerprint(cfg.DATA[key]), "format": fmt}
    return {**collect(argv, world_size, PRETRAIN_PACKAGES, data=data),
            "start_iter": int(start_iter)}


def header(record: dict) -> str:
    """``log.txt``'s first lines for ``record``: one line per field (the weights and the data
    when the record has them), then the environment when it has one."""
    git = record["git"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    dirty = " (uncommitted changes)" if git["dirty"] else ""
    lines = [
        f"provenance: {record['command_line']}",
        f"  started {record['started_utc']} in {record['cwd']}, {record['world_size']} process(es)",
    ]
    if "weights" in record:
        weights = record["weights"]
        lines.append(f"  weights {weights['path'] or '(none: random initialization)'}"
                     + (f" sha256 {weights['sha256']}" if weights["sha256"] else ""))
    for key, d in record.get("data", {}).items():
        held = "not found" if d["files"] is None else \
            f"{d['files']} file(s), names sha256 {d['names_sha256']}"
        lines.append(f"  {key} {d['path']}: {held}")
    if record.get("start_iter"):
        lines.append(f"  resumed at iteration {record['start_iter']}")
    lines += [
        f"  versions: {versions}; python {record['python']}",
        f"  git commit {git['commit'] or 'unknown'}{dirty}",
        "  config: config.yaml; this record: provenance.json",
    ]
    env = record.get("env")
    return "\n".join(lines) + "\n" + (f"{env}\n" if env else "")


def write(output_dir: str | os.PathLike, record: dict, log: bool = True) -> None:
    """``output_dir/provenance.json`` (atomic) and, with ``log``, :func:`header` appended to
    ``log.txt`` (before the run's logging opens it, so it heads the run's lines)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "provenance.json", json.dumps(record, indent=2) + "\n")
    if log:
        with open(out / "log.txt", "a") as f:
            f.write(header(record))
