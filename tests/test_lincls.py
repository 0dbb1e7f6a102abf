"""`feataug lincls` output: never the checkpoint or config it reads (by any path or link), an
existing file only with ``--overwrite``, never a folder, all checked before the evaluation.

Truth: the sha256 of every file under the run folder before and after each refusal, and an
evaluation that fails the test if it is reached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import refused, tree_hashes
from test_engine import TINY, _images, _pretrain

import pretrain.lincls as lincls
from feataug import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(labelled images, a finished one-iteration run folder)."""
    root = tmp_path_factory.mktemp("lincls")
    data = _images(root / "d", 8)
    assert _pretrain(data, root / "o", "SOLVER.MAX_ITER", "1") == 0
    return data, root / "o"


def _opts(data: Path) -> list:
    return ["DATA.KNN_TRAIN_ROOT", data, "DATA.KNN_VAL_ROOT", data, "DATALOADER.NUM_WORKERS", "0",
            "LINCLS.EPOCHS", "1", "LINCLS.AUGMENT", "False", "LINCLS.BATCH_SIZE", "4"]


@pytest.fixture
def no_eval(monkeypatch):
    def evaluated(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output was checked")

    monkeypatch.setattr(lincls, "linear_eval", evaluated)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("variant", ["same string", "other spelling", "symlink", "hard link"])
def test_output_is_never_the_checkpoint(variant, overwrite, run, tmp_path, capsys, no_eval):
    data, src = run
    ckpt = src / "last.pth"
    (tmp_path / "sub").mkdir()
    dst = {"same string": ckpt, "other spelling": src / ".." / src.name / "last.pth",
           "symlink": tmp_path / "link.json", "hard link": tmp_path / "hard.json"}[variant]
    if variant == "symlink":
        dst.symlink_to(ckpt)
    if variant == "hard link":
        os.link(ckpt, dst)
    line = refused(capsys, ["lincls", "--checkpoint", ckpt, "--output", dst, *overwrite,
                            *_opts(data)], keep=[src, tmp_path])
    assert line.endswith(f"--output {dst}: the output is the --checkpoint file {ckpt}; give "
                         "another name")


def test_output_is_never_the_config_file(run, tmp_path, capsys, no_eval):
    data, src = run
    config = tmp_path / "c.yaml"
    config.write_text(Path(TINY).read_text())
    (tmp_path / "c-link.yaml").symlink_to(config)
    line = refused(capsys, ["lincls", "--checkpoint", src / "last.pth", "--config-file", config,
                            "--output", tmp_path / "c-link.yaml", "--overwrite", *_opts(data)],
                   keep=[src, tmp_path])
    assert f"the output is the --config-file file {config}" in line


def test_an_existing_output_is_replaced_only_with_overwrite(run, tmp_path, capsys):
    data, src = run
    other = tmp_path / "other.json"
    other.write_text('{"top1": "last week"}')
    out = tmp_path / "out.json"
    out.symlink_to(other)
    argv = ["lincls", "--checkpoint", src / "last.pth", "--output", out, *_opts(data)]
    line = refused(capsys, argv, keep=[src, tmp_path])
    assert line.endswith(f"--output {out}: exists; use --overwrite to replace it")
    default = src / "last_lincls" / "lincls.json"  # the default output folder, beside it
    default.parent.mkdir()
    default.write_text("{}")
    try:
        line = refused(capsys, argv[:3] + argv[5:], keep=[src, tmp_path])
        assert line.endswith(f"--output-dir {default.parent}: holds an evaluation (lincls.json); "
                             "--resume continues it, --overwrite replaces it")
    finally:
        default.unlink()
        default.parent.rmdir()
    before = tree_hashes(src, other)
    ev = tmp_path / "ev"  # the evaluation's own folder, outside the run folder
    assert cli.main([str(a) for a in [*argv, "--overwrite", "--output-dir", ev]]) == 0
    assert (ev / "lincls_last.pth").is_file() and not (ev / "lincls.json").exists()
    assert 0 <= json.loads(out.read_text())["top1"] <= 100
    assert not out.is_symlink() and tree_hashes(src, other) == before  # the link, not its target


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_that_is_a_folder(overwrite, run, tmp_path, capsys, no_eval):
    data, src = run
    line = refused(capsys, ["lincls", "--checkpoint", src / "last.pth", "--output", tmp_path,
                            *overwrite, *_opts(data)], keep=[src, tmp_path])
    assert line.endswith(f"--output {tmp_path}: is a folder; give the output file's name")
