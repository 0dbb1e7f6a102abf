"""Pretraining refuses what would lose or corrupt a run, and never executes a checkpoint.

Truth: every file of the output folder hashes the same before and after a refused command, the
error is one line naming the problem, and a marker file that a crafted pickle would create never
appears.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from test_engine import SMALL, TINY, _images, _pretrain

from feataug import cli

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_ITERS", "1"]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys, command: str = "pretrain") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"feataug {command}: error: ")
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-iteration run (data, output folder); tests copy the folder."""
    root = tmp_path_factory.mktemp("run")
    data = _images(root / "d", 8)
    assert _pretrain(data, root / "o", *RUN) == 0
    return data, root / "o"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.rglob("*"):
        if p.is_file():
            (dst / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / p.relative_to(src)).write_bytes(p.read_bytes())
    return dst


def test_a_fresh_run_never_replaces_another(finished_run, tmp_path, capsys):
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    before = _hashes(out)
    assert _pretrain(data, out, *RUN) == 2
    line = _one_error_line(capsys)
    assert f"OUTPUT_DIR {out} already holds a run (last.pth, metrics.jsonl)" in line
    assert "use --resume" in line
    assert _hashes(out) == before


@pytest.mark.parametrize("change", [["FA.OP", "noise"], ["MODEL.MOCO.T", "0.1"]])
def test_resume_refuses_another_config_and_touches_nothing(finished_run, tmp_path, capsys,
                                                           change):
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    before = _hashes(out)
    assert cli.main(["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", str(data),
                     "OUTPUT_DIR", str(out), *SMALL, *RUN, *change]) == 2
    line = _one_error_line(capsys)
    assert f"{out / 'last.pth'} was written with another config" in line
    assert f"{change[0]} " in line  # names the key that differs
    assert _hashes(out) == before  # config.yaml is not rewritten either


def test_resume_may_change_where_and_how_a_run_is_watched(finished_run, tmp_path):
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    assert cli.main(["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", str(data),
                     "OUTPUT_DIR", str(out), *SMALL, *RUN, "LOG_PERIOD", "5",
                     "DATALOADER.NUM_WORKERS", "1"]) == 0


def test_stale_temporaries_of_killed_writes_are_removed(finished_run, tmp_path):
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    stale = [out / ".last.pth.x1y2.tmp", out / ".checkpoint_0001.pth.ab.tmp",
             out / ".metrics.jsonl.q.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    other = out / ".notes.txt.k.tmp"  # not a file of the run: left alone
    other.write_text("mine")
    assert cli.main(["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", str(data),
                     "OUTPUT_DIR", str(out), *SMALL, *RUN]) == 0
    assert not any(p.exists() for p in stale)
    assert other.read_text() == "mine"


def test_output_dir_that_is_a_file(tmp_path, capsys):
    data = _images(tmp_path / "d", 8)
    out = tmp_path / "o"
    out.write_text("precious")
    assert _pretrain(data, out, *RUN) == 2
    assert f"OUTPUT_DIR {out}: exists and is not a folder" in _one_error_line(capsys)
    assert out.read_text() == "precious"


def test_queue_smaller_than_the_batch_is_a_config_error(tmp_path, capsys):
    data = _images(tmp_path / "d", 8)
    assert _pretrain(data, tmp_path / "o", *RUN, "MODEL.MOCO.K", "2") == 2
    line = _one_error_line(capsys)
    assert "MODEL.MOCO.K 2 is smaller than the global batch SOLVER.BATCH_SIZE 4" in line
    assert not (tmp_path / "o").exists()


def test_a_bad_override_is_blamed_on_the_override(tmp_path, capsys):
    assert cli.main(["pretrain", "--config-file", TINY, "OUTPUT_DIR", str(tmp_path / "o"),
                     "SOLVER.MAX_ITER", "many"]) == 2
    line = _one_error_line(capsys)
    assert "command-line override SOLVER.MAX_ITER many" in line
    assert "tiny_moco_fa_r18.yaml" not in line


class _Marker:
    """Unpickling this would create ``path`` (if anything ever executed it)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("command", ["resume", "lincls"])
def test_crafted_checkpoints_are_refused_not_executed(finished_run, tmp_path, capsys, command,
                                                      legacy):
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    marker = tmp_path / "MARKER"
    ckpt = torch.load(out / "last.pth", weights_only=True)
    ckpt["extra"] = _Marker(marker)
    torch.save(ckpt, out / "last.pth", _use_new_zipfile_serialization=not legacy)
    before = _hashes(out)
    if command == "resume":
        rc = cli.main(["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", str(data),
                       "OUTPUT_DIR", str(out), *SMALL, *RUN])
        name = "pretrain"
    else:
        rc = cli.main(["lincls", "--checkpoint", str(out / "last.pth"), "LINCLS.EPOCHS", "1"])
        name = "lincls"
    assert rc == 2
    line = _one_error_line(capsys, name)
    assert f"{out / 'last.pth'}: refused to load: its pickle names posix.system" in line
    assert not marker.exists()
    assert _hashes(out) == before


@pytest.mark.parametrize("key, value, words", [
    ("version", "2", "version is a str, not int"),
    ("arch", 0, "arch is a int, not dict"),
    ("backbone", 0, "backbone is a int, not dict"),
    ("backbone", {"conv1.weight": [0.0]}, "backbone['conv1.weight'] is a list, not a tensor"),
])  # fmt: skip
def test_a_checkpoint_with_fields_of_the_wrong_type_is_one_line(finished_run, tmp_path, capsys,
                                                               key, value, words):
    _, src = finished_run
    ckpt = torch.load(src / "last.pth", weights_only=True)
    ckpt[key] = value
    torch.save(ckpt, tmp_path / "bad.pth")
    assert cli.main(["lincls", "--checkpoint", str(tmp_path / "bad.pth")]) == 2
    line = _one_error_line(capsys, "lincls")
    assert f"{tmp_path / 'bad.pth'}: " in line and words in line, line
