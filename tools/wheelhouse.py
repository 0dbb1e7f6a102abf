#!/usr/bin/env python
"""Pack the wheels a machine without internet needs to run FeatAug (a GPU node, say).

Run here, online; copy the folder and the checkout over; install there, offline::

    python tools/wheelhouse.py --python-version 3.12 --have node-freeze.txt --out wheelhouse
    python3 -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
    python3 -m feataug env

What is packed: every run-time requirement of ``setup.cfg`` (``--extras test`` adds the test
tools) and Detectron2, repacked as ``tools/install_detectron2.py`` installs it, with everything
they need, for the target's Python, platform and glibc, binary wheels only. The target's own
torch and torchvision are used (its CUDA builds), so they are never packed; ``requirements.txt``
still names them, so pip checks the ones installed there. A package the target already has
(``--have``: the output of ``pip list --format=freeze`` there, or bare names) is left out, unless
a requirement of ``setup.cfg`` caps its version (``<``, ``<=``, ``==``, ``~=``), which the target's
copy may exceed. A requirement published only as source (fvcore, antlr4-python3-runtime) is built
here into a wheel, and refused unless that wheel is pure Python.

How: pip's own resolver, ``pip install --dry-run --ignore-installed --report``, first for this
interpreter (to find what is published only as source), then for the target. Standard library
only; pip does the rest.
"""

from __future__ import annotations

import argparse
import configparser
import json
import platform
import re
import sys
import tempfile
from pathlib import Path

import install_detectron2 as d2

ROOT = Path(__file__).resolve().parents[1]
NEVER_PACKED = ("torch", "torchvision")  # the target's own builds
_CAP = re.compile(r"(<|<=|==|~=)")  # a version specifier with an upper bound


class WheelhouseError(RuntimeError):
    """A problem the user must fix; printed as one line."""


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    """``"iopath<0.1.10"`` -> ``"iopath"``."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise WheelhouseError(f"setup.cfg: cannot read the requirement {req!r}")
    return canonical(m.group(1))


def read_requirements(setup_cfg: Path, extras: tuple[str, ...] = ()) -> list[str]:
    """``install_requires`` of ``setup_cfg`` plus the named extras, comments dropped."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    if not cfg.has_option("options", "install_requires"):
        raise WheelhouseError(f"{setup_cfg}: no install_requires in [options]")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in extras:
        if not cfg.has_option("options.extras_require", extra):
            raise WheelhouseError(f"{setup_cfg}: no extra {extra!r} in [options.extras_require]")
        lines += cfg["options.extras_require"][extra].splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def read_have(path: Path) -> set[str]:
    """The names of what the target has: ``name==version`` lines (``pip list --format=freeze``;
    the version is not compared) or bare names; blank lines and ``#`` comments are skipped."""
    if not path.is_file():
        raise WheelhouseError(f"{path}: no such file (--have)")
    have = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = line.partition("==")[0].strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or " @ " in line:
            raise WheelhouseError(f"{path}:{n}: expected NAME or NAME==VERSION, got {line!r}")
        have.add(canonical(name))
    return have


def capped(requirements: list[str]) -> set[str]:
    """Names whose requirement bounds the version from above."""
    return {requirement_name(r) for r in requirements if _CAP.search(r.split(";")[0])}


def left_out(name: str, have: set[str], caps: set[str]) -> bool:
    """Whether a resolved package stays out of the wheelhouse."""
    name = canonical(name)
    return name in NEVER_PACKED or (name in have and name not in caps)


def platform_tags(arch: str, glibc: str) -> list[str]:
    """Every manylinux tag a Linux ``arch`` machine with glibc ``glibc`` (``"2.35"``) accepts."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise WheelhouseError(f"--glibc {glibc}: expected 2.17 or newer")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def _pip(*args: str) -> None:
    """pip for this interpreter, quiet (``install_detectron2.pip``)."""
    d2.pip(sys.executable, *args, quiet=True)


def resolve(requirements: list[str], find_links: Path, target: list[str] | None) -> list[dict]:
    """pip's resolution of ``requirements`` (its ``--report`` install items): for this
    interpreter when ``target`` is None, else for the target options (binary wheels only)."""
    with tempfile.TemporaryDirectory(prefix="feataug-wheelhouse-") as tmp:
        report = Path(tmp) / "report.json"
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                "--find-links", str(find_links)]
        if target is not None:
            args += ["--only-binary=:all:", "--target", str(Path(tmp) / "t"), *target]
        _pip(*args, *requirements)
        return json.loads(report.read_text())["install"]


def _version(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    return meta["name"], meta["version"]


def is_sdist(item: dict) -> bool:
    url = item["download_info"]["url"]
    return not url.split("#")[0].endswith(".whl")


def pack(out: Path, python_version: str, arch: str, glibc: str, have: set[str],
         extras: tuple[str, ...] = (), log=print) -> dict:
    """Fill ``out`` (created if needed); returns a summary (packed, left out, requirements)."""
    out.mkdir(parents=True, exist_ok=True)
    requirements = read_requirements(ROOT / "setup.cfg", extras)
    resolvable = [r for r in requirements if requirement_name(r) not in NEVER_PACKED]
    caps = capped(requirements)

    log("detectron2: the sha256-pinned wheel, repacked as pure Python")
    source = d2.download_wheel(sys.executable, d2.default_cache() / "wheels")
    d2.verify_sha256(source, d2.WHEEL_SHA256)
    d2.repack_pure_python(source, out)
    d2_req = f"{d2.WHEEL_NAME}=={d2.WHEEL_VERSION}"
    resolvable.append(d2_req)

    log("resolving for this interpreter, to find what is published only as source")
    for item in resolve(resolvable, out, None):
        name, version = _version(item)
        if is_sdist(item) and not left_out(name, have, caps):
            log(f"building {name}=={version} (published as source only)")
            _pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), f"{name}=={version}")
            built = [p for p in out.glob("*.whl") if p.name.split("-")[1] == version
                     and canonical(p.name.split("-")[0]) == canonical(name)]
            if not built or not all(p.name.endswith("-none-any.whl") for p in built):
                raise WheelhouseError(f"{name}=={version} is published as source only and does "
                                      "not build to a pure-Python wheel; install it on the target")

    target = ["--python-version", python_version, "--implementation", "cp",
              *(a for tag in platform_tags(arch, glibc) for a in ("--platform", tag))]
    log(f"resolving for Python {python_version}, {arch}, glibc {glibc}")
    packed, skipped = [], []
    for item in resolve(resolvable, out, target):
        name, version = _version(item)
        if left_out(name, have, caps):
            skipped.append(f"{name}=={version}")
            continue
        packed.append(f"{name}=={version}")
        if (out / item["download_info"]["url"].split("#")[0].rsplit("/", 1)[-1]).is_file():
            continue  # built or repacked here, or packed before
        _pip("download", "--no-deps", "--quiet", "--dest", str(out), *target,
             "--only-binary=:all:", f"{name}=={version}")
    kept = [*requirements, d2_req]
    (out / "requirements.txt").write_text(
        "# FeatAug's run-time requirements; install offline with\n"
        "#   python3 -m pip install --no-index --find-links DIR -r DIR/requirements.txt\n"
        + "".join(f"{r}\n" for r in kept))
    wheels = sorted(out.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels)
    log(f"{out}: {len(wheels)} wheels, {size / 2**20:.1f} MiB; left out (the target has them, "
        f"or its own builds): {', '.join(sorted(skipped)) or 'none'}")
    return {"packed": sorted(packed), "left_out": sorted(skipped), "requirements": kept,
            "wheels": [p.name for p in wheels], "bytes": size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    p.add_argument("--out", type=Path, default=ROOT / "wheelhouse", help="the folder to fill")
    p.add_argument("--python-version", default=here, help=f"the target's Python (default {here})")
    p.add_argument("--arch", default=platform.machine(), help="the target's machine (x86_64...)")
    libc = platform.libc_ver()[1] or "2.17"
    p.add_argument("--glibc", default=libc, help=f"the target's glibc (default {libc})")
    p.add_argument("--have", type=Path, help="what the target has: `pip list --format=freeze` "
                   "output there, or one name per line")
    p.add_argument("--extras", nargs="*", default=[], help="setup.cfg extras to add (test...)")
    args = p.parse_args(argv)
    try:
        have = read_have(args.have) if args.have else set()
        pack(args.out, args.python_version, args.arch, args.glibc, have, tuple(args.extras))
    except (WheelhouseError, d2.InstallError) as e:
        print(f"wheelhouse: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
