"""One run per folder: a second process into a folder in use is refused, naming the holder.

Truth: a real second process (``HOLDER`` below) holds the folder's lock through the library, or
has been SIGKILLed while holding it; every file of the folder hashes the same before and after
the refused command, and the message names the holder's pid, which only the OS knows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_safety_pretrain
from conftest import refused, tree_hashes
from test_engine import SMALL, TINY, _env, _images, _pretrain
from test_safety_pretrain import RUN, _copy

from pretrain.utils.lock import LOCK_NAME, FolderInUse, run_lock

finished_run = test_safety_pretrain.finished_run  # a finished two-iteration run, shared

pytestmark = pytest.mark.usefixtures("one_thread")

HOLDER = """
import sys
from pretrain.utils.lock import run_lock
with run_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes the pipe
"""


class Holder:
    """A process that holds ``folder``'s lock as ``what`` until ``release`` or ``kill``."""

    def __init__(self, folder: Path, what: str = "feataug pretrain"):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), what],
                                     env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line == "held\n", (line, self.proc.stderr.read())
        self.pid = self.proc.pid

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL


@pytest.fixture
def holders():
    started: list[Holder] = []
    yield lambda *a, **k: started.append(Holder(*a, **k)) or started[-1]
    for h in started:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_second_pretrain_into_a_folder_in_use_is_refused(finished_run, tmp_path, capsys,
                                                           holders, resume):
    data, src = finished_run
    out = _copy(src, tmp_path / "o") if resume else tmp_path / "o"
    holder = holders(out)
    argv = ["pretrain", "--config-file", TINY, *(["--resume"] if resume else []),
            "DATA.ROOT", data, "OUTPUT_DIR", out, *SMALL, *RUN]
    line = refused(capsys, argv, keep=[out])
    assert f"OUTPUT_DIR {out} is in use by feataug pretrain (pid {holder.pid} on " in line
    holder.release()
    assert not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == (sorted(p.name for p in src.iterdir())
                                                     if resume else [])
    assert _pretrain(data, out, *RUN, *(["--resume"] if resume else [])) == 0  # free again
    assert (out / "last.pth").is_file() and not (out / LOCK_NAME).exists()


def test_under_torchrun_every_rank_is_refused_and_none_waits(tmp_path, holders):
    data, out = _images(tmp_path / "d", 16), tmp_path / "o"
    holder = holders(out)
    before = tree_hashes(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "feataug", "pretrain", "--config-file", TINY, "DATA.ROOT", str(data),
           "OUTPUT_DIR", str(out), *SMALL, "SOLVER.BATCH_SIZE", "8", "SOLVER.MAX_ITER", "3"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert f"error: OUTPUT_DIR {out} is in use by feataug pretrain (pid {holder.pid} " \
        in proc.stderr  # rank 0
    assert f"error: OUTPUT_DIR {out}: refused by rank 0" in proc.stderr  # rank 1, not waiting
    assert tree_hashes(out) == before


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holders):
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"
    holder = holders(out)
    holder.kill()
    assert str(holder.pid) in (out / LOCK_NAME).read_text()  # its file stays, its lock does not
    assert _pretrain(data, out, *RUN) == 0
    assert (out / "last.pth").is_file() and not (out / LOCK_NAME).exists()


def test_the_lock_is_exclusive_across_processes_and_nests_in_one(tmp_path, holders):
    folder = tmp_path / "f"
    with run_lock(folder, "test"), run_lock(folder, "test"):  # a study job pretraining into it
        assert (folder / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        proc = subprocess.run([sys.executable, "-c", HOLDER, str(folder), "x"], env=_env(),
                              input="", capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "FolderInUse" in proc.stderr
        assert "is in use by test (pid" in proc.stderr
    assert not (folder / LOCK_NAME).exists()
    holder = holders(folder)
    with pytest.raises(FolderInUse, match=f"pid {holder.pid} "):
        with run_lock(folder, "test"):
            pass
    holder.release()


def test_a_study_job_in_use_is_refused_before_its_folder_is_touched(tmp_path, holders):
    from test_study import CALLS, FAIL, fake_runner, write_grid
    from test_study import SMALL as STUDY

    from feataug import study

    grid = study.load_grid(write_grid(tmp_path, STUDY))
    out = tmp_path / "out"
    job = out / "runs" / "m.nofa" / "seed0"
    holder = holders(job, "feataug study")
    before = tree_hashes(job)
    CALLS.clear()
    FAIL.clear()
    with pytest.raises(FolderInUse, match=f"study job folder {job} is in use by feataug study "
                                          f"\\(pid {holder.pid} "):
        study.run_study(grid, out, [0], runner=fake_runner, echo=lambda s: None)
    assert ("m.nofa", 0) not in CALLS
    assert tree_hashes(job) == before


def test_a_detection_run_into_a_folder_in_use_is_refused(tmp_path, capsys, holders, catalog):
    pytest.importorskip("detectron2")
    from detect_data import make_voc

    make_voc(tmp_path / "voc", n_train=2, n_test=1)
    out = tmp_path / "out"
    holder = holders(out, "feataug detect")
    config = Path(TINY).parents[1] / "detection" / "tiny_faster_R18_FPN.yaml"
    argv = ["detect", "--config-file", config, "--register-voc", "tr", tmp_path / "voc",
            "trainval", "DATASETS.TRAIN", "('tr',)", "DATASETS.TEST", "('tr',)",
            "DATASETS.AUTO_NUM_CLASSES", "True", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", out,
            "--from-scratch"]  # a flag after the overrides, too
    line = refused(capsys, argv, keep=[tmp_path])
    assert f"OUTPUT_DIR {out} is in use by feataug detect (pid {holder.pid} on " in line
