"""``feataug demo``: the whole pipeline on real images, on a CPU, in minutes.

1. prepare DeepForest (real NEON aerial RGB, VOC boxes) from its PyPI wheel;
2. pretrain tiny MoCo v2 on unlabeled crops of the training images, without and with FA;
3. convert both checkpoints to Detectron2 weights;
4. fine-tune the tiny Faster R-CNN R18-FPN on the training tiles from {random init, MoCo v2,
   MoCo v2 + FA} and evaluate each on the held-out tiles (other sites, never seen in training);
5. print one table (AP, AP50) and write plots.

The profiles differ only in schedule lengths; both fit a 2-core laptop (``quick`` about 5 min,
``full`` about 20 min). Numbers from such short schedules show the pipeline working, not the
published gains, which need ImageNet-scale pretraining.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from feataug import REPO_ROOT
from pretrain.errors import FeatAugError

# schedule lengths per profile
PROFILES = {
    "quick": {"pretrain_iters": 50, "pretrain_batch": 16, "detect_iters": 60, "detect_batch": 2,
              "min_size": 224},
    "full": {"pretrain_iters": 250, "pretrain_batch": 16, "detect_iters": 250, "detect_batch": 2,
             "min_size": 224},
}
PRETRAIN_CONFIG = "configs/pretrain/tiny_moco_fa_r18.yaml"
DETECT_CONFIG = "configs/detection/tiny_faster_R18_FPN.yaml"
STARTS = ("random init", "MoCo v2", "MoCo v2 + FA")


class DemoError(FeatAugError):
    """A step of the demo failed in a way the user can act on."""


def _config_path(name: str) -> Path:
    """Config files ship in the repository next to the packages."""
    path = REPO_ROOT / name
    if not path.is_file():
        raise DemoError(f"{path}: config file not found (run the demo from a FeatAug checkout)")
    return path


class Stage:
    """Prints ``[k/n] title ...`` and the elapsed time when the block ends."""

    total = 5

    def __init__(self, k: int, title: str):
        self.k, self.title = k, title

    def __enter__(self):
        self.t0 = time.perf_counter()
        print(f"\n[{self.k}/{self.total}] {self.title}", flush=True)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"[{self.k}/{self.total}] done in {time.perf_counter() - self.t0:.0f} s", flush=True)


def pretrain(out: Path, data_root: Path, prof: dict, fa: bool, seed: int) -> Path:
    from pretrain.config import load_cfg
    from pretrain.engine import train

    opts = [
        "DATA.ROOT", str(data_root), "DATA.FORMAT", "folder", "OUTPUT_DIR", str(out),
        "SOLVER.MAX_ITER", str(prof["pretrain_iters"]), "SOLVER.EPOCHS", "1000", "SEED", str(seed),
        "SOLVER.BATCH_SIZE", str(prof["pretrain_batch"]),
        "FA.ENABLED", str(fa), "DATALOADER.NUM_WORKERS", "1", "LOG_PERIOD", "5",
        "SOLVER.WARMUP_EPOCHS", "0", "TENSORBOARD", "False",
    ]
    train(load_cfg(str(_config_path(PRETRAIN_CONFIG)), opts), resume=True)  # a rerun reuses it
    return out / "last.pth"


def convert(ckpt: Path, out: Path) -> Path:
    from transfer.convert import convert as convert_checkpoint

    convert_checkpoint(ckpt, out, overwrite=True)  # the demo owns its output folder
    return out


def detect(out: Path, voc_root: Path, weights: Path | None, prof: dict, seed: int) -> dict:
    from transfer.detect import run_detection

    iters = prof["detect_iters"]
    size = prof["min_size"]
    opts = [
        "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(weights or ""), "SEED", str(seed),
        "DATASETS.TRAIN", "('demo_trees_train',)", "DATASETS.TEST", "('demo_trees_test',)",
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({int(iters * 0.75)},)",
        "SOLVER.WARMUP_ITERS", str(max(1, iters // 5)), "SOLVER.IMS_PER_BATCH",
        str(prof["detect_batch"]), "INPUT.MIN_SIZE_TRAIN", f"({size - 32}, {size}, {size + 32})",
        "INPUT.MIN_SIZE_TEST", str(size), "TEST.PRECISE_BN.NUM_ITER", "5",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "200",
    ]
    registrations = [("demo_trees_train", str(voc_root), "train"),
                     ("demo_trees_test", str(voc_root), "test")]
    results = run_detection(_config_path(DETECT_CONFIG), opts, register_voc=registrations,
                            from_scratch=weights is None)
    bbox = results.get("bbox", {})
    return {"AP": float(bbox.get("AP", float("nan"))), "AP50": float(bbox.get("AP50", float("nan")))}


def format_table(rows: dict[str, dict]) -> str:
    lines = ["| start point | AP | AP50 |", "|---|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['AP']:.1f} | {r['AP50']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plots
def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written when the run ended
    return out


def plot_curves(out: Path, pretrain_dirs: dict[str, Path], detect_dirs: dict[str, Path]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in pretrain_dirs.items():
        rows = [r for r in _read_jsonl(d / "metrics.jsonl") if "loss_ssl" in r and "iter" in r]
        ax.plot([r["iter"] for r in rows], [r["loss_ssl"] for r in rows], label=name)
    ax.set(xlabel="iteration", ylabel="InfoNCE of the views (without the FA term)",
           title="Pretraining loss (tiny MoCo v2, DeepForest crops)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pretrain_loss.png", dpi=120)
    plt.close(fig)
    written.append(out / "pretrain_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in detect_dirs.items():
        rows = [r for r in _read_jsonl(d / "metrics.json") if "total_loss" in r]
        ax.plot([r["iteration"] for r in rows], [r["total_loss"] for r in rows], label=name)
    ax.set(xlabel="iteration", ylabel="total loss", title="Faster R-CNN R18-FPN fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "detect_loss.png", dpi=120)
    plt.close(fig)
    written.append(out / "detect_loss.png")
    return written


def plot_predictions(out_png: Path, detect_dir: Path, voc_root: Path, min_size: int) -> Path | None:
    """One held-out tile: ground truth in green, predictions (score ≥ 0.3) in red."""
    import cv2
    import torch

    from transfer.config import get_detection_cfg
    from transfer.datasets import load_voc

    weights = detect_dir / "model_final.pth"
    if not weights.is_file():
        return None
    from detectron2.engine import DefaultPredictor

    records = load_voc(str(voc_root), "test", ["tree"])
    record = max(records, key=lambda r: len(r["annotations"]))  # the busiest tile
    cfg = get_detection_cfg(str(_config_path(DETECT_CONFIG)), [
        "MODEL.WEIGHTS", str(weights), "MODEL.ROI_HEADS.NUM_CLASSES", "1",
        "INPUT.MIN_SIZE_TEST", str(min_size), "DATASETS.AUTO_NUM_CLASSES", "False",
        "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu",
    ])
    predictor = DefaultPredictor(cfg)
    image = cv2.imread(record["file_name"])  # BGR
    instances = predictor(image[:, :, ::-1].copy())["instances"].to("cpu")  # predictor wants RGB
    canvas = image.copy()
    for a in record["annotations"]:
        x0, y0, x1, y1 = (int(round(v)) for v in a["bbox"])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 200, 0), 1)
    keep = instances.scores >= 0.3
    for x0, y0, x1, y1 in instances.pred_boxes.tensor[keep].round().int().tolist():
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 0, 255), 2)
    cv2.imwrite(str(out_png), canvas)
    return out_png


# --------------------------------------------------------------------------------------- run
def run(profile: str = "quick", out: str | Path = "output/demo", data_root: str | None = None,
        seed: int = 0) -> dict:
    from feataug.data import default_root, prepare_deepforest
    from pretrain.utils.io import atomic_write_text

    prof = PROFILES[profile]
    out = Path(out) / profile
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    with Stage(1, "prepare DeepForest (real NEON aerial images) from its PyPI wheel"):
        prepare_deepforest(data_root)
        voc_root = Path(data_root or default_root()) / "deepforest"
        print(f"    train/test tiles and unlabeled crops under {voc_root}")

    pre_dirs = {"MoCo v2": out / "pretrain_moco", "MoCo v2 + FA": out / "pretrain_moco_fa"}
    with Stage(2, f"pretrain tiny MoCo v2 without / with FA ({prof['pretrain_iters']} iterations each)"):
        ckpts = {
            name: pretrain(d, voc_root / "unlabeled", prof, fa="FA" in name, seed=seed)
            for name, d in pre_dirs.items()
        }

    with Stage(3, "convert both checkpoints to Detectron2 weights"):
        weights: dict[str, Path | None] = {"random init": None}
        for name, ckpt in ckpts.items():
            weights[name] = convert(ckpt, ckpt.with_name("d2_weights.pkl"))

    det_dirs = {name: out / ("detect_" + name.lower().replace(" ", "_").replace("+", "plus"))
                for name in STARTS}
    results = {}
    with Stage(4, f"fine-tune + evaluate Faster R-CNN R18-FPN ({prof['detect_iters']} iterations "
                  "each) from three start points"):
        for name in STARTS:
            print(f"    -- {name}", flush=True)
            results[name] = detect(det_dirs[name], voc_root, weights[name], prof, seed)

    with Stage(5, "table and plots"):
        table = format_table(results)
        plots = plot_curves(out, pre_dirs, det_dirs)
        tile = plot_predictions(out / "test_tile_predictions.png", det_dirs["MoCo v2 + FA"], voc_root,
                                prof["min_size"])
        plots += [tile] if tile else []
        report = {"profile": profile, "seed": seed, "results": results,
                  "seconds": round(time.perf_counter() - t_start, 1),
                  "plots": [str(p) for p in plots]}
        atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "results.md", table + "\n")

    print(f"\nDeepForest held-out tiles (VOC AP, %), profile '{profile}', seed {seed}:\n")
    print(table)
    print(f"\nwall time {report['seconds']:.0f} s; plots and results in {out}/")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (about 5 min on 2 cores) or full (about 20 min)")
    parser.add_argument("--out", default="output/demo", help="output folder (default: output/demo)")
    parser.add_argument("--data-root", default=None,
                        help="datasets folder (default: $FEATAUG_DATA or ./datasets)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    try:
        run(args.profile, args.out, args.data_root, args.seed)
    except FeatAugError as e:
        print(f"feataug demo: error: {e}", file=sys.stderr)
        return 1
    return 0
