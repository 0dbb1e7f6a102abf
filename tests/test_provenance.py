"""What produced a pretraining run: ``provenance.json``, the head of ``log.txt`` and the
checkpoint's ``provenance`` entry (pretrain/utils/provenance.py, the record ``feataug detect``
writes too).

Truths: the test's own command line, ``git rev-parse HEAD``, torch's version; for the data
fingerprint, a sha256 of the sorted names computed here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine import _images, _pretrain

import feataug
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.utils.provenance import data_fingerprint

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _names_sha256(names: list[str]) -> str:
    return hashlib.sha256("".join(f"{n}\n" for n in sorted(names)).encode()).hexdigest()


def test_folder_fingerprint_is_the_sorted_names(tmp_path):
    root = tmp_path / "d"
    (root / "b").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"1")
    (root / "b" / "c.jpg").write_bytes(b"2")
    fp = data_fingerprint(root)
    assert fp["files"] == 2 and fp["names_sha256"] == _names_sha256(["a.jpg", "b/c.jpg"])
    assert fp["path"] == str(root) and fp["resolved"] == str(root.resolve())

    (root / "a.jpg").write_bytes(b"other content, another size")  # names only: unchanged
    assert data_fingerprint(root) == fp
    (root / "b" / "d.jpg").write_bytes(b"3")  # a file added: changed
    added = data_fingerprint(root)
    assert added["files"] == 3 and added["names_sha256"] != fp["names_sha256"]
    (root / "b" / "d.jpg").rename(root / "b" / "e.jpg")  # renamed: changed
    assert data_fingerprint(root)["names_sha256"] not in (fp["names_sha256"],
                                                          added["names_sha256"])
    (root / "loop").symlink_to(root)  # a link back up is walked once, as the data loader does
    assert data_fingerprint(root)["files"] == 3


def test_single_file_fingerprint_is_its_name_and_size(tmp_path):
    idx = tmp_path / "train-images-idx3-ubyte.gz"
    idx.write_bytes(gzip.compress(b"\0" * 100))
    fp = data_fingerprint(idx)
    size = idx.stat().st_size
    assert fp["files"] == 1
    assert fp["names_sha256"] == hashlib.sha256(f"{idx.name}\t{size}\n".encode()).hexdigest()
    missing = data_fingerprint(tmp_path / "nope")
    assert (missing["files"], missing["names_sha256"]) == (None, None)


def test_pretraining_writes_provenance_and_every_checkpoint_carries_it(tmp_path):
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"  # batch 4: 2 iterations per epoch
    assert _pretrain(data, out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1") == 0
    # the run's log file ended with it
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("pretrain").handlers)

    record = json.loads((out / "provenance.json").read_text())
    assert record["command"] == sys.argv and record["world_size"] == 1
    assert record["versions"]["torch"] == torch.__version__ and record["start_iter"] == 0
    assert record["versions"]["feataug"] == feataug.__version__  # the installed distribution
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    commit = head.stdout.strip() if head.returncode == 0 else None
    assert record["git"]["commit"] == commit
    assert isinstance(record["git"]["dirty"], bool) == (commit is not None)
    names = [f"{'ab'[k % 2]}/{k:03d}.jpg" for k in range(8)]  # _images' layout
    assert record["data"] == {"DATA.ROOT": {
        "path": str(data), "resolved": str(data.resolve()), "files": 8,
        "names_sha256": _names_sha256(names), "format": "folder"}}  # fmt: skip
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("provenance: ") and f"DATA.ROOT {data}: 8 file(s)" in log[2]

    # plain data, as torch's own weights_only loader reads it
    assert torch.load(out / "last.pth", weights_only=True)["provenance"] == record
    assert load_checkpoint(out / "checkpoint_0001.pth")["provenance"] == record


def test_a_resumed_run_records_itself_and_loads_checkpoints_without_provenance(tmp_path):
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1"]
    assert _pretrain(data, out, *opts) == 0
    old = load_checkpoint(out / "checkpoint_0001.pth")  # iteration 2: the run stopped there
    del old["provenance"]  # as written before the entry existed
    save_checkpoint(old, out / "last.pth")
    assert _pretrain(data, out, *opts, "--resume") == 0
    record = json.loads((out / "provenance.json").read_text())
    assert record["start_iter"] == 2
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["iter"] == 4 and ckpt["provenance"] == record
    assert (out / "log.txt").read_text().count("provenance: ") == 2
    assert "resumed at iteration 2" in (out / "log.txt").read_text()
