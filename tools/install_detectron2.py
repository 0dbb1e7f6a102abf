#!/usr/bin/env python
"""Install Detectron2 into the running interpreter's environment.

Detectron2 is not published on PyPI. The route, first that applies wins:

1. ``import detectron2`` already works: nothing to do.
2. ``DETECTRON2_SOURCE`` is set (a git URL or a local checkout): build it with
   ``pip install --no-build-isolation`` — the official build, with compiled C++/CUDA ops.
3. Otherwise: download the PyPI wheel ``sal-detectron2==0.7.2`` (upstream Detectron2's Python code,
   built for CPython 3.10), check its sha256, repack it as a pure-Python wheel without its
   CPython-3.10 extension ``detectron2/_C*.so`` and without its stray top-level ``tools`` package,
   and install that with ``--no-deps`` (FeatAug's own requirements carry Detectron2's runtime
   dependencies).

Only the standard library is used, so this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "sal-detectron2"
WHEEL_VERSION = "0.7.2"
WHEEL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
DIST_INFO = f"sal_detectron2-{WHEEL_VERSION}.dist-info"
# Requirements in the wheel's metadata that Detectron2 does not need at run time.
DROPPED_REQUIREMENTS = ("numpy", "black", "dataclasses")


class InstallError(RuntimeError):
    """A problem the user must fix; printed as one line."""


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise InstallError(
            f"{path}: sha256 mismatch (expected {expected}, got {actual}); refusing to install it"
        )


def detectron2_importable(python: str) -> str | None:
    """Version string if ``python`` can import detectron2, else None."""
    r = subprocess.run(
        [python, "-c", "import detectron2, sys; sys.stdout.write(detectron2.__version__)"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def pip(python: str, *args: str, quiet: bool = False) -> None:
    """Run ``python -m pip ARGS``: the command logged and its output shown, or with ``quiet`` its
    output kept back and only the last line of its stderr in the error."""
    cmd = [python, "-m", "pip", *args]
    if not quiet:
        log(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=quiet, text=True)
    if r.returncode != 0:
        tail = (r.stderr or "").strip().splitlines()[-1:]
        raise InstallError(f"pip {args[0]} failed (exit {r.returncode})"
                           + (f": {tail[0]}" if tail else f": {' '.join(cmd)}"))


def default_cache() -> Path:
    """``$FEATAUG_CACHE``, else ``~/.cache/feataug`` (as ``feataug.data.fetch.cache_dir``)."""
    return Path(os.environ.get("FEATAUG_CACHE") or Path.home() / ".cache" / "feataug")


def download_wheel(python: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("sal_detectron2-0.7.2-cp310-*.whl"))
    if not found:
        pip(python, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.10", "--implementation", "cp", "-d", str(cache), f"{WHEEL_NAME}=={WHEEL_VERSION}")
        found = sorted(cache.glob("sal_detectron2-0.7.2-cp310-*.whl"))
    if not found:
        raise InstallError(f"{cache}: pip download of {WHEEL_NAME}=={WHEEL_VERSION} left no wheel")
    return found[0]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _keep(name: str) -> bool:
    if name.startswith("tools/"):
        return False
    if name.startswith("detectron2/_C") and name.endswith(".so"):
        return False
    return not name.endswith(".dist-info/RECORD")


def _patch_metadata(name: str, data: bytes) -> bytes:
    if name == f"{DIST_INFO}/WHEEL":
        lines = [ln for ln in data.decode().splitlines() if not ln.startswith(("Tag:", "Root-Is-Purelib:"))]
        lines += ["Root-Is-Purelib: true", "Tag: py3-none-any"]
        return ("\n".join(lines) + "\n").encode()
    if name == f"{DIST_INFO}/top_level.txt":
        return b"detectron2\n"
    if name == f"{DIST_INFO}/METADATA":
        out = []
        for ln in data.decode().splitlines():
            if ln.startswith("Requires-Dist:"):
                req = ln.split(":", 1)[1].strip()
                if req.split(";")[0].strip().startswith(DROPPED_REQUIREMENTS):
                    continue
            out.append(ln)
        return ("\n".join(out) + "\n").encode()
    return data


def repack_pure_python(src: Path, out_dir: Path) -> Path:
    """Rewrite the cp310 wheel as ``py3-none-any`` without ``_C*.so`` and ``tools/``."""
    dst = out_dir / f"sal_detectron2-{WHEEL_VERSION}-py3-none-any.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.is_dir() or not _keep(info.filename):
                continue
            data = _patch_metadata(info.filename, zin.read(info))
            zout.writestr(info.filename, data)
            writer.writerow([info.filename, _record_hash(data), len(data)])
        record_name = f"{DIST_INFO}/RECORD"
        writer.writerow([record_name, "", ""])
        zout.writestr(record_name, record.getvalue())
    return dst


def install_from_wheel(python: str, wheel: Path, expected_sha256: str = WHEEL_SHA256) -> None:
    """Verify, repack and install; nothing is installed unless the checksum matches."""
    if not wheel.is_file():
        raise InstallError(f"{wheel}: no such wheel file")
    verify_sha256(wheel, expected_sha256)
    with tempfile.TemporaryDirectory(prefix="feataug-d2-") as tmp:
        pure = repack_pure_python(wheel, Path(tmp))
        pip(python, "install", "-q", "--no-deps", "--force-reinstall", str(pure))


def install(python: str, *, force: bool, wheel: Path | None, cache: Path) -> None:
    if not force:
        version = detectron2_importable(python)
        if version:
            log(f"detectron2 {version} already importable; nothing to do")
            return
    source = os.environ.get("DETECTRON2_SOURCE")
    if source and wheel is None:
        log(f"building detectron2 from DETECTRON2_SOURCE={source} (official build, compiled ops)")
        pip(python, "install", "--no-build-isolation", source)
    else:
        wheel = wheel or download_wheel(python, cache)
        log(f"installing pure-Python detectron2 from {wheel.name} (no compiled ops)")
        install_from_wheel(python, wheel)
    version = detectron2_importable(python)
    if not version:
        raise InstallError("detectron2 was installed but does not import; run `feataug env`")
    log(f"detectron2 {version} installed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="install even if detectron2 imports")
    p.add_argument("--wheel", type=Path, help=f"use this local {WHEEL_NAME} wheel (sha256-checked)")
    p.add_argument("--python", default=sys.executable, help="interpreter to install into")
    p.add_argument("--cache", type=Path, default=default_cache() / "wheels")
    args = p.parse_args(argv)
    try:
        install(args.python, force=args.force, wheel=args.wheel, cache=args.cache)
    except InstallError as e:
        print(f"install_detectron2: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
