"""`feataug lincls` output: never the checkpoint or config it reads (by any path or link), an
existing file only with ``--overwrite``, never a folder, never the evaluation's state file or
anything in the data, and never a folder holding files lincls did not write; all checked before
the evaluation.

Truth: the sha256 of every file under the run folder before and after each refusal, and an
evaluation that fails the test if it is reached.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import refused, tree_hashes
from test_engine import TINY, _images, _pretrain

import pretrain.lincls as lincls
from feataug import cli
from pretrain.lincls_folder import RECORD_FIELDS

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
    record = dict.fromkeys(RECORD_FIELDS, 0)  # an evaluation's folder (evaluation_folder)
    (default.parent / "provenance.json").write_text(json.dumps(record))
    try:
        line = refused(capsys, argv[:3] + argv[5:], keep=[src, tmp_path])
        assert line.endswith(f"--output-dir {default.parent}: holds an evaluation (lincls.json); "
                             "--resume continues it, --overwrite replaces it")
    finally:
        shutil.rmtree(default.parent)
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


# ----------------------------------------------------------------------------- other files
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("files, words", [
    ({"config.yaml": "precious\n", "provenance.json": "{}\n"},
     "holds files feataug lincls did not write (config.yaml, provenance.json)"),
    ({"checkpoint_0005.pth": "a pretraining checkpoint"}, "holds a pretraining run"),
])  # fmt: skip
def test_a_folder_lincls_did_not_write_is_refused(files, words, overwrite, run, tmp_path, capsys):
    """Truth: the hashes of the folder's files (``refused``); the evaluation is not stopped
    beforehand, so without the check it would replace them."""
    data, src = run
    det = tmp_path / "det"
    det.mkdir()
    for name, text in files.items():
        (det / name).write_text(text)
    line = refused(capsys, ["lincls", "--checkpoint", src / "last.pth", "--output-dir", det,
                            *overwrite, *_opts(data)], keep=[det, src])
    assert f"--output-dir {det}: {words}" in line, line


def test_an_evaluation_folder_is_resumed_and_replaced_but_not_other_files(run, tmp_path):
    """Its own folder (its provenance.json says so) takes --resume and --overwrite; a file
    lincls never writes stays as it was."""
    data, src = run
    ev = tmp_path / "ev"
    argv = ["lincls", "--checkpoint", src / "last.pth", "--output-dir", ev, *_opts(data)]
    assert cli.main([str(a) for a in argv]) == 0
    (ev / "notes.txt").write_text("mine")
    for flag in ("--resume", "--overwrite"):
        assert cli.main([str(a) for a in [*argv, flag]]) == 0
    assert (ev / "notes.txt").read_text() == "mine" and (ev / "lincls.json").is_file()


def test_the_state_file_is_never_the_output_under_another_spelling(run, tmp_path, capsys):
    data, src = run
    ev = tmp_path / "ev"
    argv = ["lincls", "--checkpoint", src / "last.pth", "--output-dir", ev, *_opts(data)]
    assert cli.main([str(a) for a in argv]) == 0
    (tmp_path / "link").symlink_to(ev)
    for dst in (ev / ".." / "ev" / "lincls_last.pth", tmp_path / "link" / "lincls_last.pth"):
        line = refused(capsys, [*argv, "--output", dst, "--overwrite"], keep=[ev, src])
        assert line.endswith(f"--output {dst}: the evaluation writes its lincls_last.pth there; "
                             "give another name")


@pytest.mark.parametrize("flag, where", [("--output", "a/000.jpg"), ("--output-dir", "."),
                                         ("--output-dir", "a/new")])
def test_no_output_goes_into_the_data(flag, where, run, capsys):
    data, src = run
    dst = data / where
    line = refused(capsys, ["lincls", "--checkpoint", src / "last.pth", flag, dst, "--overwrite",
                            *_opts(data)], keep=[data, src])
    assert f"{flag} {dst}: is " in line and "the DATA.KNN_TRAIN_ROOT folder" in line, line


def test_an_output_dir_that_is_a_file_names_the_flag(run, tmp_path, capsys, no_eval):
    data, src = run
    (tmp_path / "afile").write_text("x")
    line = refused(capsys, ["lincls", "--checkpoint", src / "last.pth", "--output-dir",
                            tmp_path / "afile", *_opts(data)], keep=[tmp_path])
    assert line.endswith(f"--output-dir {tmp_path / 'afile'}: exists and is not a folder")
