"""Fashion-MNIST scenes: determinism, split separation, tight boxes, the VOC and COCO files.

Truths: garments re-rendered here from the arrays each annotation names (PIL bilinear scaling,
values below MIN_INK cleared) and the pixels of the saved PNG on a black background; box
coverage recomputed with plain loops; pycocotools', Detectron2's and transfer.datasets' readers
of the written files. Synthetic garments (blobs, some in two pieces, with sub-MIN_INK specks)
keep the tests independent of the Debian package; one test also runs on the real files when
``dataset-fashion-mnist`` is installed.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import refused, tree_hashes
from PIL import Image

from feataug import cli
from feataug.data import FASHION_MNIST_CLASSES, DataError, find_fashion_mnist
from feataug.data import scenes as sc

CANVAS = 96


def _garments(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic 28 x 28 garments: one or two bright rectangles, a faint speck that
    scaling must drop, labels cycling through the 10 classes."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    for k in range(n):
        for _ in range(1 + k % 2):
            y0, x0 = rng.integers(2, 18, 2)
            h, w = rng.integers(4, 10, 2)
            images[k, y0 : y0 + h, x0 : x0 + w] = rng.integers(60, 256)
        images[k, 0, 27] = sc.MIN_INK // 4  # far off the blobs, below MIN_INK once scaled
    return images, np.arange(n) % 10


@pytest.fixture(scope="module")
def arrays():
    return {"train": _garments(40, 1), "test": _garments(25, 2)}


def _build(root, arrays, **kw):
    kw = {"train_scenes": 8, "test_scenes": 6, "canvas": CANVAS, **kw}
    sc.prepare_fmnist_scenes(root, arrays=arrays, **kw)
    return Path(root) / sc.NAME


@pytest.fixture(scope="module")
def black(tmp_path_factory, arrays):
    return _build(tmp_path_factory.mktemp("black"), arrays, background="black")


def _coco(out, split):
    return json.loads((out / "annotations" / f"{split}.json").read_text())


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _render(image: np.ndarray, size: int) -> np.ndarray:
    scaled = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return scaled * (scaled >= sc.MIN_INK)


def _by_image(coco):
    out = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        out[a["image_id"]].append(a)
    return out


def test_deterministic_from_the_seed(tmp_path, arrays):
    a = _build(tmp_path / "a", arrays)
    b = _build(tmp_path / "b", arrays)
    c = _build(tmp_path / "c", arrays, seed=1)
    fewer = _build(tmp_path / "d", arrays, train_scenes=3, test_scenes=2)
    for split in ("train", "test"):
        json_a = a / "annotations" / f"{split}.json"
        assert _sha(json_a) == _sha(b / "annotations" / f"{split}.json")
        assert _sha(json_a) != _sha(c / "annotations" / f"{split}.json")
        # a scene does not depend on how many are built
        assert _coco(fewer, split)["annotations"] == [
            x for x in _coco(a, split)["annotations"] if x["image_id"] <= (3, 2)[split == "test"]
        ]
    names = sorted(p.name for p in (a / "JPEGImages").iterdir())
    assert len(names) == 14
    for name in names:
        assert _sha(a / "JPEGImages" / name) == _sha(b / "JPEGImages" / name)
    assert _sha(a / "JPEGImages" / names[0]) != _sha(c / "JPEGImages" / names[0])
    # the texture background is not black, and differs between scenes
    pix = np.asarray(Image.open(a / "JPEGImages" / names[0]))
    assert pix.shape == (CANVAS, CANVAS, 3) and (pix > 0).mean() > 0.9
    assert (pix[..., 0] == pix[..., 1]).all() and (pix[..., 0] == pix[..., 2]).all()


def test_garments_come_from_their_own_split_and_boxes_are_tight(black, arrays):
    """Every box is the tight box of its re-rendered garment; where no other box touches it the
    saved pixels are non-zero exactly on that garment's support, which ties each annotation to
    the split and index it names."""
    checked = 0
    for split, (images, labels) in arrays.items():
        coco = _coco(black, split)
        assert {a["source_index"] for a in coco["annotations"]} <= set(range(len(images)))
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        for image_id, anns in _by_image(coco).items():
            pix = np.asarray(Image.open(black / "JPEGImages" / files[image_id]))[..., 0]
            for a in anns:
                g = _render(images[a["source_index"]], a["frame"][2])
                ys, xs = np.nonzero(g)
                x, y = a["frame"][:2]
                left, top = x + xs.min(), y + ys.min()
                right, bottom = x + xs.max() + 1, y + ys.max() + 1
                assert a["bbox"] == [left, top, right - left, bottom - top]
                assert a["category_id"] == labels[a["source_index"]] + 1
                x0, y0, w, h = (int(v) for v in a["bbox"])
                others = [o["bbox"] for o in anns if o is not a]
                if any(
                    ox < x0 + w + 1 and x0 - 1 < ox + ow and oy < y0 + h + 1 and y0 - 1 < oy + oh
                    for ox, oy, ow, oh in others
                ):
                    continue
                support = np.zeros_like(pix, bool)
                support[y : y + g.shape[0], x : x + g.shape[1]] = g > 0
                window = np.s_[max(y0 - 1, 0) : y0 + h + 1, max(x0 - 1, 0) : x0 + w + 1]
                assert ((pix[window] > 0) == support[window]).all()
                checked += 1
    assert checked >= 20


def test_objects_stay_visible(black):
    for split in ("train", "test"):
        for anns in _by_image(_coco(black, split)).values():
            assert sc.MIN_OBJECTS <= len(anns) <= sc.MAX_OBJECTS
            for a in anns:
                x0, y0, w, h = (int(v) for v in a["bbox"])
                assert 0 <= x0 and 0 <= y0 and x0 + w <= CANVAS and y0 + h <= CANVAS
                covered = 0
                for yy in range(y0, y0 + h):
                    for xx in range(x0, x0 + w):
                        covered += any(
                            ox <= xx < ox + ow and oy <= yy < oy + oh
                            for ox, oy, ow, oh in (o["bbox"] for o in anns if o is not a)
                        )
                assert covered <= sc.MAX_COVER * w * h


def test_coco_and_voc_files_hold_the_same_boxes(black):
    from detectron2.data.datasets import load_coco_json
    from pycocotools.coco import COCO

    from transfer.datasets import load_voc

    classes = (black / "labels.txt").read_text().split()
    assert classes == list(FASHION_MNIST_CLASSES)
    for split in ("train", "test"):
        path = black / "annotations" / f"{split}.json"
        coco = COCO(str(path))
        assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == classes
        want = {
            Path(coco.imgs[i]["file_name"]).stem: sorted(
                (a["category_id"] - 1, x0, y0, x0 + w, y0 + h)
                for a in coco.loadAnns(coco.getAnnIds(imgIds=i))
                for x0, y0, w, h in [a["bbox"]]
            )
            for i in coco.getImgIds()
        }
        assert len(want) == len((black / "ImageSets/Main" / f"{split}.txt").read_text().split())
        voc = {
            r["image_id"]: sorted((a["category_id"], *a["bbox"]) for a in r["annotations"])
            for r in load_voc(black, split, classes)
        }
        assert voc == want
        d2 = load_coco_json(str(path), str(black / "JPEGImages"), f"scenes_{split}")
        for r in d2:
            x = sorted((a["category_id"], *a["bbox"]) for a in r["annotations"])
            xyxy = [(c, x0, y0, x0 + w, y0 + h) for c, x0, y0, w, h in x]
            assert sorted(xyxy) == want[Path(r["file_name"]).stem]
        xml = ET.parse(black / "Annotations" / f"{split}_00000.xml").getroot()
        assert xml.findtext("filename") == f"{split}_00000.png"
        assert xml.findtext("size/width") == str(CANVAS)


def test_bad_input_writes_nothing(tmp_path, arrays):
    images, labels = arrays["train"]
    bad = {"train": (images[:, :20], labels), "test": arrays["test"]}
    with pytest.raises(DataError, match=r"train-images/labels: shapes"):
        sc.prepare_fmnist_scenes(tmp_path, arrays=bad, train_scenes=2, test_scenes=2)
    with pytest.raises(DataError, match=r"--canvas 40"):
        sc.prepare_fmnist_scenes(tmp_path, arrays=arrays, canvas=40)
    assert list(tmp_path.iterdir()) == []
    _build(tmp_path, arrays, train_scenes=2, test_scenes=2)
    before = tree_hashes(tmp_path)
    with pytest.raises(DataError, match="prepared with other settings"):
        _build(tmp_path, arrays, train_scenes=2, test_scenes=2, seed=5)
    assert tree_hashes(tmp_path) == before
    again = sc.prepare_fmnist_scenes(
        tmp_path, arrays=arrays, train_scenes=2, test_scenes=2, canvas=CANVAS
    )
    assert again["reused"] is True


def _debian_folder():
    try:
        return find_fashion_mnist(Path("/nonexistent-feataug-cache"))
    except (DataError, OSError):
        return None


@pytest.mark.skipif(_debian_folder() is None, reason="dataset-fashion-mnist is not installed")
def test_cli_builds_from_the_debian_package(tmp_path, capsys):
    args = ["prepare-data", "fmnist-scenes", "--root", str(tmp_path), "--train-scenes", "3",
            "--test-scenes", "2", "--seed", "4", "--canvas", "128"]  # fmt: skip
    assert cli.main(args) == 0
    assert "prepared in" in capsys.readouterr().out
    out = tmp_path / sc.NAME
    summary = json.loads((out / "prepared.json").read_text())
    assert summary["settings"]["seed"] == 4 and summary["splits"]["test"]["images"] == 2
    real = sc.read_fashion_mnist(_debian_folder())
    assert [len(real[s][0]) for s in ("train", "test")] == [60000, 10000]
    for split in ("train", "test"):
        images, labels = real[split]
        for a in _coco(out, split)["annotations"]:
            g = _render(images[a["source_index"]], a["frame"][2])
            ys, xs = np.nonzero(g)
            assert a["bbox"][:2] == [a["frame"][0] + xs.min(), a["frame"][1] + ys.min()]
            assert a["category_id"] == labels[a["source_index"]] + 1
    assert cli.main(args) == 0
    assert "already prepared" in capsys.readouterr().out
    assert "prepared with other settings" in refused(capsys, [*args[:-1], "160"], keep=[tmp_path])
