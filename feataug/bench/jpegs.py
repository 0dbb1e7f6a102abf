"""The JPEGs of ``feataug bench --gpu``: ImageNet-like files cut from real photos, in memory.

``load_photos`` finds the photos (``--images DIR``, or scikit-image's sample photos and, when
cached, the DeepForest tiles, both fetched by ``feataug.data.fetch``); ``synthesize_jpegs``
writes random crops of them with every core, reproducibly; ``memory_tmpdir`` picks a folder in
memory for them, so the loader's reads in the timed runs are page-cache speed.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .harness import BenchError


def load_photos(images: str | os.PathLike | None = None) -> tuple[list[np.ndarray], str]:
    """RGB uint8 photos to cut the JPEGs from, and where they came from."""
    import cv2

    from pretrain.data import decode_image

    if images is not None:
        from .aug import find_images

        paths, source = find_images(images)
        photos = [p for p in (decode_image(x) for x in paths) if p is not None]
        if not photos:
            raise BenchError(f"{images}: none of its image files could be decoded")
        return photos, source
    from feataug.data.deepforest import (
        DEEPFOREST_FILES,
        DEEPFOREST_PREFIX,
        DEEPFOREST_WHEEL,
        SKIMAGE_PHOTOS,
        SKIMAGE_PREFIX,
        SKIMAGE_WHEEL,
    )
    from feataug.data.fetch import cache_dir, fetch_pip, read_members
    from pretrain.errors import DataError

    try:
        files = read_members(fetch_pip(SKIMAGE_WHEEL), SKIMAGE_PREFIX, SKIMAGE_PHOTOS)
        source = "scikit-image sample photos"
        if (cache_dir() / DEEPFOREST_WHEEL.filename).is_file():
            pins = {k: v for k, v in DEEPFOREST_FILES.items() if not k.endswith(".xml")}
            files.update(read_members(fetch_pip(DEEPFOREST_WHEEL), DEEPFOREST_PREFIX, pins))
            source += " and DeepForest tiles"
    except DataError as e:
        raise BenchError(f"no photos to make the JPEGs from ({e}); pass --images DIR") from None
    photos = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB) for b in files.values()]
    return photos, f"{source} ({len(photos)} photos)"


_PHOTOS: list[np.ndarray] = []


def _init_writer(photos: list[np.ndarray]) -> None:
    import cv2

    cv2.setNumThreads(1)
    _PHOTOS[:] = photos


def _write_jpegs(args: tuple[str, range, tuple[int, int], int]) -> int:
    """Write JPEG k of ``ks``: a random crop (aspect of ``wh``, 35-100 % of the photo's largest
    such box) of photo k mod P, resized to ``wh``, flipped half the time; returns the bytes."""
    import cv2

    root, ks, (w, h), seed = args
    total = 0
    for k in ks:
        rng = np.random.default_rng((seed, k))
        photo = _PHOTOS[k % len(_PHOTOS)]
        ph, pw = photo.shape[:2]
        box_w = min(pw, ph * w / h)
        s = rng.uniform(0.35, 1.0)
        cw, ch = max(int(box_w * s), 8), max(int(box_w * s * h / w), 8)
        cw, ch = min(cw, pw), min(ch, ph)
        top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        img = cv2.resize(photo[top : top + ch, left : left + cw], (w, h),
                         interpolation=cv2.INTER_AREA if cw > w else cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 90])
        folder = Path(root) / f"n{k // 1000:04d}"
        folder.mkdir(exist_ok=True)
        (folder / f"{k:06d}.jpg").write_bytes(buf.tobytes())
        total += buf.size
    return total


def synthesize_jpegs(root: Path, n: int, photos: list[np.ndarray], wh: tuple[int, int] = (400, 350),
                     seed: int = 0, processes: int | None = None) -> dict:
    """``n`` JPEGs in ImageNet layout ``root/nXXXX/KKKKKK.jpg`` (1000 per folder), made by
    ``processes`` processes (default: every core); the same files for the same arguments."""
    import multiprocessing

    import pretrain.data  # noqa: F401  (one OpenCV thread: no thread pool to break by forking)

    chunks = [range(i, min(i + 256, n)) for i in range(0, n, 256)]
    processes = min(processes or len(os.sched_getaffinity(0)), len(chunks))
    start = time.perf_counter()
    fork = multiprocessing.get_context("fork")  # as the DataLoader's workers; they never use CUDA
    with ProcessPoolExecutor(processes, fork, initializer=_init_writer,
                             initargs=(photos,)) as pool:
        sizes = list(pool.map(_write_jpegs, [(str(root), c, wh, seed) for c in chunks]))
    return {"n": n, "width": wh[0], "height": wh[1], "quality": 90,
            "mean_kib": round(sum(sizes) / max(n, 1) / 1024, 1),
            "seconds": round(time.perf_counter() - start, 1), "processes": processes}


def memory_tmpdir(need_bytes: int = 0) -> str | None:
    """A folder in memory for the JPEGs: ``/dev/shm`` when it is a writable folder with twice
    ``need_bytes`` free (the loader workers' batches travel through it too; a container's is often
    64 MiB), else None (the system's temporary folder; the page cache then holds the files)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    return str(shm) if shutil.disk_usage(shm).free >= 2 * need_bytes else None
