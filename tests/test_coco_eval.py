"""COCO evaluation: our numbers against pycocotools' own, the command line, and bad inputs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import refused
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from feataug import cli
from transfer import coco_eval

# ---------------------------------------------------------------------------------------------
# Random COCO data and the pycocotools truth
# ---------------------------------------------------------------------------------------------

CATEGORIES = [{"id": 1, "name": "tree"}, {"id": 3, "name": "car"}, {"id": 7, "name": "person"}]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with a run of 0s."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _polygon(rng, x, y, w, h) -> list[float]:
    """A convex-ish hexagon inside the box (x, y, w, h)."""
    fx = rng.uniform(0.0, 0.25, 6)
    fy = rng.uniform(0.0, 0.25, 6)
    pts = [
        (x + fx[0] * w, y + 0.5 * h),
        (x + 0.3 * w, y + fy[1] * h),
        (x + (1 - fx[2]) * w, y + fy[2] * h),
        (x + (1 - fx[3]) * w, y + 0.6 * h),
        (x + 0.7 * w, y + (1 - fy[4]) * h),
        (x + fx[5] * w, y + (1 - fy[5]) * h),
    ]
    return [float(v) for p in pts for v in p]


def _compressed(rle: dict) -> dict:
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def random_coco(seed: int, n_images: int = 32) -> tuple[dict, list[dict]]:
    """GT (polygons, compressed RLE, crowd regions as uncompressed RLE) and detections.

    Detections: jittered copies of GT objects (some with the wrong class), random false
    positives, tied scores, one image with more than 100 detections, ~20% images without any.
    Each detection carries a bbox and a compressed-RLE mask.
    """
    rng = np.random.default_rng(seed)
    images, anns, dts = [], [], []
    for image_id in range(1, n_images + 1):
        h, w = int(rng.integers(40, 260)), int(rng.integers(40, 260))
        images.append({"id": image_id, "file_name": f"{image_id:04d}.jpg", "height": h, "width": w})
        objects = []
        for _ in range(int(rng.integers(0, 6))):
            bw, bh = rng.uniform(3, w * 0.7), rng.uniform(3, h * 0.7)
            bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            crowd = rng.random() < 0.12
            poly = _polygon(rng, bx, by, bw, bh)
            rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
            if crowd:
                segmentation = _uncompressed_rle(mask_util.decode(rle))
            elif rng.random() < 0.25:
                segmentation = _compressed(rle)
            else:
                segmentation = [poly]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([c["id"] for c in CATEGORIES])),
                    "bbox": [bx, by, bw, bh],
                    "area": float(mask_util.area(rle)),
                    "iscrowd": int(crowd),
                    "segmentation": segmentation,
                }
            )
            objects.append((bx, by, bw, bh, anns[-1]["category_id"]))
        if rng.random() < 0.2:
            continue  # an image without detections
        boxes = []
        for bx, by, bw, bh, cat in objects:
            for _ in range(int(rng.integers(0, 3))):
                j = rng.normal(0, 0.12, 4) * [bw, bh, bw, bh]
                wrong = rng.random() < 0.15
                boxes.append(
                    (
                        [bx + j[0], by + j[1], max(2.0, bw + j[2]), max(2.0, bh + j[3])],
                        int(rng.choice([1, 3, 7])) if wrong else cat,
                    )
                )
        n_random = 110 if image_id == 5 else int(rng.integers(0, 4))
        for _ in range(n_random):
            bw, bh = rng.uniform(2, w * 0.6), rng.uniform(2, h * 0.6)
            boxes.append(
                (
                    [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                    int(rng.choice([1, 3, 7])),
                )
            )
        for (bx, by, bw, bh), cat in boxes:
            bx, by = max(0.0, bx), max(0.0, by)
            bw, bh = min(bw, w - bx), min(bh, h - by)
            rle = mask_util.merge(mask_util.frPyObjects([_polygon(rng, bx, by, bw, bh)], h, w))
            score = float(rng.random())
            dts.append(
                {
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [float(bx), float(by), float(bw), float(bh)],
                    "score": round(score, 2) if rng.random() < 0.3 else score,
                    "segmentation": _compressed(rle),
                }
            )
    gt = {
        "info": {},
        "images": images,
        "annotations": anns,
        "categories": copy.deepcopy(CATEGORIES),
    }
    return gt, dts


def for_iou_type(dts: list[dict], iou_type: str, keep_bbox: bool = False) -> list[dict]:
    """bbox results without masks; segm results without boxes (mask areas) unless keep_bbox."""
    drop = "segmentation" if iou_type == "bbox" else (None if keep_bbox else "bbox")
    return [{k: v for k, v in d.items() if k != drop} for d in dts]


def pycocotools_eval(gt: dict, dts: list[dict], iou_type: str) -> COCOeval:
    """The reference: pycocotools run by hand on private copies."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dts)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_matches(result: dict, ref: COCOeval) -> None:
    ours = np.array([result["stats"][k] for k in coco_eval.STAT_NAMES])
    np.testing.assert_allclose(ours, ref.stats, rtol=0, atol=1e-6)
    precision = ref.eval["precision"]
    assert [c["id"] for c in result["per_category"]] == [1, 3, 7]
    for k, cat in enumerate(result["per_category"]):
        p = precision[:, :, k, 0, -1]
        expected = p[p > -1].mean() if (p > -1).any() else -1.0
        assert cat["AP"] == pytest.approx(expected, abs=1e-6)
        assert cat["name"] == CATEGORIES[k]["name"]


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", coco_eval.BACKENDS)
@pytest.mark.parametrize("iou_type", coco_eval.IOU_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_stats_equal_pycocotools(seed, iou_type, backend):
    gt, dts = random_coco(seed)
    dts = for_iou_type(dts, iou_type)
    gt_before, dts_before = copy.deepcopy(gt), copy.deepcopy(dts)
    result = coco_eval.evaluate(gt, dts, iou_type, backend=backend)
    ref = pycocotools_eval(gt, dts, iou_type)
    assert result["backend"] == backend and result["iou_type"] == iou_type
    assert_matches(result, ref)
    # the random data is not degenerate: several stats are strictly between 0 and 1
    assert sum(0 < v < 1 for v in result["stats"].values()) >= 8
    assert gt == gt_before and dts == dts_before  # inputs left untouched


@pytest.mark.parametrize("backend", coco_eval.BACKENDS)
def test_segm_results_with_boxes_and_polygons(backend):
    """Boxes present: pycocotools takes the box area for small/medium/large, and reads polygons."""
    gt, dts = random_coco(2)
    with_box = for_iou_type(dts, "segm", keep_bbox=True)
    assert_matches(
        coco_eval.evaluate(gt, with_box, "segm", backend), pycocotools_eval(gt, with_box, "segm")
    )
    rng = np.random.default_rng(0)
    polygons = copy.deepcopy(with_box)
    for d in polygons:
        x, y, w, h = d["bbox"]
        d["segmentation"] = [_polygon(rng, x, y, w, h)]
    assert_matches(
        coco_eval.evaluate(gt, polygons, "segm", backend), pycocotools_eval(gt, polygons, "segm")
    )


@pytest.mark.parametrize("backend", coco_eval.BACKENDS)
def test_hand_computed_ap(backend):
    """One object; a higher-scored false positive ranks above the exact hit: AP = 1/2."""
    gt = {
        "images": [{"id": 1, "height": 100, "width": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 50, 50],
                "area": 2500.0,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    dts = [
        {"image_id": 1, "category_id": 1, "bbox": [70, 70, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.8},
    ]
    stats = coco_eval.evaluate(gt, dts, "bbox", backend)["stats"]
    # precision envelope is 1/2 at every recall threshold, at every IoU threshold
    assert stats["AP"] == pytest.approx(0.5) and stats["AP50"] == pytest.approx(0.5)
    # medium range: the 20x20 false positive is small, so it is ignored there; no small/large GT
    assert stats["APm"] == pytest.approx(1.0) and stats["APs"] == -1 and stats["APl"] == -1
    assert stats["AR1"] == 0 and stats["AR10"] == 1 and stats["AR100"] == 1


def test_falls_back_to_pycocotools(monkeypatch):
    gt, dts = random_coco(3, n_images=12)
    dts = for_iou_type(dts, "bbox")
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now fails
    assert coco_eval.available_backend() == "pycocotools"
    result = coco_eval.evaluate(gt, dts)
    assert result["backend"] == "pycocotools"
    assert_matches(result, pycocotools_eval(gt, dts, "bbox"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _write(path: Path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("iou_type", coco_eval.IOU_TYPES)
def test_cli_prints_table_and_writes_json(tmp_path, capsys, iou_type):
    gt, dts = random_coco(4, n_images=16)
    dts = for_iou_type(dts, iou_type)
    out = tmp_path / "sub" / "stats.json"
    rc = cli.main(
        [
            "coco-eval",
            "--gt",
            _write(tmp_path / "gt.json", gt),
            "--results",
            _write(tmp_path / "dt.json", dts),
            "--iou-type",
            iou_type,
            "--json-out",
            str(out),
        ]
    )
    assert rc == 0
    ref = pycocotools_eval(gt, dts, iou_type)
    printed = capsys.readouterr().out
    # every table row "| a | b | c | d |" maps a -> b (and c -> d)
    cells = {}
    for line in printed.splitlines():
        if line.startswith("|") and not line.startswith("|:"):
            row = [c.strip() for c in line.strip().strip("|").split("|")]
            cells.update(zip(row[0::2], row[1::2], strict=True))
    for name, value in zip(coco_eval.STAT_NAMES, ref.stats, strict=True):
        assert cells[name] == ("n/a" if value < 0 else f"{100 * value:.2f}"), name
    precision = ref.eval["precision"]
    for k, cat in enumerate(CATEGORIES):
        p = precision[:, :, k, 0, -1]
        assert cells[cat["name"]] == f"{100 * p[p > -1].mean():.2f}"
    saved = json.loads(out.read_text())
    assert saved["iou_type"] == iou_type and saved["results"] == str(tmp_path / "dt.json")
    assert_matches(saved, ref)
    assert sorted(p.name for p in out.parent.iterdir()) == ["stats.json"]  # no temp files left


GOOD_GT = {
    "images": [{"id": 1, "height": 50, "width": 60}],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [5, 5, 20, 20],
            "area": 400,
            "iscrowd": 0,
            "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]],
        }
    ],
    "categories": [{"id": 1, "name": "a"}],
}
GOOD_DT = {"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.5}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


# (case, bad file, GT, results, extra args, words the message must contain)
ERROR_CASES = [
    ("malformed results JSON", "dt", GOOD_GT, '[{"image_id": 1,', [], "not valid JSON"),
    ("malformed GT JSON", "gt", "{'images': []}", [GOOD_DT], [], "not valid JSON"),
    ("results not a list", "dt", GOOD_GT, {"annotations": [GOOD_DT]}, [], "must be a JSON list"),
    ("detection not an object", "dt", GOOD_GT, [GOOD_DT, 3], [], "detection 1 is int"),
    (
        "missing score",
        "dt",
        GOOD_GT,
        [GOOD_DT, _without(GOOD_DT, "score")],
        [],
        "detection 1 lacks 'score'",
    ),
    ("missing image_id", "dt", GOOD_GT, [_without(GOOD_DT, "image_id")], [], "lacks 'image_id'"),
    (
        "unknown image_id",
        "dt",
        GOOD_GT,
        [GOOD_DT, {**GOOD_DT, "image_id": 99}, {**GOOD_DT, "image_id": 98}],
        [],
        "detection 1 names image_id 99, which is not in",
    ),
    (
        "unknown category_id",
        "dt",
        GOOD_GT,
        [{**GOOD_DT, "category_id": 2}],
        [],
        "names category_id 2",
    ),
    ("bbox of 3 numbers", "dt", GOOD_GT, [{**GOOD_DT, "bbox": [1, 2, 3]}], [], "4 numbers"),
    ("bbox of strings", "dt", GOOD_GT, [{**GOOD_DT, "bbox": ["1", 2, 3, 4]}], [], "4 numbers"),
    ("score not a number", "dt", GOOD_GT, [{**GOOD_DT, "score": "high"}], [], "not a number"),
    *[
        (f"{field} {value}", "dt", GOOD_GT, [GOOD_DT, bad], [], f"detection 1 has {words}")
        for field, value, bad, words in [
            ("score", "nan", {**GOOD_DT, "score": math.nan}, "score nan; scores must be finite"),
            ("score", "inf", {**GOOD_DT, "score": math.inf}, "score inf"),
            ("x", "nan", {**GOOD_DT, "bbox": [math.nan, 5, 20, 20]}, "bbox[0] (x) = nan"),
            ("height", "-inf", {**GOOD_DT, "bbox": [5, 5, 20, -math.inf]}, "bbox[3] (height)"),
            ("width", "-1", {**GOOD_DT, "bbox": [5, 5, -1, 20]}, "bbox[2] (width) = -1; width"),
            ("height", "-0.5", {**GOOD_DT, "bbox": [5, 5, 1, -0.5]}, "bbox[3] (height) = -0.5"),
            ("y", "1e400", {**GOOD_DT, "bbox": [5, 10**400, 1, 1]}, "bbox[1] (y) = 1000"),
        ]
    ],
    (
        "GT box with NaN",
        "gt",
        {**GOOD_GT, "annotations": [{**GOOD_GT["annotations"][0], "bbox": [5, 5, math.nan, 2]}]},
        [GOOD_DT],
        [],
        "annotations[0] has bbox[2] (width) = nan",
    ),
    (
        "segm without segmentation",
        "dt",
        GOOD_GT,
        [GOOD_DT],
        ["--iou-type", "segm"],
        "lacks 'segmentation'",
    ),
    (
        "segm RLE of another size",
        "dt",
        GOOD_GT,
        [{**_without(GOOD_DT, "bbox"), "segmentation": {"size": [10, 10], "counts": "PP"}}],
        ["--iou-type", "segm"],
        "RLE size",
    ),
    (
        "GT without annotations",
        "gt",
        _without(GOOD_GT, "annotations"),
        [GOOD_DT],
        [],
        "lacks 'annotations'",
    ),
    ("GT without images", "gt", _without(GOOD_GT, "images"), [GOOD_DT], [], "lacks 'images'"),
    (
        "GT without categories",
        "gt",
        _without(GOOD_GT, "categories"),
        [GOOD_DT],
        [],
        "lacks 'categories'",
    ),
    ("GT is a results list", "gt", [GOOD_DT], [GOOD_DT], [], "must be a JSON object"),
    (
        "GT annotation without area",
        "gt",
        {**GOOD_GT, "annotations": [_without(GOOD_GT["annotations"][0], "area")]},
        [GOOD_DT],
        [],
        "lacks 'area'",
    ),
    ("missing results file", "dt", GOOD_GT, None, [], "cannot read"),
    ("results file a named pipe", "dt", GOOD_GT, "fifo", [], "not a regular file"),
    *[(f"GT annotation {key} {value!r}", "gt",
       {**GOOD_GT, "annotations": [{**GOOD_GT["annotations"][0], key: value}]}, [GOOD_DT], [], words)
      for key, value, words in [
          ("id", [3], "annotations[0] has id [3]; an id is an integer"),
          ("category_id", 7, "annotations[0] names category_id 7, not in 'categories'"),
          ("area", "big", 'annotations[0] has area "big"; an area is a finite number >= 0'),
          ("area", -1, "annotations[0] has area -1"),
          ("iscrowd", "no", 'annotations[0] has iscrowd "no"; it is 0 or 1'),
      ]],
    ("GT image id a list", "gt", {**GOOD_GT, "images": [{**GOOD_GT["images"][0], "id": [1]}]},
     [GOOD_DT], [], "images[0] has id [1]; an id is an integer"),
    ("results image_id a list", "dt", GOOD_GT, [{**GOOD_DT, "image_id": [1]}], [],
     "detection 0 has image_id [1]; an id is an integer"),
]  # fmt: skip


@pytest.mark.timeout(120)  # the named pipe case hangs where it regresses
@pytest.mark.parametrize(
    "bad, gt, dts, extra, words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_cli_errors(tmp_path, capsys, bad, gt, dts, extra, words):
    gt_path = _write(tmp_path / "my_gt.json", gt)
    dt_path = str(tmp_path / "my_dt.json") if dts in (None, "fifo") else \
        _write(tmp_path / "my_dt.json", dts)
    if dts == "fifo":  # nobody writes: reading it would block for ever
        os.mkfifo(dt_path)
    out = tmp_path / "out" / "stats.json"
    rc = cli.main(
        ["coco-eval", "--gt", gt_path, "--results", dt_path, "--json-out", str(out), *extra]
    )
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("feataug coco-eval: error: ")
    assert (dt_path if bad == "dt" else gt_path) in lines[0]
    assert words in lines[0]
    assert not out.parent.exists()  # nothing written, not even the folder
    assert captured.out == ""


@pytest.mark.parametrize("iou_type", coco_eval.IOU_TYPES)
def test_empty_results_are_a_result(tmp_path, caplog, iou_type):
    """No detections: AP and AR 0 for the area ranges with ground truth, -1 for the others
    (GOOD_GT holds one 20x20 box: small), from both backends; a warning says why."""
    want = dict.fromkeys(coco_eval.STAT_NAMES, 0.0)
    want.update(APm=-1.0, APl=-1.0, ARm=-1.0, ARl=-1.0)
    for backend in coco_eval.BACKENDS:
        result = coco_eval.evaluate(GOOD_GT, [], iou_type, backend)
        assert result["stats"] == want and result["per_category"][0]["AP"] == 0.0, backend
    assert "no detections" in caplog.text
    gt, dt = _write(tmp_path / "gt.json", GOOD_GT), _write(tmp_path / "dt.json", [])
    out = tmp_path / "stats.json"
    argv = ["coco-eval", "--gt", gt, "--results", dt, "--iou-type", iou_type, "--json-out", out]
    assert cli.main(list(map(str, argv))) == 0
    assert json.loads(out.read_text())["stats"] == want


@pytest.mark.parametrize("backend", coco_eval.BACKENDS)
def test_non_finite_numbers_are_refused_by_both_backends(backend):
    for bad in ({**GOOD_DT, "score": math.nan}, {**GOOD_DT, "bbox": [5, 5, -2, 20]}):
        with pytest.raises(coco_eval.COCOEvalError, match=r"^results: detection 0 has "):
            coco_eval.evaluate(GOOD_GT, [bad], "bbox", backend)


def test_cli_unwritable_json_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "stats.json"  # its parent is a file
    rc = cli.main(
        [
            "coco-eval",
            "--gt",
            _write(tmp_path / "gt.json", GOOD_GT),
            "--results",
            _write(tmp_path / "dt.json", [GOOD_DT]),
            "--json-out",
            str(out),
        ]
    )
    assert rc == 2  # refused before the evaluation
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"--json-out {out}: cannot write: {blocker} is not a folder" in err[0]
    assert captured.out == ""


@pytest.mark.parametrize("target", ["gt", "results", "existing"])
def test_json_out_never_replaces_an_input_or_a_file_unasked(tmp_path, capsys, target):
    gt, dt = _write(tmp_path / "gt.json", GOOD_GT), _write(tmp_path / "dt.json", [GOOD_DT])
    (tmp_path / "old.json").write_text('{"stats": "last week"}')
    out = {"gt": gt, "results": dt, "existing": str(tmp_path / "old.json")}[target]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    argv = ["coco-eval", "--gt", gt, "--results", dt, "--json-out", out]
    assert cli.main([*argv, *(["--overwrite"] if target != "existing" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = f"is the --{target} file" if target != "existing" else "exists; use --overwrite"
    assert len(err) == 1 and err[0].startswith("feataug coco-eval: error: --json-out ") and want in err[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    if target == "existing":  # asked: replaced by the report
        assert cli.main([*argv, "--overwrite"]) == 0
        assert "stats" in json.loads((tmp_path / "old.json").read_text())
        assert json.loads((tmp_path / "old.json").read_text())["stats"] != "last week"


def test_the_good_inputs_pass(tmp_path):
    """The error cases above differ from a valid pair only in the named defect."""
    for iou_type, dts in [
        ("bbox", [GOOD_DT]),
        ("segm", [{**GOOD_DT, "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]]}]),
    ]:
        stats = coco_eval.evaluate(GOOD_GT, dts, iou_type)["stats"]
        assert stats["AP"] == pytest.approx(1.0)


def test_tools_script_is_the_command(tmp_path):
    import runpy

    gt_path = _write(tmp_path / "gt.json", GOOD_GT)
    dt_path = _write(tmp_path / "dt.json", [GOOD_DT])
    argv = ["tools/coco_eval.py", "--gt", gt_path, "--results", dt_path]
    script = Path(__file__).resolve().parents[1] / "tools" / "coco_eval.py"
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exit_:
        mp.setattr(sys, "argv", argv)
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_json_out_folder_is_refused_first(tmp_path, capsys, overwrite):
    gt, dt = _write(tmp_path / "gt.json", GOOD_GT), _write(tmp_path / "dt.json", [GOOD_DT])
    (tmp_path / "d").mkdir()
    line = refused(capsys, ["coco-eval", "--gt", gt, "--results", dt, "--json-out",
                            tmp_path / "d", *overwrite], keep=[tmp_path])
    assert line.endswith(f"--json-out {tmp_path / 'd'}: is a folder; give the output file's name")


def _dup_gt(kind: str) -> tuple[dict, dict, str]:
    """(GT with one id repeated, the same GT without the repetition, the words of its refusal).
    Two images, categories 1 and 3, annotations 5..8."""
    boxes = [[10, 10, 30, 30], [50, 40, 30, 20], [5, 60, 40, 30], [60, 5, 25, 25]]
    good = {
        "images": [{"id": i, "height": 100, "width": 100} for i in (1, 2)],
        "annotations": [{"id": 5 + k, "image_id": 1 + k // 2, "category_id": (1, 3)[k % 2],
                         "bbox": b, "area": float(b[2] * b[3]), "iscrowd": 0}
                        for k, b in enumerate(boxes)],
        "categories": [{"id": 1, "name": "tree"}, {"id": 3, "name": "car"}],
    }  # fmt: skip
    bad = copy.deepcopy(good)
    if kind == "annotation":
        bad["annotations"][3]["id"] = 7
        return bad, good, "annotation id 7 appears twice"
    if kind == "category":
        bad["categories"].append({"id": 3, "name": "bus"})
        return bad, good, "category id 3 appears twice"
    bad["images"].append({"id": 2, "height": 50, "width": 50})
    return bad, good, "image id 2 appears twice"


@pytest.mark.parametrize("kind", ["annotation", "category", "image"])
def test_repeated_ids_in_the_ground_truth_are_refused(kind, tmp_path, capsys):
    """A repeated id is refused, naming the file, the kind and the id; the file without the
    repetition gives pycocotools' AP (all detections exact: 100)."""
    bad, good, words = _dup_gt(kind)
    dts = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 0.9} for a in good["annotations"]]  # fmt: skip
    if kind == "annotation":  # what was reported before: pycocotools drops one of the two
        assert pycocotools_eval(bad, dts, "bbox").stats[0] < 0.99
    gt, dt = _write(tmp_path / "GT.json", bad), _write(tmp_path / "dt.json", dts)
    out = tmp_path / "stats.json"
    line = refused(capsys, ["coco-eval", "--gt", gt, "--results", dt, "--json-out", out],
                   keep=[tmp_path])
    assert line.endswith(f"error: {gt}: {words}")
    ref = pycocotools_eval(good, dts, "bbox")
    assert ref.stats[0] == pytest.approx(1.0)
    _write(tmp_path / "GT.json", good)
    assert cli.main(["coco-eval", "--gt", gt, "--results", dt, "--json-out", str(out)]) == 0
    stats = json.loads(out.read_text())["stats"]
    np.testing.assert_allclose([stats[k] for k in coco_eval.STAT_NAMES], ref.stats, atol=1e-6)


def test_non_ascii_names_print_on_an_ascii_console(tmp_path):
    """Under the C locale stdout is ASCII: the report escapes what it cannot encode and the
    JSON is written (UTF-8) with the names intact."""
    gt = copy.deepcopy(GOOD_GT)
    gt["categories"][0]["name"] = "\u00e9rable \u6811"
    gt_path, dt = _write(tmp_path / "gt.json", gt), _write(tmp_path / "dt.json", [GOOD_DT])
    out = tmp_path / "stats.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    env |= {"LC_ALL": "C", "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, "-m", "feataug.cli", "coco-eval", "--gt", gt_path,
                           "--results", dt, "--json-out", str(out)],
                          capture_output=True, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()
    assert b"| \\xe9rable \\u6811 " in proc.stdout  # escaped: no UnicodeEncodeError
    assert json.loads(out.read_bytes().decode("utf-8"))["per_category"][0]["name"] == "\u00e9rable \u6811"


# ---------------------------------------------------------------------------------------------
# Detectron2 evaluator
# ---------------------------------------------------------------------------------------------


def _fake_outputs(gt: dict, seed: int):
    """Detectron2 model outputs near the GT objects (contiguous class ids, boxes and masks)."""
    import torch
    from detectron2.structures import Boxes, Instances

    rng = np.random.default_rng(seed)
    contiguous = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    inputs, outputs = [], []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        boxes, classes = [], []
        for a in gt["annotations"]:
            if a["image_id"] == img["id"] and rng.random() < 0.85:
                x, y, bw, bh = np.array(a["bbox"]) + rng.normal(0, 0.1, 4) * np.tile(
                    a["bbox"][2:], 2
                )
                boxes.append([x, y, x + bw, y + bh])
                classes.append(contiguous[a["category_id"]])
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            boxes.append([x, y, x + rng.uniform(3, w / 2), y + rng.uniform(3, h / 2)])
            classes.append(int(rng.integers(0, len(CATEGORIES))))
        box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        box_t[:, 0::2] = box_t[:, 0::2].clamp(0, w)
        box_t[:, 1::2] = box_t[:, 1::2].clamp(0, h)
        ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
        # masks: the upper 80% of each box
        masks = [
            (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y0 + 0.8 * (y1 - y0))
            for x0, y0, x1, y1 in box_t
        ]
        masks = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(box_t)
        inst.scores = torch.tensor(rng.random(len(box_t)), dtype=torch.float32)
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
        inst.pred_masks = masks
        inputs.append({"image_id": img["id"], "height": h, "width": w})
        outputs.append({"instances": inst})
    return inputs, outputs


@pytest.mark.detectron2
def test_fast_evaluator_equals_detectron2_pycocotools(tmp_path, monkeypatch):
    pytest.importorskip("detectron2")
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, coco_evaluation

    from transfer.coco_eval import FastCOCOEvaluator

    assert issubclass(FastCOCOEvaluator, DatasetEvaluator)
    gt, _ = random_coco(5, n_images=10)
    name = f"_coco_eval_test_{tmp_path.name}"
    register_coco_instances(name, {}, _write(tmp_path / "gt.json", gt), str(tmp_path))
    try:
        DatasetCatalog.get(name)  # sets the id mapping in the metadata, as training does
        inputs, outputs = _fake_outputs(gt, seed=0)

        import faster_coco_eval

        calls = []  # iou types faster-coco-eval accumulated
        original = faster_coco_eval.COCOeval_faster.accumulate

        def counting_accumulate(self):
            calls.append(self.params.iouType)
            return original(self)

        monkeypatch.setattr(faster_coco_eval.COCOeval_faster, "accumulate", counting_accumulate)

        def run(evaluator) -> dict:
            evaluator.reset()
            evaluator.process(inputs, outputs)
            return evaluator.evaluate()

        ref = run(COCOEvaluator(name, ("bbox", "segm"), False, use_fast_impl=False))
        assert calls == []

        def never(*args, **kwargs):
            raise AssertionError("Detectron2's COCOeval_opt was used")

        monkeypatch.setattr(coco_evaluation, "COCOeval_opt", never)  # nothing of it is touched
        fast = run(FastCOCOEvaluator(name, ("bbox", "segm"), False, str(tmp_path / "fast")))
        assert sorted(calls) == ["bbox", "segm"]
        assert coco_evaluation.COCOeval_opt is never
        slow = run(FastCOCOEvaluator(name, None, False, use_fast_impl=False))  # tasks inferred
        assert sorted(calls) == ["bbox", "segm"]  # pycocotools: faster-coco-eval not called
        assert set(ref) == set(fast) == set(slow) == {"bbox", "segm"}
        for task in ("bbox", "segm"):
            assert set(ref[task]) == set(fast[task]) == set(slow[task])
            assert {"AP", "AP50", "APm", "AP-tree", "AP-car", "AP-person"} <= set(ref[task])
            assert 0 < ref[task]["AP"] < 100
            for k, v in ref[task].items():  # Detectron2 reports %, so 1e-6 becomes 1e-4
                for ours in (fast, slow):
                    same = math.isnan(v) and math.isnan(ours[task][k])
                    assert same or ours[task][k] == pytest.approx(v, abs=1e-4), k
        # the results file holds the dataset's category ids, as Detectron2 writes it
        written = json.loads((tmp_path / "fast" / "coco_instances_results.json").read_text())
        assert {d["category_id"] for d in written} <= {c["id"] for c in CATEGORIES}
        assert len(written) == sum(len(o["instances"]) for o in outputs)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
