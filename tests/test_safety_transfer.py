"""Crafted bad input for `feataug convert` and `pretrain.utils.safe_load`: nothing from a file runs and
nothing on disk is lost.

Every refusal is checked for its exit status, its one line on stderr, and the sha256 of every
file in the folder before and after. Payloads are pickles whose ``__reduce__`` would create a
marker file; a control shows that plain unpickling of the very same file does create it.
"""

from __future__ import annotations

import argparse
import builtins
import os
import pathlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import refused, tree_hashes

from feataug import cli
from pretrain.utils import safe_load

pytestmark = pytest.mark.usefixtures("one_thread")
PAYLOADS = ("os.system", "builtins.exec", "pathlib.Path.touch")


class Payload:
    """Unpickling this runs code that creates ``marker`` (three ways to spell it)."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        if self.kind == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        if self.kind == "builtins.exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def save(obj, path: Path, kind: str) -> Path:
    """``kind``: zip (torch.save), legacy (torch.save, pre-1.6 format) or plain (pickle.dump)."""
    if kind == "plain":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip")
    return path


@pytest.fixture(scope="module")
def r18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def moco(state, **extra) -> dict:
    sd = {f"module.encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    return {"epoch": 1, "arch": "resnet18", "state_dict": sd, **extra}


def convert(tmp_path: Path, capsys, *args: str) -> tuple[int, list[str], str]:
    """Run `feataug convert` (expected to succeed); its exit status, stderr lines and stdout."""
    rc = cli.main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines(), captured.out


def convert_refused(tmp_path: Path, capsys, *args) -> str:
    """`feataug convert ARGS` refused (conftest.refused): nothing printed on stdout and nothing
    under ``tmp_path`` changed; returns the line."""
    return refused(capsys, ["convert", *args], keep=[tmp_path], out="")


# ----------------------------------------------------------------------------- code execution


@pytest.mark.parametrize("payload", PAYLOADS)
def test_control_the_payloads_run_under_plain_unpickling(payload, tmp_path):
    marker = tmp_path / "MARKER"
    path = save({"x": Payload(payload, marker)}, tmp_path / "p.pth", "zip")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_convert_keeps_payloads_inert(payload, kind, tmp_path, capsys, r18_state):
    """A checkpoint with a payload beside its trunk converts exactly, and the payload never runs:
    its callable becomes an inert placeholder, named in the report."""
    marker = tmp_path / "MARKER"
    clean = save(moco(r18_state), tmp_path / "clean.pth", kind)
    dirty = save(moco(r18_state, hook=Payload(payload, marker)), tmp_path / "dirty.pth", kind)
    digest = tree_hashes(dirty)
    assert convert(tmp_path, capsys, clean, tmp_path / "clean.pkl")[0] == 0
    rc, err, out = convert(tmp_path, capsys, dirty, tmp_path / "dirty.pkl")
    assert rc == 0 and err == [] and not marker.exists()
    name = {"os.system": "posix.system", "pathlib.Path.touch": "builtins.getattr"}.get(
        payload, payload
    )
    assert f"kept as inert placeholders (not imported, not called): {name}" in out
    assert tree_hashes(dirty) == digest
    with open(tmp_path / "clean.pkl", "rb") as a, open(tmp_path / "dirty.pkl", "rb") as b:
        want, got = pickle.load(a)["model"], pickle.load(b)["model"]
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_convert_refuses_a_payload_as_the_checkpoint(payload, kind, tmp_path, capsys):
    """The whole file is a payload (plain pickles included): one line, nothing runs."""
    marker = tmp_path / "MARKER"
    src = save(Payload(payload, marker), tmp_path / "in.pth", kind)
    line = convert_refused(tmp_path, capsys, src, tmp_path / "out.pkl")
    assert str(src) in line and not marker.exists()
    if kind != "plain":
        assert "not a checkpoint (the top level is a" in line
    else:  # not a torch file: read as a plain pickle, whose global is named and refused
        name = {"os.system": "posix.system"}.get(payload, payload)
        assert f"{src}: refused to load: its pickle names {name}," in line


def test_convert_reads_a_plain_pickle_safely(tmp_path, capsys, r18_state):
    """``pickle.dump`` instead of ``torch.save``: read by the restricted unpickler; without
    weights it is named for what it is, with a numpy state dict it converts exactly as the same
    weights saved by torch."""
    plain = tmp_path / "x.pth"
    plain.write_bytes(pickle.dumps({"a": 1, "epoch": 3}))
    line = convert_refused(tmp_path, capsys, plain, tmp_path / "x.pkl")
    assert line.endswith(f"{plain}: a plain pickle with no model weights (keys: a, epoch)")
    arrays = {k: v.numpy() for k, v in moco(r18_state)["state_dict"].items()}
    save({"state_dict": arrays}, tmp_path / "np.pth", "plain")
    save(moco(r18_state), tmp_path / "torch.pth", "zip")
    for name in ("np", "torch"):
        assert convert(tmp_path, capsys, tmp_path / f"{name}.pth", tmp_path / f"{name}.pkl")[0] == 0
    with open(tmp_path / "torch.pkl", "rb") as a, open(tmp_path / "np.pkl", "rb") as b:
        want, got = pickle.load(a)["model"], pickle.load(b)["model"]
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_load_torch_without_placeholders_names_the_refused_global(payload, kind, tmp_path):
    marker = tmp_path / "MARKER"
    src = save({"w": np.zeros(3), "hook": Payload(payload, marker)}, tmp_path / "w.pth", kind)
    with pytest.raises(safe_load.UnsafeFileError) as e:
        safe_load.load_torch(src)
    # protocol 2 (torch.save) reaches a method through getattr; protocol 4 names it
    first = {"os.system": "posix.system", "pathlib.Path.touch": "builtins.getattr"}.get(
        payload, payload
    )
    if kind == "plain" and payload == "pathlib.Path.touch":
        first = payload
    assert str(e.value).startswith(f"{src}: refused to load: its pickle names {first},")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_load_pickle_reads_detectron2_weights_and_refuses_the_rest(protocol, tmp_path):
    marker = tmp_path / "MARKER"
    weights = {"model": {"stem.conv1.weight": np.arange(6.0).reshape(2, 3)}, "__author__": "x"}
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({**weights, "n": np.float32(2)}, protocol=protocol))
    got = safe_load.load_pickle(good)
    np.testing.assert_array_equal(got["model"]["stem.conv1.weight"], np.arange(6.0).reshape(2, 3))
    assert got["n"] == np.float32(2)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({**weights, "x": Payload("os.system", marker)}, protocol))
    with pytest.raises(safe_load.UnsafeFileError, match=r"bad\.pkl: refused .* posix\.system"):
        safe_load.load_pickle(bad)
    tensors = tmp_path / "tensors.pkl"  # torch objects in a plain pickle: torch.load runs inside
    tensors.write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol))
    with pytest.raises(safe_load.UnsafeFileError, match=r"names torch\..*, which is not on"):
        safe_load.load_pickle(tensors)
    assert not marker.exists()


def test_real_checkpoint_extras_still_load(tmp_path):
    """Options (argparse.Namespace), numpy values and Lightning-style nested containers load as
    the real objects, without placeholders."""
    ckpt = {
        "opt": argparse.Namespace(arch="resnet50", lr=0.03),
        "best": np.float64(71.5),
        "rng": np.random.RandomState(0).get_state(),
        "hyper_parameters": {"cfg": {"optimizer": {"name": "lars"}}},
        "state_dict": {"w": torch.ones(2)},
    }
    notes: list[str] = []
    for kind in ("zip", "legacy"):
        got = safe_load.load_torch(save(ckpt, tmp_path / f"{kind}.pth", kind), notes=notes)
        assert got["opt"] == ckpt["opt"] and got["best"] == 71.5
        np.testing.assert_array_equal(got["rng"][1], ckpt["rng"][1])
        assert torch.equal(got["state_dict"]["w"], torch.ones(2))
    assert notes == []


def test_torchscript_archive_is_not_handed_to_the_jit(tmp_path, capsys):
    src = tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), src)
    line = convert_refused(tmp_path, capsys, src, tmp_path / "out.pkl")
    assert f"{src}: a TorchScript archive" in line


# ----------------------------------------------------------------------------- nothing lost


def _same_file_variants(tmp_path: Path, src: Path) -> dict[str, Path]:
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pkl").symlink_to(src)
    os.link(src, tmp_path / "hard.pkl")
    return {
        "same string": src,
        "other spelling": tmp_path / "sub" / ".." / src.name,
        "symlink": tmp_path / "link.pkl",
        "hard link": tmp_path / "hard.pkl",
    }


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("variant", ["same string", "other spelling", "symlink", "hard link"])
def test_convert_never_writes_over_its_input(variant, overwrite, tmp_path, capsys, r18_state):
    src = save(moco(r18_state), tmp_path / "in.pkl", "zip")  # a torch file named .pkl
    dst = _same_file_variants(tmp_path, src)[variant]
    line = convert_refused(tmp_path, capsys, src, dst, *(["--overwrite"] if overwrite else []))
    assert f"{dst}: the output is the input file {src}" in line


def test_convert_replaces_an_existing_output_only_with_overwrite(tmp_path, capsys, r18_state):
    src = save(moco(r18_state), tmp_path / "in.pth", "zip")
    dst = tmp_path / "out.pkl"
    dst.write_bytes(b"earlier weights")
    assert f"{dst}: exists; use --overwrite" in convert_refused(tmp_path, capsys, src, dst)
    before = tree_hashes(src)
    rc, err, _ = convert(tmp_path, capsys, src, dst, "--overwrite")
    assert rc == 0 and err == [] and tree_hashes(src) == before
    with open(dst, "rb") as f:
        assert len(pickle.load(f)["model"]) == 100  # ResNet-18 trunk: 62 conv/BN weights + stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth", "out.pkl"]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: (d / "out.pkl").mkdir() or d / "out.pkl", "out.pkl: is a folder"),
        (
            lambda d: (d / "blocker").write_text("x") and d / "blocker" / "out.pkl",
            "cannot write: ",
        ),
        (
            lambda d: (d / "blocker").write_text("x") and d / "blocker" / "deep" / "out.pkl",
            "is not a folder",
        ),
    ],
    ids=["output is a folder", "parent is a file", "ancestor is a file"],
)
def test_convert_unwritable_output(make, words, tmp_path, capsys, r18_state):
    src = save(moco(r18_state), tmp_path / "in.pth", "zip")
    dst = make(tmp_path)
    line = convert_refused(tmp_path, capsys, src, dst)
    assert str(dst) in line and words in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_convert_read_only_folder(tmp_path, capsys, r18_state):
    src = save(moco(r18_state), tmp_path / "in.pth", "zip")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "no write permission" in convert_refused(tmp_path, capsys, src, folder / "out.pkl")
    finally:
        folder.chmod(0o755)
