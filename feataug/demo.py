"""``feataug demo``: does self-supervised pretraining show in detection? On a CPU, in minutes.

1. prepare Fashion-MNIST (Debian's package) and the Fashion-MNIST scenes detection benchmark
   (``feataug prepare-data fmnist-scenes``: 50 labelled training scenes made of training-split
   garments, 200 test scenes made of test-split garments);
2. pretrain MoCo v2 on the 60k Fashion-MNIST training images (``full``: also with FA);
3. convert the trunks to Detectron2 weights;
4. fine-tune Faster R-CNN R18-FPN on the training scenes from each start point (random init,
   MoCo v2, and in ``full`` MoCo v2 + FA), three seeds each, and evaluate COCO AP / AP50 on the
   test scenes;
5. (``full``, ``trees``) the real-photo case: DeepForest aerial tiles, random init vs MoCo v2
   pretrained on unlabeled crops of the training photo, evaluated on its held-out tiles
   (``trees``: this case alone, with a schedule long enough for random init to learn it);
6. print the table (mean ± sd over seeds, the Δ against random init paired by seed, and the
   claim rule's verdict for each Δ) and write plots: the table as bars with error bars, and test
   images with ground truth and predictions.

``quick`` spends its five minutes on the one question it can answer: random init against MoCo v2,
three seeds each (the fewest the claim rule accepts), 80 fine-tuning iterations; ``full`` adds
MoCo v2 + FA and the real-photo case. ``--seed S`` moves every seed (pretraining ``S``,
fine-tuning ``S``, ``S + 1``, ...), so a second run is an independent draw.

The console shows a header, one line and a progress bar per stage, and the table; the
pretraining and Detectron2 logs go to files under the output folder (``-v`` prints them too).
Budgets on an idle 2-core machine: ``quick`` ≤ 5 min, ``full`` and ``trees`` ≤ 20 min each
(measured: README).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from feataug import CONFIGS_ENV, configs_dir
from feataug.plots import plot_bars, plot_predictions
from pretrain.errors import FeatAugError
from pretrain.utils.stats import claim, format_pm, mean_std

# in FeatAug's config folder (feataug.configs_dir)
PRETRAIN_CONFIG = "pretrain/fmnist_moco_r18.yaml"
SCENES_CONFIG = "detection/scenes_faster_R18_FPN.yaml"
TREES_PRETRAIN_CONFIG = "pretrain/tiny_moco_fa_r18.yaml"
TREES_CONFIG = "detection/tiny_faster_R18_FPN.yaml"
STARTS = ("random init", "MoCo v2", "MoCo v2 + FA")
VERDICT_SEEDS = 3  # the claim rule needs three seeds
# The FA variant of the demo: MoCHi's hard negatives after a warm-up of a quarter of the run
# (the FA setting that did not hurt kNN in the CPU study, docs/study.md).
FA_OPTS = ["FA.ENABLED", "True", "FA.OP", "hardmix", "FA.ROLE", "negative",
           "FA.LOSS_MODE", "replace", "FA.START", "0.25"]


@dataclass(frozen=True)
class Profile:
    pretrain_iters: int  # MoCo v2 iterations on Fashion-MNIST (batch 64, 32 px)
    detect_iters: int  # Faster R-CNN iterations on the scenes
    detect_batch: int
    seeds: int  # fine-tuning seeds per start point
    trees: bool  # the DeepForest case
    starts: tuple[str, ...] = STARTS  # the scenes' start points (a pretraining for each but the first)
    scenes: bool = True  # the Fashion-MNIST scenes (stages 2-4)
    trees_pretrain_iters: int = 0
    trees_detect_iters: int = 0


PROFILES = {
    # Five minutes on 2 cores: one pretraining, two start points, three seeds (the rule needs 3);
    # 80 fine-tuning iterations: with fewer the detector stays near AP 1, where no effect passes.
    "quick": Profile(pretrain_iters=300, detect_iters=80, detect_batch=4, seeds=3, trees=False,
                     starts=STARTS[:2]),
    "full": Profile(pretrain_iters=300, detect_iters=70, detect_batch=8, seeds=3, trees=True,
                    trees_pretrain_iters=150, trees_detect_iters=120),
    # DeepForest alone, with a schedule long enough for random init to learn it (≤ 20 min).
    "trees": Profile(pretrain_iters=0, detect_iters=0, detect_batch=0, seeds=1, trees=True,
                     scenes=False, trees_pretrain_iters=300, trees_detect_iters=1000),
}


class DemoError(FeatAugError):
    """A step of the demo failed in a way the user can act on."""


def _config_path(name: str) -> Path:
    """``name`` in FeatAug's config folder (the package's, or ``$FEATAUG_CONFIGS``)."""
    path = configs_dir() / name
    if not path.is_file():
        raise DemoError(f"{path}: config file not found (FeatAug's configs ship with the "
                        f"package; {CONFIGS_ENV} names another folder)")
    return path


class Stage:
    """Prints ``[k/n] title`` and, when the block ends, the elapsed time on the same line."""

    def __init__(self, k: int, total: int, title: str):
        self.k, self.total, self.title = k, total, title

    def __enter__(self):
        self.t0 = time.perf_counter()
        print(f"[{self.k}/{self.total}] {self.title}", flush=True)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            print(f"      done in {time.perf_counter() - self.t0:.0f} s", flush=True)


@contextlib.contextmanager
def _logs_to(path: Path, verbose: bool):
    """Send what a stage prints (the pretraining log) to ``path``; progress bars stay."""
    if verbose:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f):
        yield


# ----------------------------------------------------------------------------------- steps
def pretrain(out: Path, config: str, opts: list[str], verbose: bool) -> Path:
    """``feataug pretrain`` of ``config`` + ``opts`` into ``out`` (a rerun reuses a finished run)."""
    from pretrain.config import load_cfg
    from pretrain.engine import train

    with _logs_to(out / "console.txt", verbose):
        train(load_cfg(str(_config_path(config)), [*opts, "OUTPUT_DIR", str(out)]), resume=True)
    return out / "last.pth"


def convert(ckpt: Path) -> Path:
    from transfer.convert import convert as convert_checkpoint

    out = ckpt.with_name("d2_weights.pkl")
    convert_checkpoint(ckpt, out, overwrite=True)  # the demo owns its output folder
    return out


def fine_tune(config: str, out: Path, weights: Path | None, opts: list[str], seeds: int,
              register: dict, verbose: bool, seed: int = 0) -> list[dict]:
    """``seeds`` trials of ``feataug detect`` (seeds ``seed``, ``seed + 1``, ...); per trial its
    ``bbox`` results."""
    import torch

    from transfer.detect import DetectOptions, run_detection

    opts = [*opts, "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", str(weights or ""), "SEED", str(seed),
            "DATASETS.AUTO_NUM_CLASSES", "True",
            "MODEL.DEVICE", "cuda" if torch.cuda.is_available() else "cpu"]
    results = run_detection(DetectOptions(_config_path(config), tuple(opts), trials=seeds,
                                          quiet=not verbose, from_scratch=weights is None,
                                          resume=True, **register))
    return [t["results"].get("bbox", {}) for t in results["trials"]]


def summarize(per_start: dict[str, list[dict]]) -> dict[str, dict]:
    """Per start point: AP and AP50 values over seeds, mean, sd, and the paired Δ vs random
    init with the claim rule (``pretrain.utils.stats.claim``)."""
    ref = per_start.get("random init", [])
    rows = {}
    for name, trials in per_start.items():
        row = {}
        for metric in ("AP", "AP50"):
            values = [float(t.get(metric, math.nan)) for t in trials]
            mean, sd = mean_std(values)
            row[metric] = {"values": values, "mean": mean, "sd": sd}
            if name != "random init" and ref:
                diffs = [v - float(r.get(metric, math.nan)) for v, r in zip(values, ref, strict=False)]
                d_mean, d_sd = mean_std(diffs)
                row[metric] |= {"delta": d_mean, "delta_sd": d_sd, "claim": claim(diffs)}
        rows[name] = row
    return rows


def _pm(mean: float, sd: float, signed: bool = False) -> str:
    return format_pm(mean, sd, 1, signed, missing="n/a")


def format_table(rows: dict[str, dict]) -> str:
    """Markdown: mean ± sd over seeds of AP and AP50, and the paired Δ vs random init."""
    lines = ["| start point | AP | AP50 | Δ AP vs random init | Δ AP50 vs random init |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        cells = [name, _pm(r["AP"]["mean"], r["AP"]["sd"]), _pm(r["AP50"]["mean"], r["AP50"]["sd"])]
        for metric in ("AP", "AP50"):
            m = r[metric]
            cells.append("" if "delta" not in m else
                         f"{_pm(m['delta'], m['delta_sd'], signed=True)} {m['claim']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- run
def run(profile: str = "quick", out: str | Path = "output/demo", data_root: str | None = None,
        verbose: bool = False, seed: int = 0) -> dict:
    from feataug.data import PREPARERS, default_root

    prof = PROFILES[profile]
    if not verbose:  # library warnings (torch, Detectron2 internals) are not for this console
        warnings.filterwarnings("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
    out = Path(out) / (profile if seed == 0 else f"{profile}-seed{seed}")
    out.mkdir(parents=True, exist_ok=True)
    root = Path(data_root or default_root())
    t_start = time.perf_counter()
    total = 2 + 3 * prof.scenes + prof.trees
    print(f"FeatAug demo, profile '{profile}': does pretraining show in detection AP? "
          f"{prof.seeds} fine-tuning seed{'s' * (prof.seeds > 1)} per start point from seed {seed}; "
          f"logs and plots in {out}/", flush=True)

    names = [*(["fashion-mnist", "fmnist-scenes"] if prof.scenes else []),
             *(["deepforest"] if prof.trees else [])]
    with Stage(1, total, "prepare " + " and ".join(_DATA_TITLES[n] for n in names)):
        for name in names:
            PREPARERS[name](root)

    rows, plots = (_scenes(out, root, prof, total, verbose, seed) if prof.scenes else (None, []))
    trees_rows = _trees(out, root, prof, total, verbose, seed) if prof.trees else None

    with Stage(total, total, "table and plots"):
        if rows:
            plots = [plot_bars(rows, out / "scenes_ap.png",
                               "Fashion-MNIST scenes: Faster R-CNN R18-FPN fine-tuned from each "
                               "start point"), *plots]
        if trees_rows:
            plots.append(plot_bars(trees_rows, out / "trees_ap.png",
                                   "DeepForest held-out tiles: fine-tuned from each start point"))
            trees = plot_predictions(out / "trees_predictions.png", _trees_dirs(out),
                                     _test_records("demo_trees_test"))
            plots += [trees] if trees else []
        report = {"profile": profile, "seed": seed, "scenes": rows, "trees": trees_rows,
                  "seconds": round(time.perf_counter() - t_start, 1),
                  "plots": [str(p) for p in plots]}
        from pretrain.utils.io import atomic_write_text

        atomic_write_text(out / "results.json", json.dumps(report, indent=2, default=str) + "\n")
        text = "\n\n".join(format_table(r) for r in (rows, trees_rows) if r)
        atomic_write_text(out / "results.md", text + "\n")

    if rows:
        print(f"\nFashion-MNIST test scenes, COCO AP (%), mean ± sd over {prof.seeds} seeds "
              f"(Δ: paired by seed, with the claim rule's verdict):")
        print(format_table(rows))
    if trees_rows:
        print(f"\nDeepForest held-out tiles, VOC AP (%), seed {seed} (one seed: no verdict "
              f"is possible):")
        print(format_table(trees_rows))
    print(f"\n{report['seconds']:.0f} s; plots {', '.join(Path(p).name for p in plots)} and logs "
          f"in {out}/")
    return report


_DATA_TITLES = {"fashion-mnist": "Fashion-MNIST", "fmnist-scenes": "its detection scenes",
                "deepforest": "DeepForest"}


def _scenes(out: Path, root: Path, prof: Profile, total: int, verbose: bool, seed: int
            ) -> tuple[dict, list[Path]]:
    """Stages 2-4: pretrain MoCo v2 (and, when the profile has that start, MoCo v2 + FA) on
    Fashion-MNIST, convert, fine-tune on the scenes from each start point; the summary rows and
    the predictions picture."""
    scenes = root / "fmnist-scenes"
    data = ["DATA.ROOT", str(root / "fashion-mnist"), "DATA.FORMAT", "idx", "KNN.PERIOD", "0",
            "SOLVER.MAX_ITER", str(prof.pretrain_iters), "MODEL.MOCO.SPLIT_BN", "4",
            "DATALOADER.NUM_WORKERS", "1", "SEED", str(seed)]
    pre_dirs = {"MoCo v2": out / "pretrain_moco", "MoCo v2 + FA": out / "pretrain_moco_fa"}
    pre_dirs = {name: d for name, d in pre_dirs.items() if name in prof.starts}
    with Stage(2, total, f"pretrain {' and '.join(pre_dirs)} on 60k Fashion-MNIST images "
                         f"({prof.pretrain_iters} iterations{' each' * (len(pre_dirs) > 1)})"):
        ckpts = {name: pretrain(d, PRETRAIN_CONFIG, data + (FA_OPTS if "FA" in name else []),
                                verbose) for name, d in pre_dirs.items()}

    with Stage(3, total, "convert the trunks to Detectron2 weights"):
        weights: dict[str, Path | None] = {"random init": None}
        weights |= {name: convert(ckpt) for name, ckpt in ckpts.items()}

    register = {"register_coco": [
        ("demo_scenes_train", scenes / "annotations" / "train.json", scenes / "JPEGImages"),
        ("demo_scenes_test", scenes / "annotations" / "test.json", scenes / "JPEGImages")]}
    it = prof.detect_iters
    det_opts = ["DATASETS.TRAIN", "('demo_scenes_train',)", "DATASETS.TEST", "('demo_scenes_test',)",
                "SOLVER.MAX_ITER", str(it), "SOLVER.IMS_PER_BATCH", str(prof.detect_batch),
                "SOLVER.STEPS", f"({int(it * 0.75)}, {int(it * 0.9)})",
                "SOLVER.WARMUP_ITERS", str(max(1, it * 3 // 10))]
    det_dirs = {n: out / ("detect_" + n.lower().replace(" ", "_").replace("+", "plus"))
                for n in prof.starts}
    from tqdm import tqdm

    per_start = {}
    with Stage(4, total, f"fine-tune Faster R-CNN R18-FPN on 50 labelled scenes ({it} iterations) "
                         f"and evaluate on 200 test scenes: {len(prof.starts)} start points x "
                         f"{prof.seeds} seeds"):
        for name in tqdm(prof.starts, desc="fine-tune", unit="start point", leave=False):
            per_start[name] = fine_tune(SCENES_CONFIG, det_dirs[name], weights[name], det_opts,
                                        prof.seeds, register, verbose, seed)
    picture = plot_predictions(out / "scenes_predictions.png", det_dirs,
                               _test_records("demo_scenes_test"))
    return summarize(per_start), [picture] if picture else []


def _test_records(name: str) -> list[dict]:
    from detectron2.data import DatasetCatalog

    return DatasetCatalog.get(name)


def _trees_opts(prof: Profile) -> list[str]:
    """Fine-tuning on the DeepForest tiles: 256 px crops at the photos' own scale (trees ≈ 36 px;
    resizing whole tiles to 224 px made them ≈ 20 px and learned slower), tested on whole tiles
    at 400 px; bfloat16 autocast where the CPU has it (float32 elsewhere)."""
    it = prof.trees_detect_iters
    return ["DATASETS.TRAIN", "('demo_trees_train',)", "DATASETS.TEST", "('demo_trees_test',)",
            "SOLVER.MAX_ITER", str(it), "SOLVER.STEPS", f"({int(it * 0.75)},)",
            "SOLVER.WARMUP_ITERS", str(max(1, min(100, it // 5))), "SOLVER.IMS_PER_BATCH", "2",
            "INPUT.CROP.ENABLED", "True", "INPUT.CROP.TYPE", "absolute",
            "INPUT.CROP.SIZE", "(256, 256)", "INPUT.MIN_SIZE_TRAIN", "(224, 256, 288)",
            "INPUT.MIN_SIZE_TEST", "400", "SOLVER.AMP.ENABLED", "True",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
            "MODEL.RPN.POST_NMS_TOPK_TEST", "200", "TEST.PRECISE_BN.NUM_ITER", "5"]


def _trees_dirs(out: Path) -> dict[str, Path]:
    return {"random init": out / "trees_detect_random", "MoCo v2": out / "trees_detect_moco"}


def _trees(out: Path, root: Path, prof: Profile, total: int, verbose: bool, seed: int) -> dict:
    """DeepForest: random init vs MoCo v2 pretrained on the unlabeled crops (one seed), trained on
    27 tiles of the training photo and tested on its 9 held-out tiles (the ``train_tiles`` /
    ``test_tiles`` splits; no pretraining crop touches them)."""
    voc = root / "deepforest"
    with Stage(total - 1, total, f"DeepForest: pretrain MoCo v2 on the unlabeled crops "
                         f"({prof.trees_pretrain_iters} iterations), fine-tune on 27 tiles from "
                         f"random init and from it ({prof.trees_detect_iters} iterations), "
                         f"evaluate on 9 held-out tiles"):
        ckpt = pretrain(out / "trees_pretrain_moco", TREES_PRETRAIN_CONFIG, [
            "DATA.ROOT", str(voc / "unlabeled"), "DATA.FORMAT", "folder", "FA.ENABLED", "False",
            "SOLVER.MAX_ITER", str(prof.trees_pretrain_iters), "SOLVER.EPOCHS", "1000",
            "SOLVER.BATCH_SIZE", "32", "DATALOADER.NUM_WORKERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "0", "SEED", str(seed)], verbose)  # last.pth only (every 5 epochs: ~1 GB)
        weights = {"random init": None, "MoCo v2": convert(ckpt)}
        register = {"register_voc": [("demo_trees_train", voc, "train_tiles"),
                                     ("demo_trees_test", voc, "test_tiles")]}
        per_start = {name: fine_tune(TREES_CONFIG, _trees_dirs(out)[name], w, _trees_opts(prof), 1,
                                     register, verbose, seed)
                     for name, w in weights.items()}
    return summarize(per_start)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick (≤ 5 min on 2 cores: random init vs MoCo v2, 3 seeds), full "
                        "(≤ 20 min: the detector detects; adds MoCo v2 + FA and the DeepForest "
                        "real-photo case) or trees (≤ 20 min, DeepForest alone with a "
                        "longer schedule)")
    parser.add_argument("--out", default="output/demo", help="output folder (default: output/demo)")
    parser.add_argument("--data-root", default=None,
                        help="datasets folder (default: $FEATAUG_DATA or ./datasets)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed: pretraining SEED and fine-tuning seeds S, S+1, ... "
                        "(default 0; another seed writes to OUT/PROFILE-seedS)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the pretraining and Detectron2 logs too")


def main(args: argparse.Namespace) -> int:
    run(args.profile, args.out, args.data_root, args.verbose, args.seed)
    return 0
