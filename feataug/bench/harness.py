"""The measuring harness: profiles, interleaved and bracketed timing, paired ratios, goals,
the result JSON and its markdown table, and a description of the machine."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import FeatAugError
from pretrain.utils.amp import cpu_has_native_bf16
from pretrain.utils.io import atomic_write_text

SCHEMA_VERSION = 1
# key -> (comparison, goal); "<=" means smaller is better.
GOALS: dict[str, tuple[str, float]] = {
    "pretrain_step_ratio_vs_lightly": ("<=", 0.83),
    "fa_overhead": ("<=", 1.03),
    "aug_pipeline_ratio_vs_torchvision": (">=", 2.0),
    "aug_device_vs_cpu_max_lsb": ("<=", 3),
    "coco_eval_ratio_vs_pycocotools": (">=", 5.0),
    "coco_eval_stats_max_abs_diff": ("<=", 1e-6),
    "detect_iter_ratio_vs_detectron2": (">=", 1.0),
}
KEYS = tuple(GOALS)
FA_OPS = ("identity", "noise", "dropout", "extrapolate", "interpolate", "generator", "hardmix")
# FA contenders of the pretraining section: FA.* overrides (every operator at its defaults, at the
# projector; hardmix makes negatives, so FA.ROLE negative), and the published Feature
# Transformation recipe (pretrain/fa/__init__.py's docstring: extrapolated positives, mixed queue, its
# loss replacing the plain one).
FA_CONTENDERS: dict[str, tuple] = {
    **{op: ("FA.OP", op, "FA.ROLE", "negative" if op == "hardmix" else "positive")
       for op in FA_OPS},
    "ft_recipe": ("FA.OP", "extrapolate", "FA.QUEUE_MIX", True, "FA.LOSS_MODE", "replace"),
    # FA on the key, the query plain (FA.ARCH parallel_predictor), with the noise operator
    "parallel_predictor": ("FA.OP", "noise", "FA.ARCH", "parallel_predictor"),
}
DETECT_CONFIG = "detection/tiny_faster_R18_FPN.yaml"  # in FeatAug's configs (feataug.configs_dir)


class BenchError(FeatAugError):
    """A benchmark that cannot run as asked (bad option, unreadable image folder)."""


@dataclass(frozen=True)
class Profile:
    """How much work each section does. ``quick`` fits in 10 minutes on 2 idle cores."""

    name: str
    repeats: int  # measured rounds per section (each round measures every contender once)
    warmup: int  # untimed rounds first
    pretrain_steps: int  # training steps per measurement
    aug_images: int  # images (two views each) per measurement
    coco_images: int  # synthetic COCO images, 100 detections each
    coco_repeats: int
    detect_iters: int  # trainer iterations per measurement
    pretrain_repeats: int = 0  # rounds of ours vs lightly (0: ``repeats``); a round is ~1 s


PROFILES = {
    "quick": Profile("quick", repeats=3, warmup=1, pretrain_steps=1, aug_images=96,
                     coco_images=500, coco_repeats=3, detect_iters=1),
    "full": Profile("full", repeats=7, warmup=1, pretrain_steps=2, aug_images=256,
                    coco_images=5000, coco_repeats=3, detect_iters=3, pretrain_repeats=21),
}
# ResNet-18 MoCo v2 at 64 px, batch 64, a 4096-key queue: a step a 2-core CPU runs in about 1 s.
# Ours runs with the engine's speed keys that are faster on a CPU with native bf16:
# SOLVER.CHANNELS_LAST (max-pooling is slow in NCHW bf16); SOLVER.COMPILE costs a minute of
# compiling per model, so it stays off. Lightly's step is its example's, as published (NCHW).
PRETRAIN = dict(backbone="resnet18", image_size=64, batch=64, queue=4096, hidden=512, dim=128,
                momentum=0.99, temperature=0.2, lr=0.03, weight_decay=1e-4, compile=False,
                channels_last=True)



def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """Median over repeats of ``numerator[i] / denominator[i]`` (pairs measured back to back).

    Returns ``{"ratio", "ratios", "numerator_median", "denominator_median"}``.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need equal, non-empty series, got {len(numerator)} and {len(denominator)}")
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {"ratio": median(ratios), "ratios": ratios,
            "numerator_median": median(numerator), "denominator_median": median(denominator)}


def interleave(contenders: dict[str, Callable[[], float]], repeats: int, warmup: int = 0,
               tick: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Call the contenders round-robin (A B ... A B ...): ``warmup`` untimed rounds, then
    ``repeats`` rounds whose return values (each call's own measurement, e.g. seconds per unit)
    are collected per contender, in call order. ``tick(name)`` follows every call."""
    out: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(warmup + repeats):
        for name, measure in contenders.items():
            value = measure()
            if r >= warmup:
                out[name].append(float(value))
            if tick:
                tick(name)
    return out


def bracketed(baseline: Callable[[], float], others: dict[str, Callable[[], float]],
              repeats: int, warmup: int = 0, tick: Callable[[str], None] | None = None
              ) -> dict[str, tuple[list[float], list[float]]]:
    """Measure each other contender between two baseline measurements: a round is
    ``base, o1, base, o2, ..., base, on, base``. Returns, per other contender, its values and the
    means of the two baseline values around each one, so a load that drifts linearly during a
    round cancels out of ``value / baseline``. ``warmup`` rounds are not recorded."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in others}
    for r in range(warmup + repeats):
        before = baseline()
        if tick:
            tick("baseline")
        for name, measure in others.items():
            value = measure()
            if tick:
                tick(name)
            after = baseline()
            if tick:
                tick("baseline")
            if r >= warmup:
                out[name][0].append(float(value))
                out[name][1].append((before + after) / 2)
            before = after
    return out


def seconds_per_unit(fn: Callable[[], object], units: int) -> float:
    """Wall seconds of ``units`` calls of ``fn``, divided by ``units``."""
    start = time.perf_counter()
    for _ in range(units):
        fn()
    return (time.perf_counter() - start) / units


def goal_met(key: str, value: float | None) -> bool | None:
    """Whether ``value`` meets the goal of ``key`` (None when not measured)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    op, goal = GOALS[key]
    return value <= goal if op == "<=" else value >= goal


def empty_result(profile: str) -> dict:
    """The JSON skeleton: every key of ``GOALS`` present (``None`` until measured)."""
    return {"schema": SCHEMA_VERSION, "profile": profile, "complete": False,
            **{k: None for k in KEYS},
            "goals": {k: {"op": op, "value": v, "met": None} for k, (op, v) in GOALS.items()},
            "details": {}, "machine": {}}


def set_value(result: dict, key: str, value: float | None) -> None:
    result[key] = None if value is None else float(value)
    result["goals"][key]["met"] = goal_met(key, result[key])


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def _note(key: str, details: dict) -> str:
    """The 'measured' column: what the ratio compares, from the section details."""
    d = details.get(_SECTION_OF[key], {})
    if key not in _VALUE_KEYS or not any(k in d for k in ("skipped",) + _VALUE_KEYS[key]):
        return "not run"
    if "skipped" in d:
        return f"skipped: {d['skipped']}"
    spread = (f"median of {d.get('repeats')}, pairs {_fmt(min(d['ratios']))}–{_fmt(max(d['ratios']))}"
              if isinstance(d.get("ratios"), list) else "")
    if key == "pretrain_step_ratio_vs_lightly":
        return f"{d['ours_s']:.3g} s vs {d['peer_s']:.3g} s per step; {d['setting']}; {spread}"
    if key == "fa_overhead":
        ops = ", ".join(f"{op} {_fmt(r)}" for op, r in d["ratios"].items())
        e2e = d.get("end_to_end_ratios")
        check = (f"; whole-step ratios {_fmt(min(e2e.values()))}–{_fmt(max(e2e.values()))}"
                 if e2e else "")
        return (f"worst {d['worst']}; {ops}; FA's head seconds / the FA-off step, median of "
                f"{d['repeats']}{check}")
    if key == "aug_pipeline_ratio_vs_torchvision":
        return (f"{d['ours_images_per_s']:.0f} vs {d['peer_images_per_s']:.0f} img/s (two views, "
                f"{d['size']} px, decode included, 1 thread); {d['distinct_images']} distinct "
                f"image(s): {d['source']}; {spread}")
    if key == "coco_eval_ratio_vs_pycocotools":
        return (f"{d['peer_s']:.3g} s vs {d['ours_s']:.3g} s; {d['n_images']} images x "
                f"{d['dets_per_image']} dets, {d['ours_backend']}; {spread}")
    if key == "aug_device_vs_cpu_max_lsb":
        ms = ", ".join(f"{k} {d[f'aug_cpu_ms_per_image_{k}']:.2f}"
                       for k in ("full", "split", "photometric"))
        return (f"pipeline {d['aug_device_vs_cpu_max_lsb']['pipeline']}, worst op "
                f"{d['worst_op']}; CPU ms/image (two views): {ms}; device ops on "
                f"{d['aug_device']} {d['aug_device_ms_per_image']:.2f}; {d['aug_images']} photos, "
                f"{d['aug_size']} px")
    if key == "coco_eval_stats_max_abs_diff":
        return "12 bbox stats, ours vs pycocotools"
    if key == "detect_iter_ratio_vs_detectron2":
        return (f"{d['ours_iter_per_s']:.3g} vs {d['peer_iter_per_s']:.3g} it/s; {d['setting']}; "
                f"{spread}")
    return ""


_VALUE_KEYS = {  # a detail that exists once the section has measured the key
    "pretrain_step_ratio_vs_lightly": ("ours_s",),
    "fa_overhead": ("worst",),
    "aug_pipeline_ratio_vs_torchvision": ("ours_images_per_s",),
    "aug_device_vs_cpu_max_lsb": ("aug_device_vs_cpu_max_lsb",),
    "coco_eval_ratio_vs_pycocotools": ("ours_s",),
    "coco_eval_stats_max_abs_diff": ("ours_s",),
    "detect_iter_ratio_vs_detectron2": ("ours_iter_per_s",),
}
_SECTION_OF = {
    "pretrain_step_ratio_vs_lightly": "pretrain",
    "fa_overhead": "fa",
    "aug_pipeline_ratio_vs_torchvision": "aug",
    "aug_device_vs_cpu_max_lsb": "aug_device",
    "coco_eval_ratio_vs_pycocotools": "coco_eval",
    "coco_eval_stats_max_abs_diff": "coco_eval",
    "detect_iter_ratio_vs_detectron2": "detect",
}


def format_markdown(result: dict) -> str:
    """A markdown table of every key: value, goal, met, what was measured; machine line above."""
    m = result.get("machine", {})
    lines = [f"# feataug bench ({result.get('profile', '?')})", ""]
    if m:
        lines += [f"Machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, torch "
                  f"{m.get('torch', '?')} with {m.get('torch_threads', '?')} threads, load average "
                  f"{m.get('load_average_start', '?')} at start. Ratios of contenders measured "
                  "in alternation; medians of the paired ratios.", ""]
    lines += ["| metric | value | goal | met | measured |", "|---|---|---|---|---|"]
    for key in KEYS:
        goal = result["goals"][key]
        met = {True: "yes", False: "**no**", None: "—"}[goal["met"]]
        op = "≤" if goal["op"] == "<=" else "≥"
        lines.append(f"| {key} | {_fmt(result[key])} | {op} {_fmt(goal['value'])} | {met} | "
                     f"{_note(key, result['details'])} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: str | os.PathLike,
                  markdown: Callable[[dict], str] | None = None) -> Path:
    """``out`` (JSON) and the markdown table beside it (same name, ``.md``; ``markdown`` formats
    it, :func:`format_markdown` by default), both atomically."""
    out = Path(out)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    md = out.with_suffix(".md")
    atomic_write_text(md, (markdown or format_markdown)(result))
    return md


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__}
    for name, module in (("torchvision", "torchvision"), ("opencv", "cv2"), ("pillow", "PIL"),
                         ("numpy", "numpy"), ("lightly", "lightly"), ("detectron2", "detectron2"),
                         ("faster_coco_eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        info[name] = _module_version(module)
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = round(os.getloadavg()[0], 2)
    return info


def _module_version(module: str) -> str | None:
    """The version of an importable ``module``, else None (it is not available)."""
    from pretrain.utils.provenance import package_version

    return package_version(module, must_import=True)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
