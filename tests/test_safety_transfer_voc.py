"""Crafted VOC-format data: boxes outside their image are clipped within a tolerance (and
counted) or refused, and split lines that are not one id are refused, naming the file; through
`feataug detect`, before the model is built and before anything is written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.detectron2

sys.path.insert(0, str(Path(__file__).parent))
from conftest import refused, tree_hashes  # noqa: E402
from detect_data import CLASSES, make_voc  # noqa: E402

from transfer import datasets  # noqa: E402


def _voc_with_box(tmp_path: Path, box: tuple[float, float, float, float]) -> Path:
    """A one-image VOC set (160x160 <size>) whose only object has VOC ``box``."""
    root = tmp_path / "v"
    make_voc(root, n_train=1, n_test=0, clean=True)
    xml = root / "Annotations" / "002000.xml"
    text = xml.read_text()
    head, _, _ = text.partition("<object>")
    obj = "".join(
        f"<{t}>{v:g}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    xml.write_text(f"{head}<object><name>{CLASSES[0]}</name><bndbox>{obj}</bndbox></object>"
                   "</annotation>")  # fmt: skip
    return root


@pytest.mark.parametrize(
    "box, clipped",
    [((1, 1, 160, 160), (0, 0, 160, 160)), ((0, 1, 161, 162), (0, 0, 160, 160)),
     ((-0.5, 20, 50, 60), (0, 19, 50, 60))],
    ids=["inside", "1-2 px outside", "negative xmin"],
)  # fmt: skip
def test_voc_boxes_slightly_outside_are_clipped_with_a_count(box, clipped, tmp_path, caplog):
    root = _voc_with_box(tmp_path, box)
    (record,) = datasets.load_voc(root, "trainval", CLASSES)
    assert record["annotations"][0]["bbox"] == list(map(float, clipped))
    warnings = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert warnings == ([] if box == (1, 1, 160, 160) else [
        f"{root} split trainval: clipped 1 boxes to their image "
        f"(reaching up to {max(1 - box[0], 1 - box[1], box[2] - 160, box[3] - 160):g} px outside)"
    ])  # fmt: skip


@pytest.mark.parametrize(
    "box, words",
    [((1, 1, 170, 100), "object 0 (red box) reaches 10 px outside the 160x160 image"),
     ((161, 10, 162, 20), "object 0 (red box) has no area inside the 160x160 image")],
    ids=["10 px outside", "outside within tolerance"],
)  # fmt: skip
def test_voc_boxes_far_outside_are_refused(box, words, tmp_path):
    root = _voc_with_box(tmp_path, box)
    before = tree_hashes(tmp_path)
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_voc(root, "trainval", CLASSES)
    assert str(e.value) == f"{root / 'Annotations' / '002000.xml'}: {words}" + (
        " (more than 2 px: wrong <size> or coordinates?)" if "reaches" in words else ""
    )
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("line", ["IMG 001", "002000 1", "002000\t-1"])
def test_voc_split_lines_with_whitespace_are_refused(line, tmp_path, capsys):
    """Also through `feataug detect` (the split is read at registration, before anything is
    registered): exit 2, one line naming the split file and the line."""
    from test_safety_transfer_detect import _argv, detect_refused

    make_voc(tmp_path / "voc", n_train=2, n_test=1)
    split = tmp_path / "voc" / "ImageSets" / "Main" / "trainval.txt"
    split.write_text(f"002001\n{line}\n")
    with pytest.raises(datasets.DatasetError) as e:
        datasets.load_voc(tmp_path / "voc", "trainval", CLASSES)
    assert str(e.value).startswith(f"{split}: line 2 {line!r} is not one image id")
    assert str(e.value) in detect_refused(tmp_path, capsys, _argv(tmp_path, "--from-scratch"))


def _detect_voc(tmp_path: Path, edit) -> tuple[list, Path]:
    """`feataug detect` arguments on the tiny VOC set after ``edit(voc_root)``; the data root."""
    from test_safety_transfer_detect import _argv

    make_voc(tmp_path / "voc", n_train=2, n_test=1)
    edit(tmp_path / "voc")
    return ["detect", *_argv(tmp_path, "--from-scratch")], tmp_path / "voc"


def _set_xmax(value: str):
    def edit(root: Path) -> None:  # 002001.xml has <size> 160x160; its first object's xmax
        xml = root / "Annotations" / "002001.xml"
        xml.write_text(re.sub(r"<xmax>[^<]*</xmax>", f"<xmax>{value}</xmax>", xml.read_text(),
                              count=1))
    return edit


def _split(data: bytes):
    return lambda root: (root / "ImageSets" / "Main" / "trainval.txt").write_bytes(data)


@pytest.mark.parametrize("edit, words", [
    (_set_xmax("211"), "002001.xml: object 0 (red box) reaches 51 px outside the 160x160 image"),
    (_set_xmax("1e308"), "002001.xml: object 0 (red box) reaches 1e+308 px outside"),
    (_split(b"002000\n002001\n009999\n"), "JPEGImages: no image for id '009999' (split trainval)"),
    (_split(b"002000\n00200\xff\n"), "trainval.txt: not UTF-8 text (byte 0xff at offset 12)"),
], ids=["51 px outside", "1e308", "split id without image", "split not UTF-8"])  # fmt: skip
def test_bad_voc_data_is_refused_before_the_model_and_any_file(edit, words, tmp_path, capsys,
                                                                catalog):
    """The records are read at setup: exit 2, one line naming the file, nothing written (no
    OUTPUT_DIR), before the model is built or its 160 lines printed."""
    argv, _ = _detect_voc(tmp_path, edit)
    line = refused(capsys, argv, keep=[tmp_path], out="")  # nothing printed
    assert words in line and "Traceback" not in line
    assert not (tmp_path / "out").exists()


def test_detect_prints_only_its_own_error_line(tmp_path):
    """A fresh process: Detectron2's and fvcore's torch.jit.script FutureWarnings at import are
    silenced; stderr holds the one error line."""
    argv, _ = _detect_voc(tmp_path, _set_xmax("211"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "feataug.cli", *map(str, argv)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"feataug detect: error: {tmp_path / 'voc' / 'Annotations' / '002001.xml'}: object 0 "
        "(red box) reaches 51 px outside the 160x160 image (more than 2 px: wrong <size> or "
        "coordinates?)"]
    assert not (tmp_path / "out").exists()
