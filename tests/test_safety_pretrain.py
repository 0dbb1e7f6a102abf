"""Pretraining refuses what would lose or corrupt a run, and never executes a checkpoint.

Truth: every file of the output folder hashes the same before and after a refused command, the
error is one line naming the problem, and a marker file that a crafted pickle would create never
appears.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import refused, tree_hashes
from test_engine import SMALL, TINY, _env, _images, _pretrain

from feataug import cli
from pretrain.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_ITERS", "1"]


def _refused(capsys, data, out, *opts, keep) -> str:
    """``feataug pretrain`` of ``data`` into ``out`` refused (conftest.refused)."""
    return refused(capsys, ["pretrain", "--config-file", TINY, "DATA.ROOT", data,
                            "OUTPUT_DIR", out, *SMALL, *RUN, *opts], keep=keep)


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
    line = _refused(capsys, data, out, keep=[out])
    assert f"OUTPUT_DIR {out} already holds a run (last.pth, metrics.jsonl)" in line
    assert "use --resume" in line


@pytest.mark.parametrize("change", [["FA.OP", "noise"], ["MODEL.MOCO.T", "0.1"]])
def test_resume_refuses_another_config_and_touches_nothing(finished_run, tmp_path, capsys,
                                                           change):
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    # keep: config.yaml is not rewritten either
    line = refused(capsys, ["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", data,
                            "OUTPUT_DIR", out, *SMALL, *RUN, *change], keep=[out])
    assert f"{out / 'last.pth'} was written with another config" in line
    assert f"{change[0]} " in line  # names the key that differs


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
    assert f"OUTPUT_DIR {out}: exists and is not a folder" in _refused(capsys, data, out,
                                                                         keep=[tmp_path])
    assert out.read_text() == "precious"


def test_queue_smaller_than_the_batch_is_a_config_error(tmp_path, capsys):
    data = _images(tmp_path / "d", 8)
    line = _refused(capsys, data, tmp_path / "o", "MODEL.MOCO.K", "2", keep=[tmp_path])
    assert "MODEL.MOCO.K 2 is smaller than the global batch SOLVER.BATCH_SIZE 4" in line
    assert not (tmp_path / "o").exists()


def test_a_bad_override_is_blamed_on_the_override(tmp_path, capsys):
    line = refused(capsys, ["pretrain", "--config-file", TINY, "OUTPUT_DIR", tmp_path / "o",
                            "SOLVER.MAX_ITER", "many"], keep=[tmp_path])
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
    if command == "resume":
        argv = ["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", data,
                "OUTPUT_DIR", out, *SMALL, *RUN]
    else:
        argv = ["lincls", "--checkpoint", out / "last.pth", "LINCLS.EPOCHS", "1"]
    line = refused(capsys, argv, keep=[tmp_path])  # out, and no marker beside it
    assert f"{out / 'last.pth'}: refused to load: its pickle names posix.system" in line
    assert not marker.exists()


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
    line = refused(capsys, ["lincls", "--checkpoint", tmp_path / "bad.pth"], keep=[tmp_path])
    assert f"{tmp_path / 'bad.pth'}: " in line and words in line, line


@pytest.mark.parametrize("rng", [["junk"], [{"python": 1}], [{}]], ids=["str", "int", "empty"])
def test_a_resumed_checkpoint_whose_rng_does_not_fit_is_one_line(finished_run, tmp_path, capsys,
                                                                 rng):
    """``rng`` is plain data the schema check takes as any list: its inside is checked where it
    is loaded."""
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    ckpt = torch.load(out / "last.pth", weights_only=True)
    ckpt["rng"] = rng
    torch.save(ckpt, out / "last.pth")
    line = refused(capsys, ["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", data,
                            "OUTPUT_DIR", out, *SMALL, *RUN], keep=[out / "last.pth"])
    assert f"{out / 'last.pth'}: field 'rng' does not fit this run" in line, line


# ----------------------------------------------------------------------------- where a run writes
@pytest.mark.parametrize("case", ["out in data", "out in data via a link", "out in knn",
                                  "data in out", "data in a finished run", "data in a locked run"])
def test_image_folders_never_hold_a_runs_files(finished_run, tmp_path, capsys, case):
    data = _images(tmp_path / "d", 8)
    out, opts, words = data / "runs" / "o", [], "is inside DATA.ROOT"
    if case == "out in data via a link":
        (tmp_path / "link").symlink_to(data / "a")
        out = tmp_path / "link" / "o"
    elif case == "out in knn":
        out, opts = tmp_path / "knn" / "o", ["DATA.KNN_TRAIN_ROOT", _images(tmp_path / "knn", 2)]
        words = "is inside DATA.KNN_TRAIN_ROOT"
    elif case == "data in out":
        out = tmp_path / "o"
        data = _images(out / "imgs", 8)
        words = f"DATA.ROOT {data} is inside OUTPUT_DIR {out}"
    elif case != "out in data":
        run = _copy(finished_run[1], tmp_path / "run")
        if case == "data in a locked run":  # only a lock file: a run that is on or was killed
            run = tmp_path / "run2"
            (run / ".feataug.lock").parent.mkdir()
            (run / ".feataug.lock").write_text("1 host feataug pretrain\n")
        data, out = _images(run / "x" / "imgs", 8), tmp_path / "o"
        words = f"DATA.ROOT {data} is inside {run}, the OUTPUT_DIR of a FeatAug run"
    line = _refused(capsys, data, out, *opts, keep=[tmp_path])
    assert words in line
    if words == "is inside DATA.ROOT":
        assert f"OUTPUT_DIR {out} is inside DATA.ROOT {data}" in line


def test_output_dir_beside_the_data_is_accepted(tmp_path):
    data = _images(tmp_path / "d", 8)
    (tmp_path / "d2").symlink_to(data)  # a link to the data, with the run beside both
    assert _pretrain(tmp_path / "d2", tmp_path / "d-out", *RUN) == 0


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, capsys, where):
    data = _images(tmp_path / "d", 8)
    if where == "under a file":  # root writes anywhere in a folder: only a file stops it
        (tmp_path / "f").write_text("precious")
        out, words = tmp_path / "f" / "o", f"cannot be created, {tmp_path / 'f'} is not a folder"
    else:
        out, words = Path("/proc/feataug-test/o"), "cannot be written"
    line = _refused(capsys, data, out, keep=[tmp_path])
    assert f"OUTPUT_DIR {out}: {words}" in line
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_dir_in_a_read_only_folder_is_one_line(tmp_path, capsys):
    data, ro = _images(tmp_path / "d", 8), tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _refused(capsys, data, ro / "o", keep=[tmp_path])
    finally:
        ro.chmod(0o755)
    assert f"OUTPUT_DIR {ro / 'o'}: no write permission in {ro}" in line


# ----------------------------------------------------------------------------- Ctrl-C
def _ctrl_c_as_in_a_terminal() -> None:
    """The child's SIGINT as a terminal gives it: a shell runs background jobs (as a CI runner
    may run this suite) with SIGINT ignored, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_one_line_and_leaves_an_intact_checkpoint(tmp_path):
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"
    env = {**_env(), "TQDM_DISABLE": "1"}
    with open(tmp_path / "stdout.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "feataug", "pretrain", "--config-file", TINY, "DATA.ROOT",
             str(data), "OUTPUT_DIR", str(out), *SMALL, "SOLVER.MAX_ITER", "100000",
             "SOLVER.CHECKPOINT_ITERS", "1"], env=env, stdout=log, stderr=subprocess.PIPE,
            text=True, preexec_fn=_ctrl_c_as_in_a_terminal)
        try:
            deadline = time.monotonic() + 240
            while not (out / "metrics.jsonl").is_file() or \
                    len((out / "metrics.jsonl").read_text().splitlines()) < 3:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)  # a checkpoint is written every iteration
            err = proc.communicate(timeout=120)[1]
        finally:
            proc.kill()
    assert proc.returncode == 130, err
    last = out / "last.pth"
    m = re.fullmatch(rf"feataug pretrain: interrupted at iteration (\d+); {re.escape(str(last))} "
                     r"\(iteration (\d+)\) is intact; --resume continues\n", err)
    assert m, err
    assert load_checkpoint(last)["iter"] == int(m[2]) <= int(m[1])
    assert int(m[2]) >= 2 and not list(out.glob(".*.tmp"))  # log line 3 precedes its checkpoint


# ----------------------------------------------------------------------------- flags after KEY VALUE
def test_flags_after_the_overrides_are_flags(finished_run, tmp_path):
    data, src = finished_run
    out = _copy(src, tmp_path / "o")
    before = tree_hashes(out)
    # without --resume taking effect, this run would be refused: the folder holds a run
    assert cli.main(["pretrain", "--config-file", TINY, "DATA.ROOT", str(data), "OUTPUT_DIR",
                     str(out), *SMALL, "SOLVER.MAX_ITER", "2", "--resume"]) == 0
    assert load_checkpoint(out / "last.pth")["iter"] == 2
    metrics = str(out / "metrics.jsonl")
    assert tree_hashes(out)[metrics] == before[metrics]


def test_detect_flags_after_the_overrides_are_flags_with_their_values():
    pytest.importorskip("detectron2")
    import argparse

    from feataug.cli import parse_args
    from transfer import detect

    parser = argparse.ArgumentParser()
    detect.add_arguments(parser)
    args = parse_args(parser, ["--config-file", "c.yaml", "SOLVER.MAX_ITER", "2", "--trials", "3",
                               "OUTPUT_DIR", "o", "--register-voc", "n", "root", "trainval",
                               "--from-scratch", "SEED", "--resume", "--", "K", "--eval-only"])
    assert (args.trials, args.from_scratch, args.register_voc) == (3, True, [["n", "root",
                                                                              "trainval"]])
    # a VALUE that looks like a flag, and everything after --, stay overrides
    assert not args.resume and not args.eval_only
    assert args.opts == ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", "o", "SEED", "--resume", "--",
                         "K", "--eval-only"]
