"""Pretraining data: folder / list / IDX sources, bad files, the sampler, the dataset's batches
(the augmentations themselves: tests/test_transforms.py).

Truths: arrays we wrote ourselves (lossless PNG, hand-built IDX bytes) and OpenCV's own resize
for the evaluation view's centre crop.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from pretrain import transforms as T
from pretrain.config import get_cfg
from pretrain.data import (
    DataError,
    ImageDataset,
    ResumableSampler,
    collate,
    decode_image,
    load_idx,
    load_source,
    read_idx,
)


def _smooth(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)


def _png(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _identity(img, rng):
    return img


# ----------------------------------------------------------------------------- sources
def test_folder_is_recursive_and_class_folders_give_labels(tmp_path):
    a, b, c = _smooth(seed=1), _smooth(seed=2), _smooth(seed=3)
    _png(tmp_path / "cat" / "x.png", a)
    _png(tmp_path / "cat" / "deep" / "y.PNG", b)
    _png(tmp_path / "dog" / "z.png", c)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    src = load_source(str(tmp_path), "folder")
    assert [p.split("/")[-1] for p in src.paths] == ["x.png", "y.PNG", "z.png"]
    assert src.classes == ["cat", "dog"] and src.labels == [0, 0, 1]
    for i, truth in enumerate([a, b, c]):
        np.testing.assert_array_equal(src.load(i), truth)


def test_flat_folder_is_unlabelled_and_max_images(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", _smooth(seed=i))
    src = load_source(str(tmp_path), "folder")
    assert src.labels == [-1, -1, -1] and src.classes == []
    assert len(load_source(str(tmp_path), "folder", max_images=2)) == 2


SCAN = ("import sys\nfrom pretrain.data import scan_folder\n"
        "print(*scan_folder(sys.argv[1]).paths, sep='\\n')")


def _scan(root) -> tuple[list[str], str]:
    """``scan_folder(root).paths`` and the log, from a process that must end within 120 s."""
    proc = subprocess.run([sys.executable, "-c", SCAN, str(root)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split(), proc.stderr


@pytest.mark.parametrize("links", [{"up": "..", "self": "."}, {"self": "."}],
                         ids=["up and self", "self"])
@pytest.mark.parametrize("where", ["", "cat"], ids=["in root", "in a class folder"])
def test_linked_folder_loops_are_scanned_once(tmp_path, links, where):
    root = tmp_path / "d"
    for i in range(4):
        _png(root / ("cat", "dog")[i % 2] / f"{i}.png", _smooth(seed=i))
    truth = sorted(str(p) for p in root.rglob("*.png"))
    for name, target in links.items():
        (root / where / name).symlink_to(target)
    paths, log = _scan(root)
    assert sorted(paths) == truth
    assert f"{root}: skipped {len(links)} linked folder(s) already scanned: " in log
    assert len(log.strip().splitlines()) == 1


def test_links_to_distinct_folders_are_followed(tmp_path):
    root, other = tmp_path / "d", tmp_path / "elsewhere"
    for i in range(2):
        _png(root / "cat" / f"{i}.png", _smooth(seed=i))
        _png(other / f"{i}.png", _smooth(seed=10 + i))
    (root / "dog").symlink_to(other)
    paths, log = _scan(root)
    assert paths == [str(root / d / f"{i}.png") for d in ("cat", "dog") for i in range(2)]
    assert log == ""
    (root / "dog2").symlink_to(other / ".." / "elsewhere")  # the same folder again: once
    paths2, log = _scan(root)
    assert paths2 == paths
    assert f"skipped 1 linked folder(s) already scanned: {root / 'dog2'}\n" in log


def test_list_file(tmp_path):
    _png(tmp_path / "imgs" / "a.png", _smooth(seed=1))
    _png(tmp_path / "b c.png", _smooth(seed=2))
    lst = tmp_path / "train.txt"
    lst.write_text(f"# comment\nimgs/a.png 1\n\n{tmp_path / 'b c.png'}\t0\n")
    src = load_source(str(lst), "list")
    assert src.paths == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "b c.png")]
    assert src.labels == [1, 0]
    np.testing.assert_array_equal(src.load(1), _smooth(seed=2))


@pytest.mark.parametrize("fmt", ["folder", "list", "idx"])
def test_empty_or_missing_dataset_is_a_clear_error(tmp_path, fmt):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    root = {"folder": empty, "list": tmp_path / "empty.txt", "idx": tmp_path / "e-images-idx3-ubyte"}[fmt]
    if fmt == "list":
        root.write_text("# nothing\n")
    if fmt == "idx":
        root.write_bytes(struct.pack(">BBBB3I", 0, 0, 8, 3, 0, 28, 28))
    with pytest.raises(DataError, match=f"{root}: no .* found"):
        load_source(str(root), fmt)
    with pytest.raises(DataError, match="nowhere"):
        load_source(str(tmp_path / "nowhere"), fmt)


def _write_idx(path, arr: np.ndarray, code: int, gz: bool):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_back_what_was_written(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, 0x08, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, 0x08, gz)
    src = load_idx(tmp_path)  # the folder: picks train-images
    np.testing.assert_array_equal(src.images, images)
    assert src.labels == [3, 1, 4, 1, 5] and len(src.classes) == 6
    rgb = src.load(2)
    assert rgb.shape == (28, 28, 3) and all((rgb[..., c] == images[2]).all() for c in range(3))
    # other IDX types, byte order handled
    ints = np.array([[1, -2], [70000, 5]], dtype=np.int32)
    _write_idx(tmp_path / "ints.idx", ints, 0x0C, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.idx"), ints)


def test_idx_corrupt_files_are_named(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"\x1f\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match=f"{bad}: not an IDX file"):
        read_idx(bad)
    short = tmp_path / "y-images-idx3-ubyte"
    _write_idx(short, np.zeros((2, 4, 4), np.uint8), 0x08, False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(DataError, match=f"{short}: IDX data has 29 bytes"):
        read_idx(short)
    cut = tmp_path / "z-images-idx3-ubyte.gz"
    cut.write_bytes(gzip.compress(short.read_bytes())[:-8])
    with pytest.raises(DataError, match=f"{cut}: cannot decompress"):
        read_idx(cut)


@pytest.mark.timeout(60)
def test_a_named_pipe_is_a_bad_file_not_a_hang(tmp_path):
    """A pipe among the images (or given as the IDX file) would block the reader for ever."""
    _png(tmp_path / "a.png", _smooth(seed=1))
    os.mkfifo(tmp_path / "b_pipe.jpg")
    src = load_source(str(tmp_path), "folder")
    assert [decode_image(p) is None for p in src.paths] == [False, True]
    assert ImageDataset(src, _identity)[1][2] == [1]  # replaced and reported like any bad file
    os.mkfifo(tmp_path / "pipe-images-idx3-ubyte")
    with pytest.raises(DataError, match="not a regular file"):
        read_idx(tmp_path / "pipe-images-idx3-ubyte")


# ----------------------------------------------------------------------------- bad files
def test_bad_files_are_replaced_by_the_next_good_one_and_reported(tmp_path):
    good1, good2 = _smooth(seed=1), _smooth(seed=2)
    _png(tmp_path / "a.png", good1)
    ok, buf = cv2.imencode(".jpg", good2)
    (tmp_path / "b_truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (tmp_path / "c_empty.jpg").write_bytes(b"")
    (tmp_path / "d_text.jpg").write_text("this is not a JPEG\n")
    _png(tmp_path / "e.png", good2)
    src = load_source(str(tmp_path), "folder")
    assert [decode_image(p) is None for p in src.paths] == [False, True, True, True, False]
    ds = ImageDataset(src, _identity)
    img, label, bad = ds[1]
    np.testing.assert_array_equal(img, good2)
    assert bad == [1, 2, 3] and label == -1
    img, _, bad = ds[0]
    np.testing.assert_array_equal(img, good1)
    assert bad == []


def test_only_bad_files_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("x")
    with pytest.raises(DataError, match="unreadable"):
        ImageDataset(load_source(str(tmp_path), "folder"), _identity)[0]


# ----------------------------------------------------------------------------- sampler
def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    s0, s1 = ResumableSampler(11, seed=5, rank=0, world_size=2), ResumableSampler(11, seed=5, rank=1, world_size=2)
    for s in (s0, s1):
        s.set_epoch(3)
    k0, k1 = s0.keys(), s1.keys()
    assert len(k0) == len(k1) == len(s0) == 5
    idx = [i for i, _ in k0] + [i for i, _ in k1]
    assert len(set(idx)) == 10 and set(idx) <= set(range(11))  # disjoint shards
    again = ResumableSampler(11, seed=5, rank=0, world_size=2)
    again.set_epoch(3)
    assert again.keys() == k0  # a fresh sampler replays the epoch exactly
    again.set_epoch(4)
    assert [i for i, _ in again.keys()] != [i for i, _ in k0]
    again.set_epoch(3, start=2)
    assert list(again) == k0[2:] and len(again) == 3
    # one augmentation seed per image, the same whichever rank gets the image
    single = ResumableSampler(11, seed=5)
    single.set_epoch(3)
    seeds = dict(single.keys())
    assert all(seeds[i] == s for i, s in k0 + k1)


def test_eval_transform_and_collate_batch(tmp_path):
    for i in range(3):
        _png(tmp_path / ("a" if i < 2 else "b") / f"{i}.png", _smooth(30, 50, seed=i))
    cfg = get_cfg()
    cfg.DATA.IMAGE_SIZE, cfg.DATA.ROOT = 32, str(tmp_path)
    from pretrain.data import build_dataset

    ds = build_dataset(cfg)
    (x1, x2), labels, bad = collate([ds[(i, 100 + i)] for i in range(3)])
    assert x1.shape == x2.shape == (3, 3, 32, 32) and x1.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1] and bad == []
    ev = ImageDataset(ds.source, T.build_eval_transform(32))
    x, labels, _ = collate([ev[i] for i in range(3)])
    assert x.shape == (3, 3, 32, 32)
    # center crop of the resized image: the middle pixel of a 30x50 image maps to the middle
    img = ds.source.load(0)
    big = cv2.resize(img, (round(50 * 37 / 30), 37), interpolation=cv2.INTER_LINEAR)
    top, left = (37 - 32) // 2, (big.shape[1] - 32) // 2
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), big[top : top + 32, left : left + 32])
