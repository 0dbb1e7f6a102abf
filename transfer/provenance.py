"""What produced a detection output folder: ``provenance.json`` and the head of ``log.txt``.

:func:`collect` records the command line (``sys.argv``), the working folder, the UTC start time,
``MODEL.WEIGHTS`` with the sha256 of its bytes, the versions of the packages the numbers depend
on (torch, torchvision, detectron2, faster-coco-eval, numpy), this project's git commit (and
whether the work tree had uncommitted changes) when it runs from a git checkout, the process
count, and Detectron2's ``collect_env_info()`` table. The final config is ``config.yaml`` beside
it. Nothing here fails a run: a value that cannot be found is None.
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
from importlib import metadata
from pathlib import Path

from pretrain.utils.io import atomic_write_text

__all__ = ["collect", "file_sha256", "header", "package_version", "write"]

# module -> distribution names that may provide it
PACKAGES = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "detectron2": ("detectron2",),
    "faster_coco_eval": ("faster-coco-eval",),
    "numpy": ("numpy",),
}


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


def _git(*args: str) -> str | None:
    folder = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _weights(weights: str) -> dict:
    """``MODEL.WEIGHTS`` as given, the local file it resolves to and the sha256 of its bytes."""
    if not weights:
        return {"path": "", "file": None, "sha256": None}
    local = weights
    if "://" in weights:
        try:
            from detectron2.utils.file_io import PathManager

            local = PathManager.get_local_path(weights)
        except Exception:
            local = None
    if local is None or not Path(local).is_file():
        return {"path": weights, "file": local, "sha256": None}
    return {"path": weights, "file": str(Path(local).resolve()), "sha256": file_sha256(local)}


def _env_info() -> str | None:
    import logging

    probe = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime" on CPU machines
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        from detectron2.utils.collect_env import collect_env_info

        return collect_env_info()
    except Exception:  # a probe of the environment failed: record nothing rather than stop
        return None
    finally:
        probe.setLevel(level)


def collect(cfg, argv: list[str] | None = None, world_size: int = 1) -> dict:
    """The provenance record of a run of ``cfg`` started by ``argv`` (default ``sys.argv``)."""
    argv = list(sys.argv if argv is None else argv)
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "command": argv,
        "command_line": shlex.join(argv),
        "cwd": os.getcwd(),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights": _weights(cfg.MODEL.WEIGHTS),
        "versions": {dist[0]: package_version(module) for module, dist in PACKAGES.items()},
        "git": {"commit": commit, "dirty": None if status is None else bool(status)},
        "world_size": world_size,
        "config": "config.yaml",
        "python": sys.version.split()[0],
        "env": _env_info(),
    }


def header(record: dict) -> str:
    """``log.txt``'s first lines for ``record``: one line per field, then the environment."""
    weights, git = record["weights"], record["git"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    dirty = " (uncommitted changes)" if git["dirty"] else ""
    lines = [
        f"provenance: {record['command_line']}",
        f"  started {record['started_utc']} in {record['cwd']}, {record['world_size']} process(es)",
        f"  weights {weights['path'] or '(none: random initialization)'}"
        + (f" sha256 {weights['sha256']}" if weights["sha256"] else ""),
        f"  versions: {versions}; python {record['python']}",
        f"  git commit {git['commit'] or 'unknown'}{dirty}",
        "  config: config.yaml; this record: provenance.json",
    ]
    return "\n".join(lines) + "\n" + (record["env"] or "") + "\n"


def write(output_dir: str | os.PathLike, record: dict, log: bool = True) -> None:
    """``output_dir/provenance.json`` (atomic) and, with ``log``, :func:`header` appended to
    ``log.txt`` (before the run's logging opens it, so it heads the run's lines)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "provenance.json", json.dumps(record, indent=2) + "\n")
    if log:
        with open(out / "log.txt", "a") as f:
            f.write(header(record))
