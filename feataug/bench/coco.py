"""COCO evaluation: our backend against pycocotools, speed and the 12 stats."""

from __future__ import annotations

import time
from collections.abc import Callable

from .harness import (
    Profile,
    _bar,
    interleave,
    paired_ratio,
    set_value,
)


def synthetic_coco(n_images: int, dets_per_image: int = 100, n_categories: int = 20,
                   seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO ground truth (640x480 images, 1-15 boxes each) and exactly ``dets_per_image``
    detections per image: jittered copies of the ground truth (sometimes with the wrong class)
    and random boxes, with random scores; coordinates rounded to 0.01 px like real results."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w_img, h_img = 640, 480
    images = [{"id": i + 1, "width": w_img, "height": h_img, "file_name": f"{i + 1:06d}.jpg"}
              for i in range(n_images)]
    categories = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(n_categories)]
    annotations, dts = [], []
    for img in images:
        k = int(rng.integers(1, 16))
        wh = rng.uniform(8, 200, size=(k, 2))
        xy = rng.uniform(0, 1, size=(k, 2)) * ([w_img, h_img] - wh)
        cats = rng.integers(1, n_categories + 1, size=k)
        for (x, y), (w, h), c in zip(xy.tolist(), wh.tolist(), cats.tolist(), strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"], "category_id": c,
                                "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                                "area": round(w * h, 2), "iscrowd": 0})
        n_true = min(dets_per_image // 2, 3 * k)
        src = rng.integers(0, k, size=n_true)
        jitter = rng.normal(0, 0.08, size=(n_true, 4)) * np.repeat(wh[src], 2, axis=1)
        boxes = np.concatenate([xy[src], wh[src]], axis=1) + jitter
        dcats = np.where(rng.uniform(size=n_true) < 0.8, cats[src],
                         rng.integers(1, n_categories + 1, size=n_true))
        n_rand = dets_per_image - n_true
        rwh = rng.uniform(8, 200, size=(n_rand, 2))
        rxy = rng.uniform(0, 1, size=(n_rand, 2)) * ([w_img, h_img] - rwh)
        boxes = np.concatenate([boxes, np.concatenate([rxy, rwh], axis=1)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        dcats = np.concatenate([dcats, rng.integers(1, n_categories + 1, size=n_rand)])
        scores = rng.uniform(0.01, 1.0, size=dets_per_image)
        for b, c, s in zip(boxes.round(2).tolist(), dcats.tolist(), scores.round(4).tolist(),
                           strict=True):
            dts.append({"image_id": img["id"], "category_id": c, "bbox": b, "score": s})
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, dts


def bench_coco_eval(profile: Profile, result: dict, say: Callable[[str], None]) -> None:
    """``transfer.coco_eval.run_cocoeval`` with our backend vs with pycocotools, same inputs."""
    import numpy as np

    from transfer.coco_eval import available_backend, run_cocoeval

    ours_backend = available_backend()
    if ours_backend == "pycocotools":
        result["details"]["coco_eval"] = {"skipped": "faster-coco-eval is not installed"}
        return
    n = profile.coco_images
    gt, dts = synthetic_coco(n)
    say(f"COCO eval: {n} images x 100 detections (bbox), {ours_backend} vs pycocotools")
    stats: dict[str, np.ndarray] = {}

    def measure(backend: str) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            ev = run_cocoeval(gt, dts, "bbox", backend=backend)
            elapsed = time.perf_counter() - start
            stats[backend] = np.asarray(ev.stats[:12], dtype=np.float64)
            return elapsed

        return run

    contenders = {"pycocotools": measure("pycocotools"), "ours": measure(ours_backend)}
    with _bar(2 * profile.coco_repeats, "COCO eval") as bar:
        times = interleave(contenders, profile.coco_repeats, 0, lambda _: bar.update())
    r = paired_ratio(times["pycocotools"], times["ours"])
    diff = float(np.max(np.abs(stats["pycocotools"] - stats[ours_backend])))
    result["details"]["coco_eval"] = {
        "repeats": profile.coco_repeats, "n_images": n, "dets_per_image": 100,
        "n_detections": len(dts), "n_gt": len(gt["annotations"]), "ours_backend": ours_backend,
        "ours_s": r["denominator_median"], "peer_s": r["numerator_median"], "ratios": r["ratios"],
        "ours_times_s": times["ours"], "peer_times_s": times["pycocotools"],
        "stats": stats[ours_backend].tolist(), "peer_stats": stats["pycocotools"].tolist(),
        "includes": "loadRes + evaluate + accumulate + summarize",
    }
    set_value(result, "coco_eval_ratio_vs_pycocotools", r["ratio"])
    set_value(result, "coco_eval_stats_max_abs_diff", diff)
