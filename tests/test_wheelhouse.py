"""tools/wheelhouse.py: the wheels for a machine without internet (pip itself is stubbed here;
the real run is in the README's offline section)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import tree_hashes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import wheelhouse  # noqa: E402


def test_requirements_are_setup_cfgs_without_comments():
    reqs = wheelhouse.read_requirements(ROOT / "setup.cfg")
    assert "torch>=2.1" in reqs and "iopath<0.1.10" in reqs and "setuptools<81" in reqs
    assert not any(r.startswith("#") or "#" in r for r in reqs)
    assert "pytest>=8" not in reqs
    assert "pytest>=8" in wheelhouse.read_requirements(ROOT / "setup.cfg", ("test",))
    with pytest.raises(wheelhouse.WheelhouseError, match="setup.cfg: no extra 'nope'"):
        wheelhouse.read_requirements(ROOT / "setup.cfg", ("nope",))


def test_have_file_reads_freeze_output_and_bare_names(tmp_path):
    f = tmp_path / "have.txt"
    f.write_text("PyYAML==6.0.2\n# a comment\n\nopencv_python.headless\ntorch==2.11.0+cu130\n")
    assert wheelhouse.read_have(f) == {"pyyaml", "opencv-python-headless", "torch"}
    f.write_text("numpy\nfoo @ file:///x.whl\n")
    with pytest.raises(wheelhouse.WheelhouseError, match=r"have.txt:2: expected NAME"):
        wheelhouse.read_have(f)
    with pytest.raises(wheelhouse.WheelhouseError, match="no such file"):
        wheelhouse.read_have(tmp_path / "missing.txt")


def test_what_the_target_has_stays_out_unless_capped():
    reqs = ["numpy", "iopath<0.1.10", "omegaconf>=2.1,<2.4", "yacs>=0.1.8", "setuptools<81",
            "pins==1.0", "tilde~=1.2", "marker>=1; python_version<'3.12'"]
    caps = wheelhouse.capped(reqs)
    assert caps == {"iopath", "omegaconf", "setuptools", "pins", "tilde"}
    have = {"numpy", "setuptools", "yacs"}
    assert wheelhouse.left_out("NumPy", have, caps)  # the target's copy is used
    assert wheelhouse.left_out("yacs", have, caps)
    assert not wheelhouse.left_out("setuptools", have, caps)  # theirs may be above the cap
    assert not wheelhouse.left_out("fvcore", have, caps)  # they lack it
    assert wheelhouse.left_out("torch", set(), caps)
    assert wheelhouse.left_out("torchvision", set(), caps)


def test_platform_tags_cover_every_older_glibc():
    tags = wheelhouse.platform_tags("x86_64", "2.28")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and len(tags) == 12 + 3
    with pytest.raises(wheelhouse.WheelhouseError, match="--glibc 2.5"):
        wheelhouse.platform_tags("x86_64", "2.5")


def _item(name, version, url):
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": url}}


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """``pack`` with pip, the resolver and the Detectron2 download stubbed: returns the calls."""
    calls = []
    local = [_item("fvcore", "0.1.5", "https://x/fvcore-0.1.5.tar.gz"),
             _item("numpy", "2.5.0", "https://x/numpy-2.5.0-cp311-cp311-manylinux_2_17_x86_64.whl"),
             _item("yacs", "0.1.8", "https://x/yacs-0.1.8-py3-none-any.whl")]
    target = [_item("fvcore", "0.1.5", "file:///built/FVCORE-0.1.5-py3-none-any.whl"),
              _item("numpy", "2.5.0", "https://x/numpy-2.5.0-cp312-cp312-manylinux_2_17_x86_64.whl"),
              _item("yacs", "0.1.8", "https://x/yacs-0.1.8-py3-none-any.whl"),
              _item("setuptools", "80.1", "https://x/setuptools-80.1-py3-none-any.whl"),
              _item("sal-detectron2", "0.7.2", "file:///o/sal_detectron2-0.7.2-py3-none-any.whl")]
    monkeypatch.setattr(wheelhouse, "resolve", lambda reqs, links, t: target if t else local)

    def pip(*args):
        calls.append(args)
        if args[0] == "wheel":
            name, version = args[-1].split("==")
            wheel = f"{name.upper()}-{version}-{built_tag[0]}.whl"  # a build may keep the case
            (Path(args[args.index("--wheel-dir") + 1]) / wheel).touch()

    built_tag = ["py3-none-any"]
    monkeypatch.setattr(wheelhouse, "_pip", pip)
    monkeypatch.setattr(wheelhouse.d2, "download_wheel", lambda py, cache: tmp_path / "d2.whl")
    monkeypatch.setattr(wheelhouse.d2, "verify_sha256", lambda path, sha: None)
    monkeypatch.setattr(wheelhouse.d2, "repack_pure_python", lambda src, out: (
        out / "sal_detectron2-0.7.2-py3-none-any.whl").touch())
    return calls, built_tag


def test_pack_builds_sources_downloads_the_rest_and_writes_requirements(tmp_path, stubbed):
    calls, _ = stubbed
    out = tmp_path / "wh"
    summary = wheelhouse.pack(out, "3.12", "x86_64", "2.28",
                              {"numpy", "setuptools"}, log=lambda _: None)
    builds = [c[-1] for c in calls if c[0] == "wheel"]
    downloads = [c[-1] for c in calls if c[0] == "download"]
    assert builds == ["fvcore==0.1.5"]  # source only; yacs has a wheel, numpy is theirs
    assert downloads == ["yacs==0.1.8", "setuptools==80.1"]  # fvcore and Detectron2 are here
    download = next(c for c in calls if c[0] == "download")
    assert download[download.index("--python-version") + 1] == "3.12"
    assert "manylinux_2_28_x86_64" in download and "--only-binary=:all:" in download
    assert summary["left_out"] == ["numpy==2.5.0"]
    assert "setuptools==80.1" in summary["packed"]
    lines = (out / "requirements.txt").read_text().splitlines()
    reqs = [ln for ln in lines if not ln.startswith("#")]
    assert reqs == wheelhouse.read_requirements(ROOT / "setup.cfg") + ["sal-detectron2==0.7.2"]


def test_pack_refuses_a_source_package_that_is_not_pure_python(tmp_path, stubbed):
    _, built_tag = stubbed
    built_tag[0] = "cp311-cp311-linux_x86_64"
    with pytest.raises(wheelhouse.WheelhouseError, match="fvcore==0.1.5 .*pure-Python"):
        wheelhouse.pack(tmp_path / "wh", "3.12", "x86_64", "2.28", set(), log=lambda _: None)


def test_main_reports_one_line(tmp_path, capsys):
    before = tree_hashes(tmp_path)
    rc = wheelhouse.main(["--have", str(tmp_path / "none.txt"), "--out", str(tmp_path / "wh")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "none.txt: no such file" in err[0]
    assert err[0].startswith("wheelhouse: error: ")
    assert tree_hashes(tmp_path) == before  # no "wh" folder, nothing else either
