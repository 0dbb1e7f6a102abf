"""``feataug prepare-data``: the real registry datasets, checked against their sources.

The DeepForest wheel and the labelme sdist are fetched once per session from PyPI into a
temporary cache (the conversion itself works from the local files). Expected counts are
recomputed here from the source XML with plain loops, independently of ``feataug.data``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import tarfile
import uuid
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feataug import cli
from feataug import data as fd

TRAIN_STEM = "2019_YELL_2_528000_4978000_image_crop2"
TEST_STEMS = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029", "SOAP_061")
# (tiles, boxes) per split, recomputed by `_expected_tile_boxes` below from the source XML.
# train_tiles/test_tiles: the train tiles, every 4th in grid order held out.
EXPECTED = {"train": (36, 571), "test": (11, 375), "train_tiles": (27, 440), "test_tiles": (9, 131)}
# 128 px grid crops: YELL crop2 (2299x2472) 17*19 less the 129 that touch a held-out tile (counted
# by `test_deepforest_pretraining_crops_never_touch_a_held_out_tile`), SOAP_031 (400x400) 3*3,
# AWPE (1058x997) 8*7.
EXPECTED_UNLABELED = 17 * 19 - 129 + 3 * 3 + 8 * 7


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feataug-cache")


@pytest.fixture(scope="session")
def deepforest_wheel(cache):
    return fd.fetch_pip(fd.DEEPFOREST_WHEEL, cache)  # a failure raises DataError saying why


@pytest.fixture(scope="session")
def labelme_sdist(cache):
    return fd.fetch_pip(fd.LABELME_SDIST, cache)


@pytest.fixture(scope="module")
def deepforest_root(tmp_path_factory, deepforest_wheel):
    root = tmp_path_factory.mktemp("data")
    summary = fd.prepare_deepforest(root, source=deepforest_wheel, progress=False)
    assert summary["reused"] is False
    return root / "deepforest"


@pytest.fixture(scope="module")
def labelme_root(tmp_path_factory, labelme_sdist):
    root = tmp_path_factory.mktemp("data")
    fd.prepare_labelme(root, source=labelme_sdist)
    return root / "labelme"


def _source_xml(wheel, stem):
    """(width, height, [(xmin, ymin, xmax, ymax)]) straight from the wheel's XML."""
    with zipfile.ZipFile(wheel) as zf:
        root = ET.fromstring(zf.read(f"deepforest/data/{stem}.xml"))
    boxes = [
        tuple(int(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        for o in root.iter("object")
    ]
    return int(root.find("size/width").text), int(root.find("size/height").text), boxes


def _read_xml(path):
    root = ET.parse(path).getroot()
    size = (int(root.find("size/width").text), int(root.find("size/height").text))
    objs = [
        {
            "name": o.find("name").text,
            "difficult": o.find("difficult").text,
            "truncated": o.find("truncated").text,
            "box": tuple(
                int(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")
            ),
        }
        for o in root.iter("object")
    ]
    return size, objs


def _tiles(root):
    """{tile_id: (stem, x0, y0, width, height)} from the tile names and the JPEG sizes."""
    out = {}
    for jpg in sorted((root / "JPEGImages").glob("*.jpg")):
        stem, x0, y0 = jpg.stem.rsplit("_", 2)
        with Image.open(jpg) as im:
            out[jpg.stem] = (stem, int(x0), int(y0), *im.size)
    return out


def _expected_tile_boxes(box, tile):
    """The clipped box in tile coordinates if at least half of its area lies in the tile."""
    bx0, by0, bx1, by1 = box
    tx0, ty0, tw, th = tile
    cx0, cy0, cx1, cy1 = max(bx0, tx0), max(by0, ty0), min(bx1, tx0 + tw), min(by1, ty0 + th)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    if 2 * (cx1 - cx0) * (cy1 - cy0) < (bx1 - bx0) * (by1 - by0):
        return None
    return (cx0 - tx0, cy0 - ty0, cx1 - tx0, cy1 - ty0)


# --------------------------------------------------------------------------- geometry


def test_tile_grid_hand_values():
    assert fd.tile_grid(2299, 400) == [
        (0, 383),
        (383, 766),
        (766, 1149),
        (1149, 1532),
        (1532, 1915),
        (1915, 2299),
    ]
    assert fd.tile_grid(1035, 400) == [(0, 345), (345, 690), (690, 1035)]
    assert fd.tile_grid(400, 400) == [(0, 400)]
    assert fd.tile_grid(100, 400) == [(0, 100)]


def test_clip_boxes_keeps_boxes_at_least_half_inside():
    boxes = np.array(
        [
            [10, 10, 20, 20],  # inside
            [90, 0, 110, 10],  # exactly half inside: kept, clipped
            [95, 0, 115, 10],  # a quarter inside: dropped
            [100, 0, 120, 10],  # touches the edge only: dropped
            [60, 60, 140, 140],
        ]
    )  # a quarter inside: dropped
    kept, truncated, index = fd.clip_boxes(boxes, (0, 0, 100, 100))
    assert index.tolist() == [0, 1]
    assert kept.tolist() == [[10, 10, 20, 20], [90, 0, 100, 10]]
    assert truncated.tolist() == [False, True]
    kept, truncated, index = fd.clip_boxes(boxes, (100, 0, 200, 100))  # the right neighbour
    assert index.tolist() == [1, 2, 3]
    assert kept.tolist() == [[0, 0, 10, 10], [0, 0, 15, 10], [0, 0, 20, 10]]
    assert truncated.tolist() == [True, True, False]


# --------------------------------------------------------------------------- DeepForest


def test_deepforest_tiles_partition_each_source_image(deepforest_root, deepforest_wheel):
    tiles = _tiles(deepforest_root)
    for stem in (TRAIN_STEM, *TEST_STEMS):
        width, height, _ = _source_xml(deepforest_wheel, stem)
        mine = [t[1:] for t in tiles.values() if t[0] == stem]
        covered = np.zeros((height, width), dtype=np.int32)
        for x0, y0, w, h in mine:
            assert 300 <= w <= 450 or w == width, (stem, w)  # "about 400 px"
            covered[y0 : y0 + h, x0 : x0 + w] += 1
        assert (covered == 1).all(), f"{stem}: tiles overlap or leave gaps"


def test_deepforest_split_by_source_image(deepforest_root):
    main = deepforest_root / "ImageSets" / "Main"
    train = main.joinpath("train.txt").read_text().split()
    test = main.joinpath("test.txt").read_text().split()
    assert {t.rsplit("_", 2)[0] for t in train} == {TRAIN_STEM}
    assert {t.rsplit("_", 2)[0] for t in test} == set(TEST_STEMS)
    assert sorted(train + test) == sorted(_tiles(deepforest_root))
    assert (len(train), len(test)) == (EXPECTED["train"][0], EXPECTED["test"][0])


def test_deepforest_held_out_tiles_are_every_fourth_training_tile(deepforest_root):
    main = deepforest_root / "ImageSets" / "Main"
    train, train_tiles, test_tiles = (
        main.joinpath(f"{s}.txt").read_text().split() for s in ("train", "train_tiles", "test_tiles")
    )
    assert test_tiles == train[3::4] and sorted(train_tiles + test_tiles) == sorted(train)
    assert not set(train_tiles) & set(test_tiles)


def test_deepforest_pretraining_crops_never_touch_a_held_out_tile(deepforest_root):
    tiles = _tiles(deepforest_root)
    held = [tiles[t][1:] for t in
            (deepforest_root / "ImageSets" / "Main" / "test_tiles.txt").read_text().split()]
    grid = np.zeros((19 * 128, 17 * 128), bool)  # the training image's 128 px crop grid
    for x0, y0, w, h in held:
        grid[y0 : y0 + h, x0 : x0 + w] = True
    touching = {(r, c) for r in range(19) for c in range(17)
                if grid[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128].any()}
    kept = {tuple(int(v) for v in p.stem.rsplit("_", 2)[1:])
            for p in (deepforest_root / "unlabeled").glob(f"{TRAIN_STEM}_*.jpg")}
    assert len(touching) == 129 and not kept & touching
    assert len(kept) == 17 * 19 - len(touching)


def test_deepforest_boxes_match_an_independent_clip_of_the_source(
    deepforest_root, deepforest_wheel
):
    tiles = _tiles(deepforest_root)
    sources = {stem: _source_xml(deepforest_wheel, stem) for stem in (TRAIN_STEM, *TEST_STEMS)}
    counts = {"train": 0, "test": 0}
    for tile_id, (stem, x0, y0, w, h) in tiles.items():
        (width, height), objs = _read_xml(deepforest_root / "Annotations" / f"{tile_id}.xml")
        assert (width, height) == (w, h)
        expected = []
        for box in sources[stem][2]:
            clipped = _expected_tile_boxes(box, (x0, y0, w, h))
            if clipped is not None:
                expected.append((clipped, clipped != tuple(np.subtract(box, (x0, y0, x0, y0)))))
        # VOC corners are 1-based: xmin = x0 + 1.
        got = [
            ((o["box"][0] - 1, o["box"][1] - 1, o["box"][2], o["box"][3]), o["truncated"] == "1")
            for o in objs
        ]
        assert sorted(got) == sorted(expected), tile_id
        for o in objs:
            xmin, ymin, xmax, ymax = o["box"]
            assert 1 <= xmin < xmax <= width and 1 <= ymin < ymax <= height, (tile_id, o)
            assert (o["name"], o["difficult"]) == ("tree", "0")
        counts["train" if stem == TRAIN_STEM else "test"] += len(objs)
    assert counts == {"train": EXPECTED["train"][1], "test": EXPECTED["test"][1]}
    summary = json.loads((deepforest_root / fd.MARKER).read_text())
    assert {k: (v["images"], v["boxes"]) for k, v in summary["splits"].items()} == EXPECTED


def test_deepforest_tiles_hold_the_source_pixels(deepforest_root, deepforest_wheel):
    with zipfile.ZipFile(deepforest_wheel) as zf:
        source = np.asarray(
            Image.open(io.BytesIO(zf.read("deepforest/data/OSBS_029.png"))).convert("RGB")
        )
        big = np.asarray(
            Image.open(io.BytesIO(zf.read(f"deepforest/data/{TRAIN_STEM}.png"))).convert("RGB")
        )
    tile = np.asarray(Image.open(deepforest_root / "JPEGImages" / "OSBS_029_0000_0000.jpg"))
    # JPEG quality 95 without chroma subsampling: mean error ~3; a tile one pixel off gives ~24
    assert np.abs(tile.astype(int) - source).mean() < 5
    tile = np.asarray(Image.open(deepforest_root / "JPEGImages" / f"{TRAIN_STEM}_0766_0412.jpg"))
    assert np.abs(tile.astype(int) - big[412:824, 766:1149]).mean() < 5


def test_deepforest_coco_matches_voc(deepforest_root):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for split in EXPECTED:
        coco = COCO(str(deepforest_root / f"instances_{split}.json"))
        assert coco.loadCats(coco.getCatIds()) == [
            {"id": 1, "name": "tree", "supercategory": "tree"}
        ]
        ids = (deepforest_root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert [im["file_name"] for im in coco.loadImgs(coco.getImgIds())] == [
            f"{i}.jpg" for i in ids
        ]
        for image in coco.loadImgs(coco.getImgIds()):
            (w, h), objs = _read_xml(
                deepforest_root / "Annotations" / image["file_name"].replace(".jpg", ".xml")
            )
            assert (image["width"], image["height"]) == (w, h)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            assert sorted(a["bbox"] for a in anns) == sorted(
                [
                    o["box"][0] - 1,
                    o["box"][1] - 1,
                    o["box"][2] - o["box"][0] + 1,
                    o["box"][3] - o["box"][1] + 1,
                ]
                for o in objs
            )
            assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in anns)
    # The ground truth as detections scores AP 1.0.
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
    ]
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_deepforest_unlabeled_crops(deepforest_root):
    crops = sorted((deepforest_root / "unlabeled").glob("*.jpg"))
    assert len(crops) == EXPECTED_UNLABELED
    assert not any(c.name.startswith(TEST_STEMS) for c in crops)  # no held-out pixels
    for crop in crops[:: len(crops) // 10]:
        assert Image.open(crop).size == (128, 128)


@pytest.mark.detectron2
def test_voc_evaluator_on_deepforest_test_split(deepforest_root):
    result = _voc_ap_of_perfect_predictions(deepforest_root, "test", ["tree"])
    assert result == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})


# --------------------------------------------------------------------------- labelme


def _voc_ap_of_perfect_predictions(voc_dir, split, classes):
    """Register the VOC folder with Detectron2, feed its own boxes back as detections."""
    pytest.importorskip("detectron2")
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_pascal_voc
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    name = f"feataug_test_{uuid.uuid4().hex}"
    register_pascal_voc(name, str(voc_dir), split, 2007, classes)
    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        anns = record["annotations"]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(
            torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        )
        instances.scores = torch.ones(len(anns))
        instances.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    return dict(evaluator.evaluate()["bbox"])


def _labelme_member(sdist, path):
    with tarfile.open(sdist) as tf:
        return tf.extractfile(f"labelme-6.3.1/examples/{path}").read()


@pytest.mark.detectron2
def test_labelme_voc_passes_detectron2_voc_evaluator(labelme_root):
    classes = labelme_root.joinpath("labels.txt").read_text().split()
    assert classes == ["bus", "car", "person"]
    result = _voc_ap_of_perfect_predictions(labelme_root, "test", classes)
    assert result == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})


def test_labelme_voc_boxes_are_integer_and_close_to_the_source(labelme_root, labelme_sdist):
    n = 0
    for image_id in fd.LABELME_IDS:
        (w, h), objs = _read_xml(labelme_root / "Annotations" / f"{image_id}.xml")
        src = ET.fromstring(
            _labelme_member(
                labelme_sdist, f"bbox_detection/data_dataset_voc/Annotations/{image_id}.xml"
            )
        )
        src_objs = [
            (
                o.find("name").text,
                [float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")],
            )
            for o in src.iter("object")
        ]
        assert (w, h) == (int(src.find("size/width").text), int(src.find("size/height").text))
        assert Image.open(labelme_root / "JPEGImages" / f"{image_id}.jpg").size == (w, h)
        assert len(objs) == len(src_objs)
        for o, (name, (x0, y0, x1, y1)) in zip(objs, src_objs, strict=True):
            assert o["name"] == name and o["difficult"] == "0"
            # back in continuous coordinates, within rounding of the source's floats
            assert np.allclose(
                [o["box"][0] - 1, o["box"][1] - 1, o["box"][2], o["box"][3]],
                [x0, y0, x1, y1],
                atol=0.5,
            )
        n += len(objs)
    assert n == 9


def test_labelme_coco_polygons(labelme_root, labelme_sdist):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(labelme_root / "instances.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, 21))
    names = [c["name"] for c in cats]
    assert "_background_" not in names and "pottedplant" in names and "tvmonitor" in names
    assert names == list(fd.VOC_CLASSES)
    src = json.loads(
        _labelme_member(labelme_sdist, "instance_segmentation/data_dataset_coco/annotations.json")
    )
    src_names = {c["id"]: c["name"] for c in src["categories"]}
    src_files = {im["id"]: Path(im["file_name"]).name for im in src["images"]}
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(src["annotations"]) == 12
    for a, s in zip(anns, src["annotations"], strict=True):
        assert a["segmentation"] == s["segmentation"]
        assert (
            fd.voc_name(src_names[s["category_id"]]) == coco.loadCats(a["category_id"])[0]["name"]
        )
        assert coco.loadImgs(a["image_id"])[0]["file_name"] == src_files[s["image_id"]]
        xy = np.concatenate([np.reshape(p, (-1, 2)) for p in a["segmentation"]])
        assert np.allclose(a["bbox"], [*xy.min(0), *(xy.max(0) - xy.min(0))])
        assert np.allclose(a["bbox"], s["bbox"], atol=1.0)  # labelme's own (mask-pixel) box
        shoelace = sum(
            0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1)))
            for p in (np.reshape(q, (-1, 2)) for q in a["segmentation"])
        )
        assert a["area"] == pytest.approx(shoelace, rel=0.03)
    for image in coco.loadImgs(coco.getImgIds()):
        assert Image.open(labelme_root / "JPEGImages" / image["file_name"]).size == (
            image["width"],
            image["height"],
        )
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "segmentation": coco.annToRLE(a),
            "score": 1.0,
        }
        for a in anns
    ]
    ev = COCOeval(coco, coco.loadRes(dets), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- idempotence, errors


def test_labelme_coco_polygons_train_a_tiny_mask_rcnn(labelme_root, tmp_path):
    """The real labelme photos and polygons through Detectron2's COCO loader, polygon-to-mask
    targets, two Mask R-CNN R18-FPN steps and the COCO evaluator (bbox + segm)."""
    import math

    from transfer.detect import run_detection

    out = tmp_path / "out"
    root = labelme_root
    results = run_detection(
        Path(__file__).resolve().parents[1] / "configs/detection/tiny_mask_R18_FPN.yaml",
        ["DATASETS.TRAIN", "('labelme_smoke',)", "DATASETS.TEST", "('labelme_smoke',)",
         "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "SOLVER.STEPS", "(1,)", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "256",
         "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "256", "TEST.PRECISE_BN.NUM_ITER", "1",
         "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
         "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
         "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)],
        register_coco=[("labelme_smoke", root / "instances.json", root / "JPEGImages")],
        from_scratch=True,
    )  # fmt: skip
    assert {"bbox", "segm"} <= set(results)
    losses = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    mask_losses = [r["loss_mask"] for r in losses if "loss_mask" in r]
    assert mask_losses and all(math.isfinite(v) for v in mask_losses)


def test_prepared_dataset_is_reused_without_its_source(deepforest_root, tmp_path, monkeypatch):
    marker = deepforest_root / fd.MARKER
    before = marker.stat().st_mtime_ns
    monkeypatch.setenv("FEATAUG_CACHE", str(tmp_path / "empty-cache"))  # nothing to download from
    summary = fd.prepare_deepforest(deepforest_root.parent, source=tmp_path / "missing.whl")
    assert summary["reused"] is True
    assert marker.stat().st_mtime_ns == before
    assert not (tmp_path / "empty-cache").exists()


def test_failed_build_leaves_nothing_behind(tmp_path, labelme_sdist):
    bad = tmp_path / "labelme-6.3.1.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:  # the right name, the wrong content
        info = tarfile.TarInfo("labelme-6.3.1/examples/" + fd.LABELME_COCO)
        payload = b"{}"
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    root = tmp_path / "root"
    with pytest.raises(fd.DataError, match="does not contain"):
        fd.prepare_labelme(root, source=bad)
    assert list(root.iterdir()) == []
    (root / "labelme").mkdir()
    with pytest.raises(fd.DataError, match="not a prepared dataset"):
        fd.prepare_labelme(root, source=labelme_sdist)
    assert fd.prepare_labelme(root, source=labelme_sdist, force=True)["splits"]["voc"] == {
        "images": 3,
        "boxes": 9,
    }
    assert sorted(p.name for p in root.iterdir()) == ["labelme"]


def test_a_root_under_a_file_and_a_damaged_marker(tmp_path, labelme_sdist, capsys):
    (tmp_path / "file").write_text("not a folder")
    argv = ["prepare-data", "labelme", "--source", str(labelme_sdist), "--no-progress"]
    assert cli.main([*argv, "--root", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"feataug prepare-data: error: {tmp_path / 'file' / 'labelme'}: cannot be "
                   "created, a file stands in its path"]
    root = tmp_path / "root"
    assert cli.main([*argv, "--root", str(root)]) == 0
    (root / "labelme" / fd.MARKER).write_text("[]")  # valid JSON, not a summary: rebuilt
    assert fd.prepare_labelme(root, source=labelme_sdist)["reused"] is False


def test_tampered_source_is_a_clear_error(tmp_path, deepforest_wheel):
    bad = tmp_path / "deepforest.whl"
    with zipfile.ZipFile(deepforest_wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in fd.DEEPFOREST_FILES:
            payload = src.read(fd.DEEPFOREST_PREFIX + name)
            dst.writestr(
                fd.DEEPFOREST_PREFIX + name, payload + b" " if name == "OSBS_029.xml" else payload
            )
    with pytest.raises(fd.DataError, match=r"OSBS_029\.xml: sha256 .* does not match the pinned"):
        fd.prepare_deepforest(tmp_path / "root", source=bad, progress=False)


def test_cli_prepare_labelme_and_reuse(tmp_path, labelme_sdist, capsys):
    argv = ["prepare-data", "labelme", "--root", str(tmp_path), "--source", str(labelme_sdist)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.split()
    assert out[:3] == ["labelme:", "prepared", "in"] and out[-6:] == [
        "voc",
        "3",
        "9",
        "coco",
        "3",
        "12",
    ]
    assert cli.main(argv) == 0
    assert "already prepared" in capsys.readouterr().out


def test_cli_missing_source_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nope.whl"
    assert (
        cli.main(["prepare-data", "deepforest", "--root", str(tmp_path), "--source", str(missing)])
        == 2
    )
    err = capsys.readouterr().err
    assert err == f"feataug prepare-data: error: {missing}: no such file or directory\n"


def test_cli_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    # pip with no index and an empty find-links folder cannot find the wheel, as when offline
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("FEATAUG_CACHE", str(tmp_path / "cache"))
    assert cli.main(["prepare-data", "deepforest", "--root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "downloading deepforest==2.1.0 from PyPI ..."
    assert len(err) == 2 and err[1].startswith(
        "feataug prepare-data: error: `pip download --no-deps deepforest==2.1.0` failed"
    )
    assert "--source FILE" in err[1]
    assert not (tmp_path / "data" / "deepforest").exists()


# --------------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, seed=0):
    """Tiny IDX files with shuffled labels: 3 training and 2 test images per class."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, per_class in (("train", 3), ("t10k", 2)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        arrays[part] = (rng.integers(0, 256, (len(labels), 28, 28)), labels)
        (folder / f"{part}-images-idx3-ubyte.gz").write_bytes(_idx_bytes(arrays[part][0]))
        (folder / f"{part}-labels-idx1-ubyte.gz").write_bytes(_idx_bytes(arrays[part][1]))
    return arrays


def test_fashion_mnist_from_a_folder(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    arrays = _fake_fashion_mnist(src)
    pins = {p.name: fd.sha256_bytes(p.read_bytes()) for p in src.iterdir()}
    with pytest.raises(fd.DataError, match=r"train-images-idx3-ubyte\.gz: sha256"):
        fd.prepare_fashion_mnist(tmp_path / "root", source=src)  # the real pins reject fakes
    import feataug.data.fashion_mnist as fashion_mnist

    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SHA256", pins)
    fd.prepare_fashion_mnist(tmp_path / "root", source=src, knn_train=2, knn_val=1)
    out = tmp_path / "root" / "fashion-mnist"
    for name in pins:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    for part, folder, per_class in (("train", "train-knn", 2), ("t10k", "val-knn", 1)):
        images, labels = arrays[part]
        for label in range(10):
            class_dir = out / folder / f"{label}_{fd.FASHION_MNIST_CLASSES[label]}"
            first = [i for i in range(len(labels)) if labels[i] == label][:per_class]
            pngs = sorted(class_dir.glob("*.png"))
            assert [int(p.stem.split("_")[1]) for p in pngs] == first
            for p, i in zip(pngs, first, strict=True):
                assert np.array_equal(np.asarray(Image.open(p)), images[i])


def test_fashion_mnist_missing_and_truncated_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _fake_fashion_mnist(src)
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(fd.DataError, match=r"does not contain t10k-labels-idx1-ubyte\.gz"):
        fd.prepare_fashion_mnist(tmp_path / "root", source=src)
    data = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(fd.DataError, match=r"x.gz: IDX data has \d+ bytes, shape"):
        fd.read_idx(data[:-5], "x.gz")
    assert fd.read_idx(data, "x.gz").shape == (30, 28, 28)


def test_fashion_mnist_real_package(tmp_path):
    """The Debian package, installed or fetched with `apt-get download` (skipped without apt)."""
    try:
        source = fd.find_fashion_mnist(cache=tmp_path / "cache")
    except fd.DataError as e:
        pytest.skip(str(e))
    summary = fd.prepare_fashion_mnist(tmp_path / "root", source=source)
    assert summary["splits"] == {
        "train": {"images": 60000},
        "train-knn": {"images": 1000},
        "t10k": {"images": 10000},
        "val-knn": {"images": 500},
    }
    out = tmp_path / "root" / "fashion-mnist"
    raw = np.frombuffer(
        gzip.decompress((out / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
    )
    for png in (out / "val-knn").glob("*/*.png"):
        assert raw[int(png.stem.split("_")[1])] == int(png.parent.name.split("_")[0])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("dataset", ["fashion-mnist", "deepforest", "labelme"])
def test_home_that_is_a_file_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    """The download cache (~/.cache/feataug) cannot be made: refused before anything is written."""
    from conftest import refused

    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FEATAUG_CACHE", raising=False)
    root = tmp_path / "data"
    line = refused(capsys, ["prepare-data", dataset, "--root", root], keep=[tmp_path])
    assert line.endswith(f"download cache {home}/.cache/feataug: {home} is not a folder; set "
                         "FEATAUG_CACHE to a folder (or give --source)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no --root folder either
