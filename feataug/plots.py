"""Pictures of detection results: AP bars with error bars and each seed, and a test image with
ground truth and each start point's predictions (``feataug demo``)."""

from __future__ import annotations

import math
from pathlib import Path


def plot_bars(rows: dict[str, dict], out_png: Path, title: str) -> Path:
    """AP and AP50 per start point, mean ± sd over seeds, the seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain.utils.io import atomic_open

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("AP", "AP50"), strict=True):
        names = list(rows)
        means = [rows[n][metric]["mean"] for n in names]
        sds = [0 if math.isnan(rows[n][metric]["sd"]) else rows[n][metric]["sd"] for n in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=4, color=["0.6", "C0", "C1"][:len(names)])
        for i, n in enumerate(names):
            vals = rows[n][metric]["values"]
            ax.plot([i] * len(vals), vals, "k.", ms=5)
        ax.set_xticks(range(len(names)), names)
        ax.set(ylabel=f"{metric} (%)", title=f"{metric}, mean ± sd over seeds")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out_png


def predict(cfg, bgr_image):
    """The model of ``cfg`` (``MODEL.WEIGHTS``) on one image as OpenCV reads it (BGR), through
    Detectron2's ``DefaultPredictor``, which converts to ``INPUT.FORMAT`` and resizes as the
    evaluators do; its ``Instances`` on the CPU. The weights are checked and read as
    ``--eval-only`` reads them (``transfer.weights``: the whole model must load; nothing from the
    file runs), not by the predictor's own loader."""
    from detectron2.engine import DefaultPredictor

    from transfer.weights import check_weights, checkpointer_class

    check_weights(cfg, eval_only=True, from_scratch=False)
    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""  # the predictor loads nothing itself
    predictor = DefaultPredictor(bare)
    checkpointer_class()(predictor.model).load(cfg.MODEL.WEIGHTS)
    return predictor(bgr_image)["instances"].to("cpu")


def plot_predictions(out_png: Path, detect_dirs: dict[str, Path],
                     records: list[dict]) -> Path | None:
    """The busiest test image once per start point (shown at twice its size): ground truth in
    green, and in red as many of the highest-scoring predictions as there are ground-truth boxes,
    from each start point's first trial (its model as it was trained: the trial's
    ``config.yaml``, with the class count the data gave it, and ``model_final.pth``)."""
    import cv2
    import numpy as np
    import torch
    from detectron2.structures import BoxMode

    from pretrain.utils.io import atomic_write
    from transfer.config import get_detection_cfg

    record = max(records, key=lambda r: len(r["annotations"]))
    image = cv2.imread(record["file_name"])  # BGR
    panels = []
    for name, d in detect_dirs.items():
        weights, trained = d / "trial0" / "model_final.pth", d / "trial0" / "config.yaml"
        if not (weights.is_file() and trained.is_file()):
            return None
        cfg = get_detection_cfg(str(trained), [
            "MODEL.WEIGHTS", str(weights), "DATASETS.AUTO_NUM_CLASSES", "False",
            "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu"])
        instances = predict(cfg, image)
        canvas = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        for a in record["annotations"]:
            box = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
            x0, y0, x1, y1 = (int(round(2 * v)) for v in box)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 200, 0), 1)
        keep = instances.scores.argsort(descending=True)[:len(record["annotations"])]
        for x0, y0, x1, y1 in (2 * instances.pred_boxes.tensor[keep]).round().int().tolist():
            cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 0, 255), 2)
        cv2.putText(canvas, name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        panels.append(canvas)
    ok, png = cv2.imencode(".png", np.concatenate(panels, axis=1))
    atomic_write(out_png, lambda f: f.write(png.tobytes()))
    return out_png
