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
    """sha256 of every file under ``paths`` (files or folders), links followed; missing paths
    map to ``"<absent>"``, so a file that appears is a change too."""
    import hashlib
    from pathlib import Path

    out = {}
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) \
            if root.exists() else []
        if not root.exists():
            out[str(root)] = "<absent>"
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, argv: list[str], *, keep=(), code: int = 2) -> str:
    """Run ``feataug ARGV`` in this process; assert exit status ``code``, exactly one stderr line
    ``feataug COMMAND: error: ...``, and that every file under ``keep`` (paths) is unchanged,
    including that no file appeared there. Returns the error line."""
    from feataug import cli

    before = tree_hashes(*keep)
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, (rc, err)
    assert len(err) == 1 and err[0].startswith(f"feataug {argv[0]}: error: "), err
    assert tree_hashes(*keep) == before
    return err[0]
