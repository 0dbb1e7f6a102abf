"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run fastest single-threaded, and CI shares its two cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def catalog():
    """Restore Detectron2's dataset and metadata catalogs after the test."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    saved_d = dict(DatasetCatalog)
    saved_m = {name: MetadataCatalog.get(name) for name in MetadataCatalog.list()}
    yield
    DatasetCatalog.clear()
    DatasetCatalog.update(saved_d)
    MetadataCatalog.clear()
    MetadataCatalog.update(saved_m)


def tree_hashes(*paths) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders), links followed, and ``"<folder>"``
    for every folder there (``"<other>"`` for anything else, such as a dangling link); missing
    paths map to ``"<absent>"``, so a file or folder that appears is a change too."""
    import hashlib
    from pathlib import Path

    def entry(p: Path) -> str:
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        return "<folder>" if p.is_dir() else "<other>"

    out = {}
    for root in map(Path, paths):
        if not root.exists():
            out[str(root)] = "<absent>"
            continue
        out[str(root)] = entry(root)
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                out[str(p)] = entry(p)
    return out


def refused(capsys, argv: list, *, keep=(), code: int = 2, out: str | None = None) -> str:
    """Run ``feataug ARGV`` in this process; assert exit status ``code``, exactly one stderr line
    ``feataug COMMAND: error: ...``, and that every file and folder under ``keep`` (paths) is
    unchanged, including that none appeared there; with ``out`` (e.g. ``""``), that stdout is
    exactly ``out``. Returns the error line."""
    from feataug import cli

    before = tree_hashes(*keep)
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == code, (rc, err)
    assert len(err) == 1 and err[0].startswith(f"feataug {argv[0]}: error: "), err
    assert tree_hashes(*keep) == before
    if out is not None:
        assert captured.out == out, captured.out
    return err[0]


def spawn_ranks(fn, args: tuple, nprocs: int, timeout: float = 240) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes with one OpenMP thread each and
    wait for them; kill them and fail the test after ``timeout`` seconds (no test hangs)."""
    import os
    import time

    import torch.multiprocessing as mp

    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children's
    try:
        ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the {nprocs} ranks did not finish in {timeout:g} s")
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = before
