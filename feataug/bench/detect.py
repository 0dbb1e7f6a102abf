"""Detection training: our trainer's iterations/s against plain Detectron2's ``DefaultTrainer``."""

from __future__ import annotations

import copy
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from feataug import configs_dir
from pretrain.utils.amp import cpu_has_native_bf16
from pretrain.utils.logger import setup_logging

from .harness import (
    DETECT_CONFIG,
    Profile,
    _bar,
    _module_version,
    interleave,
    paired_ratio,
    set_value,
)


def make_detection_images(folder: Path, n: int = 8, size: int = 384, seed: int = 0) -> list[dict]:
    """Detectron2 dataset records of ``n`` generated images (colored boxes on noise, 2 classes)."""
    import cv2
    import numpy as np
    from detectron2.structures import BoxMode

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        img = rng.integers(60, 200, size=(size, size, 3), dtype=np.uint8)
        anns = []
        for _ in range(int(rng.integers(2, 6))):
            w, h = (int(v) for v in rng.integers(size // 10, size // 3, size=2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            c = int(rng.integers(0, 2))
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), (220, 40, 40) if c else (40, 60, 220), -1)
            anns.append({"bbox": [x, y, x + w, y + h], "bbox_mode": BoxMode.XYXY_ABS, "category_id": c})
        path = folder / f"{i:04d}.jpg"
        cv2.imwrite(str(path), img)
        records.append({"file_name": str(path), "image_id": i, "height": size, "width": size,
                        "annotations": anns})
    return records


class _SteppedTrainer:
    """Drives a Detectron2 trainer one iteration at a time exactly as ``TrainerBase.train`` does
    (hooks' before_step, run_step, hooks' after_step), so two trainers can be interleaved."""

    def __init__(self, trainer):
        from detectron2.utils.events import EventStorage

        self.trainer = trainer
        trainer.resume_or_load(resume=False)
        trainer.iter = trainer.start_iter
        trainer.storage = EventStorage(trainer.start_iter)
        with trainer.storage:
            trainer.before_train()

    def iterations(self, n: int, seed: int) -> float:
        """Seconds per iteration over ``n`` iterations, all RNGs seeded with ``seed`` first (so
        both contenders draw the same input scales, flips and ROI samples)."""
        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        t = self.trainer
        with t.storage:
            start = time.perf_counter()
            for _ in range(n):
                t.before_step()
                t.run_step()
                t.after_step()
                t.iter += 1
            return (time.perf_counter() - start) / n

    def close(self) -> None:
        for h in self.trainer._hooks:
            for w in getattr(h, "_writers", []):
                w.close()


def bench_detect(profile: Profile, result: dict, say: Callable[[str], None]) -> None:
    """``feataug detect``'s trainer vs plain Detectron2 ``DefaultTrainer``, same config and data."""
    if _module_version("detectron2") is None:
        result["details"]["detect"] = {"skipped": "detectron2 is not installed (make setup)"}
        return
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.env import seed_all_rng

    from transfer.config import get_detection_cfg
    from transfer.trainer import Trainer

    # Detectron2 logs INFO to stdout unless its logger is set up: nowhere, so the output stays a bar
    setup_logging(("detectron2", "fvcore", "transfer", "d2"), console=False)
    name = "feataug_bench_train"
    with tempfile.TemporaryDirectory(prefix="feataug-bench-") as tmp:
        records = make_detection_images(Path(tmp))
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        MetadataCatalog.get(name).set(thing_classes=["blue box", "red box"])
        amp = cpu_has_native_bf16()
        opts = ["DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "DATASETS.AUTO_NUM_CLASSES", False,
                "MODEL.ROI_HEADS.NUM_CLASSES", 2, "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", 1000000,
                "OUTPUT_DIR", tmp]
        cfg = get_detection_cfg(configs_dir() / DETECT_CONFIG, opts)
        cfg.freeze()
        ours_cfg = cfg.clone()
        ours_cfg.defrost()
        ours_cfg.SOLVER.AMP.ENABLED = bool(cfg.SOLVER.AMP.ENABLED or amp)
        ours_cfg.freeze()
        setting = (f"{Path(DETECT_CONFIG).name}, {cfg.SOLVER.IMS_PER_BATCH} images/iter, {len(records)} "
                   f"generated {records[0]['width']}px images, ours "
                   f"{'bf16 autocast' if ours_cfg.SOLVER.AMP.ENABLED else 'fp32'}, Detectron2 fp32, "
                   f"{torch.get_num_threads()} threads")
        say(f"detection: {setting}")
        seed_all_rng(0)
        peer = _SteppedTrainer(DefaultTrainer(cfg))
        seed_all_rng(0)
        ours = _SteppedTrainer(Trainer(ours_cfg))
        n = profile.detect_iters
        seeds = {"ours": iter(range(10**6)), "detectron2": iter(range(10**6))}  # same per round
        contenders = {"ours": lambda: ours.iterations(n, next(seeds["ours"])),
                      "detectron2": lambda: peer.iterations(n, next(seeds["detectron2"]))}
        try:
            with _bar(2 * (profile.warmup + profile.repeats), "detection iterations") as bar:
                times = interleave(contenders, profile.repeats, profile.warmup, lambda _: bar.update())
        finally:
            ours.close()
            peer.close()
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    r = paired_ratio(times["detectron2"], times["ours"])  # iter/s ratio = inverse time ratio
    result["details"]["detect"] = {
        "repeats": profile.repeats, "iters_per_repeat": n, "setting": setting,
        "ours_iter_per_s": 1 / r["denominator_median"], "peer_iter_per_s": 1 / r["numerator_median"],
        "ratios": r["ratios"], "ours_s_per_iter": times["ours"], "peer_s_per_iter": times["detectron2"],
        "ours_amp": bool(ours_cfg.SOLVER.AMP.ENABLED),
    }
    set_value(result, "detect_iter_ratio_vs_detectron2", r["ratio"])
