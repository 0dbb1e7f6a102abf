"""``feataug bench``: how fast the pipeline is, measured against peer implementations.

Every figure is a ratio of two contenders measured side by side in one run: their measurements
are interleaved (A B A B ...) so that load changes on a shared machine hit both, and the figure is
the median, over the repeats, of the ratio of each adjacent pair. Lightly's pretraining step runs
between two measurements of our plain step and is compared with their mean (``bracketed``).

FA's cost (the seven operators, the Feature Transformation recipe and FA on the key,
``parallel_predictor``) is measured on one model that FA.START switches on and off, so nothing
but FA differs: FA's seconds are the paired difference of the *head* (projectors, loss, FA, their
backward, the SGD step; the trunks replaced by fixed features, since their forward and backward
do not change with FA), and
``fa_overhead`` = 1 + those seconds / the whole FA-off step. On 2 CPU cores the whole step's own
noise (identity, which adds one InfoNCE term: 0.95–1.03 between runs) is as large as the 3 %
being tested; the whole-step ratios are kept beside it (``end_to_end_ratios``) as a check.

Per-contender medians, every measurement and the machine (CPU, threads, versions, load average)
are kept in the JSON. The peers (``lightly``, plain Detectron2) are installed by ``make bench`` only;
a section whose peer is missing is reported as skipped (value ``null``), never faked.

| key                                   | ratio                                                 | goal   |
|---------------------------------------|-------------------------------------------------------|--------|
| ``pretrain_step_ratio_vs_lightly``    | our MoCo v2 step time / the same step from lightly    | ≤ 0.83 |
| ``fa_overhead``                       | 1 + FA's seconds / the FA-off step, worst operator    | ≤ 1.03 |
| ``aug_pipeline_ratio_vs_torchvision`` | our two-view images/s / torchvision-PIL images/s      | ≥ 2    |
| ``aug_device_vs_cpu_max_lsb``         | max abs difference, device-path views vs OpenCV views | ≤ 3    |
| ``coco_eval_ratio_vs_pycocotools``    | pycocotools seconds / ours (load+evaluate+accumulate) | ≥ 5    |
| ``coco_eval_stats_max_abs_diff``      | max abs difference of the 12 COCO stats               | ≤ 1e-6 |
| ``detect_iter_ratio_vs_detectron2``   | our trainer iterations/s / ``DefaultTrainer``'s       | ≥ 1.0  |

``aug_device_vs_cpu_max_lsb`` is not a speed: it is the largest difference (in 8-bit levels)
between the device path's views and the OpenCV pipeline's; its section also reports what each path
costs the CPU per image.

``feataug bench --gpu`` (``make bench-gpu``) is a separate run at paper scale on one GPU: see
``gpu.py``. ``--gpu --dry-run`` runs it on tiny sizes (on the CPU without a GPU).

Output: ``--out F.json`` (rewritten atomically after every section) and ``F.md`` beside it with
the markdown table that is also printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .aug import bench_aug, bench_aug_device, find_images, torchvision_moco_v2
from .coco import bench_coco_eval, synthetic_coco
from .detect import bench_detect
from .gpu import PROFILES as GPU_PROFILES
from .gpu import run_gpu
from .harness import (
    GOALS,
    KEYS,
    PROFILES,
    BenchError,
    Profile,
    bracketed,
    empty_result,
    format_markdown,
    goal_met,
    interleave,
    machine_info,
    median,
    paired_ratio,
    seconds_per_unit,
    set_value,
    write_outputs,
)
from .pretrain_step import bench_pretrain

__all__ = ["GOALS", "KEYS", "PROFILES", "BenchError", "Profile", "add_arguments", "bracketed",
           "empty_result", "find_images", "format_markdown", "goal_met", "interleave", "main",
           "median", "paired_ratio", "run", "seconds_per_unit", "set_value", "synthetic_coco",
           "torchvision_moco_v2", "write_outputs"]


SECTIONS: dict[str, Callable] = {
    "pretrain": bench_pretrain,  # also fa
    "aug": bench_aug,
    "aug_device": bench_aug_device,
    "coco_eval": bench_coco_eval,
    "detect": bench_detect,
}


def run(profile: Profile, out: str | os.PathLike | None = None, only: Sequence[str] = (),
        images: str | None = None, say: Callable[[str], None] = print) -> dict:
    """Run the sections (all, or ``only``), writing ``out`` after each; returns the result."""
    result = empty_result(profile.name)
    result["machine"] = machine_info()
    start = time.perf_counter()
    for name, section in SECTIONS.items():
        if only and name not in only:
            continue
        t = time.perf_counter()
        kwargs = {"images": images} if name in ("aug", "aug_device") else {}
        try:
            section(profile, result, say, **kwargs)
        except ImportError as e:  # a peer or optional part missing: say so, go on
            result["details"][name] = {"skipped": f"{type(e).__name__}: {e}"}
        result["details"].setdefault(name, {})["section_s"] = round(time.perf_counter() - t, 1)
        say(f"{name}: done in {time.perf_counter() - t:.0f} s")
        if out:
            write_outputs(result, out)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_end"] = round(os.getloadavg()[0], 2)
    result["complete"] = not only
    if out:
        write_outputs(result, out)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and a 500-image COCO evaluation (<= 10 min on 2 cores)")
    parser.add_argument("--out", default="bench.json", metavar="F.json",
                        help="results JSON (default bench.json); the table goes to F.md beside it")
    parser.add_argument("--only", default="", metavar="S[,S]",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help="real photos for the augmentation benchmark (default: prepared "
                        "DeepForest tiles, else labelme photos, else matplotlib's sample photo); "
                        "with --gpu, the photos the JPEGs are cut from (default: scikit-image's)")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU run instead: MoCo v2 R50 end to end at 6/10/15 workers, CPU "
                        "vs device augmentation, MFU, detection (needs CUDA; <= 8 min)")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --gpu: every phase on tiny sizes, on the CPU without a GPU")


def main(args: argparse.Namespace) -> int:
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    try:
        if args.dry_run and not args.gpu:
            raise BenchError("--dry-run goes with --gpu")
        if args.gpu:
            return _main_gpu(args)
        if unknown:
            raise BenchError(f"--only: unknown section(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(SECTIONS)}")
        if not str(args.out).endswith(".json"):
            raise BenchError(f"--out {args.out}: give a .json file name (the table goes beside it)")
        profile = PROFILES["quick" if args.quick else "full"]
        result = run(profile, args.out, only, args.images,
                     say=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    except OSError as e:
        raise BenchError(str(e)) from None
    print(format_markdown(result))
    print(f"feataug bench: wrote {args.out} and {Path(args.out).with_suffix('.md')} "
          f"({result['wall_s']:.0f} s)")
    return 0


def _main_gpu(args: argparse.Namespace) -> int:
    if args.only or args.quick:
        raise BenchError("--gpu runs one fixed profile: --only and --quick do not apply")
    if not str(args.out).endswith(".json"):
        raise BenchError(f"--out {args.out}: give a .json file name (the table goes beside it)")
    profile = GPU_PROFILES["dry" if args.dry_run else "gpu"]
    result = run_gpu(profile, args.out, args.images,
                     say=lambda s: print(f"[bench --gpu] {s}", file=sys.stderr, flush=True))
    from .gpu import format_gpu_markdown

    print(format_gpu_markdown(result))
    print(f"feataug bench --gpu: wrote {args.out} and {Path(args.out).with_suffix('.md')} "
          f"({result['wall_s']:.0f} s)")
    if result["failed"]:
        print(f"feataug bench --gpu: failed phases: {', '.join(result['failed'])} (their "
              "tracebacks are above; the other phases ran)", file=sys.stderr)
        return 1
    return 0
