"""``feataug bench``: how fast the pipeline is, measured against peer implementations.

Every figure is a ratio of two contenders measured side by side in one run: their measurements
are interleaved (A B A B ...) so that load changes on a shared machine hit both, and the figure is
the median, over the repeats, of the ratio of each adjacent pair. The pretraining section has
seven contenders (lightly and six FA operators), so each of them runs between two measurements of
our plain step and is compared with their mean (``bracketed``). Per-contender medians, every
measurement and the machine (CPU, threads, versions, load average) are kept in the JSON. The peers (``lightly``, plain Detectron2) are installed by ``make bench`` only;
a section whose peer is missing is reported as skipped (value ``null``), never faked.

| key (design notes §8)                 | ratio                                                 | goal   |
|---------------------------------------|-------------------------------------------------------|--------|
| ``pretrain_step_ratio_vs_lightly``    | our MoCo v2 step time / the same step from lightly    | ≤ 0.83 |
| ``fa_overhead``                       | step time with FA / without, worst operator           | ≤ 1.03 |
| ``aug_pipeline_ratio_vs_torchvision`` | our two-view images/s / torchvision-PIL images/s      | ≥ 2    |
| ``coco_eval_ratio_vs_pycocotools``    | pycocotools seconds / ours (load+evaluate+accumulate) | ≥ 5    |
| ``coco_eval_stats_max_abs_diff``      | max abs difference of the 12 COCO stats               | ≤ 1e-6 |
| ``detect_iter_ratio_vs_detectron2``   | our trainer iterations/s / ``DefaultTrainer``'s       | ≥ 1.0  |

With CUDA available, a ``gpu`` section adds our step time and images/s at paper scale
(ResNet-50, 224 px, batch 256, bf16); on a CPU machine it is skipped.

Output: ``--out F.json`` (rewritten atomically after every section) and ``F.md`` beside it with
the markdown table that is also printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from pretrain.utils.amp import cpu_has_native_bf16
from pretrain.utils.io import atomic_write_text

SCHEMA_VERSION = 1
# key -> (comparison, goal); "<=" means smaller is better.
GOALS: dict[str, tuple[str, float]] = {
    "pretrain_step_ratio_vs_lightly": ("<=", 0.83),
    "fa_overhead": ("<=", 1.03),
    "aug_pipeline_ratio_vs_torchvision": (">=", 2.0),
    "coco_eval_ratio_vs_pycocotools": (">=", 5.0),
    "coco_eval_stats_max_abs_diff": ("<=", 1e-6),
    "detect_iter_ratio_vs_detectron2": (">=", 1.0),
}
KEYS = tuple(GOALS)
FA_OPS = ("noise", "dropout", "extrapolate", "interpolate", "hardmix", "generator")
DETECT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detection" / "tiny_faster_R18_FPN.yaml"


class BenchError(Exception):
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


PROFILES = {
    "quick": Profile("quick", repeats=3, warmup=1, pretrain_steps=1, aug_images=96,
                     coco_images=500, coco_repeats=3, detect_iters=1),
    "full": Profile("full", repeats=7, warmup=1, pretrain_steps=2, aug_images=256,
                    coco_images=5000, coco_repeats=3, detect_iters=3),
}
# ResNet-18 MoCo v2 at 64 px, batch 64 (the setting); a 4096-key queue.
PRETRAIN = dict(backbone="resnet18", image_size=64, batch=64, queue=4096, hidden=512, dim=128,
                momentum=0.99, temperature=0.2, lr=0.03, weight_decay=1e-4)


# ----------------------------------------------------------------------------- pure helpers
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
        return f"worst {d['worst']}; {ops}; median of {d['repeats']}"
    if key == "aug_pipeline_ratio_vs_torchvision":
        return (f"{d['ours_images_per_s']:.0f} vs {d['peer_images_per_s']:.0f} img/s (two views, "
                f"{d['size']} px, decode included, 1 thread); {d['distinct_images']} distinct "
                f"image(s): {d['source']}; {spread}")
    if key == "coco_eval_ratio_vs_pycocotools":
        return (f"{d['peer_s']:.3g} s vs {d['ours_s']:.3g} s; {d['n_images']} images x "
                f"{d['dets_per_image']} dets, {d['ours_backend']}; {spread}")
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
    "coco_eval_ratio_vs_pycocotools": ("ours_s",),
    "coco_eval_stats_max_abs_diff": ("ours_s",),
    "detect_iter_ratio_vs_detectron2": ("ours_iter_per_s",),
}
_SECTION_OF = {
    "pretrain_step_ratio_vs_lightly": "pretrain",
    "fa_overhead": "fa",
    "aug_pipeline_ratio_vs_torchvision": "aug",
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
    gpu = result["details"].get("gpu", {})
    if "step_s" in gpu:
        lines += ["", f"GPU ({gpu['device']}): {gpu['setting']}: {gpu['step_s'] * 1000:.0f} ms per "
                      f"step, {gpu['images_per_s']:.0f} images/s."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: str | os.PathLike) -> Path:
    """``out`` (JSON) and the markdown table beside it (same name, ``.md``), both atomically."""
    out = Path(out)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    md = out.with_suffix(".md")
    atomic_write_text(md, format_markdown(result))
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
                         ("faster_coco_eval", "faster_coco_eval")):
        info[name] = _module_version(module)
    try:
        from importlib.metadata import version

        info["pycocotools"] = version("pycocotools")
    except Exception:  # noqa: BLE001
        info["pycocotools"] = None
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = round(os.getloadavg()[0], 2)
    return info


def _module_version(module: str) -> str | None:
    import importlib

    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


# ----------------------------------------------------------------------------- pretraining step
def _pretrain_cfg(fa_op: str | None = None):
    from pretrain.config import get_cfg

    p = PRETRAIN
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.METHOD", "moco", "MODEL.BACKBONE", p["backbone"], "MODEL.STEM", "imagenet",
        "MODEL.PROJ_HIDDEN_DIM", p["hidden"], "MODEL.PROJ_DIM", p["dim"],
        "MODEL.MOCO.K", p["queue"], "MODEL.MOCO.M", p["momentum"], "MODEL.MOCO.T", p["temperature"],
        "DATA.IMAGE_SIZE", p["image_size"], "SOLVER.BATCH_SIZE", p["batch"],
        "SOLVER.BASE_LR", p["lr"] * 256 / p["batch"], "SOLVER.WEIGHT_DECAY", p["weight_decay"],
        "SOLVER.AMP", "bfloat16" if cpu_has_native_bf16() else "off",
    ])
    if fa_op is not None:
        cfg.merge_from_list(["FA.ENABLED", True, "FA.OP", fa_op, "FA.POSITION", "projector",
                             "FA.ROLE", "negative" if fa_op == "hardmix" else "positive"])
    return cfg


def _our_step(cfg, device: str = "cpu") -> Callable:
    """One iteration of ``pretrain.engine.train`` on given (normalised) views: forward under the
    configured autocast, loss read back, zero_grad, backward, SGD step, ``after_step``."""
    import torch

    from pretrain.build import build_model
    from pretrain.solver import build_optimizer
    from pretrain.utils.amp import amp_dtype

    model = build_model(cfg).to(device)
    if cfg.SOLVER.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    dtype = amp_dtype(cfg.SOLVER.AMP, torch.device(device).type)

    def step(x1, x2):
        with torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext():
            loss = model(x1, x2)["loss"]
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.after_step(0.5)

    return step


def _lightly_step(cfg) -> Callable:
    """The same MoCo v2 step assembled from lightly's parts, as lightly's MoCo example does:
    the same torchvision trunk, ``MoCoProjectionHead``, ``NTXentLoss`` with a memory bank,
    ``update_momentum`` on ``deactivate_requires_grad`` copies, the same SGD."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from pretrain.backbone import build_backbone

    mc = cfg.MODEL
    backbone = build_backbone(mc.BACKBONE, mc.STEM)
    head = MoCoProjectionHead(backbone.feat_dim, mc.PROJ_HIDDEN_DIM, mc.PROJ_DIM)
    backbone_k, head_k = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_k)
    deactivate_requires_grad(head_k)
    criterion = NTXentLoss(temperature=mc.MOCO.T, memory_bank_size=(mc.MOCO.K, mc.PROJ_DIM))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.SOLVER.BASE_LR * cfg.SOLVER.BATCH_SIZE / 256,
                                momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    dtype = torch.bfloat16 if cfg.SOLVER.AMP == "bfloat16" else None
    m = mc.MOCO.M

    def step(x1, x2):
        update_momentum(backbone, backbone_k, m)
        update_momentum(head, head_k, m)
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            query = head(backbone(x1))
            key = head_k(backbone_k(x2)).detach()
            loss = criterion(query.float(), key.float())
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_pretrain(profile: Profile, result: dict, say: Callable[[str], None]) -> None:
    """Our MoCo v2 step vs lightly's (``pretrain``) and with each FA operator vs without (``fa``),
    every other contender measured between two measurements of ours (``bracketed``)."""
    import torch

    p = PRETRAIN
    cfg = _pretrain_cfg()
    g = torch.Generator().manual_seed(0)
    shape = (p["batch"], 3, p["image_size"], p["image_size"])
    x1, x2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    steps = {"ours": _our_step(cfg)}
    lightly_missing = _module_version("lightly") is None
    if not lightly_missing:
        steps["lightly"] = _lightly_step(cfg)
    for op in FA_OPS:
        steps[f"fa:{op}"] = _our_step(_pretrain_cfg(op))
    setting = (f"MoCo v2 {p['backbone']}, {p['image_size']} px, batch {p['batch']}, queue "
               f"{p['queue']}, CPU {'bf16' if cfg.SOLVER.AMP == 'bfloat16' else 'fp32'}, "
               f"{torch.get_num_threads()} threads")
    say(f"pretrain: {setting}; ours between every two of: {', '.join(list(steps)[1:])}")
    n = profile.pretrain_steps
    measure = {name: (lambda s=s: seconds_per_unit(lambda: s(x1, x2), n)) for name, s in steps.items()}
    others = {k: v for k, v in measure.items() if k != "ours"}
    rounds = profile.warmup + profile.repeats
    with _bar((2 * len(others) + 1) * rounds, "pretrain steps") as bar:
        times = bracketed(measure["ours"], others, profile.repeats, profile.warmup,
                          lambda _: bar.update())
    common = {"repeats": profile.repeats, "steps_per_repeat": n, "setting": setting,
              "pairing": "each contender's time / mean of the two 'ours' times around it"}
    if lightly_missing:
        result["details"]["pretrain"] = {"skipped": "lightly is not installed (make bench installs it)"}
    else:
        peer, ours = times["lightly"]
        r = paired_ratio(ours, peer)
        result["details"]["pretrain"] = {**common, "ours_s": r["numerator_median"],
                                         "peer_s": r["denominator_median"], "ratios": r["ratios"],
                                         "ours_times_s": ours, "peer_times_s": peer,
                                         "lightly": _module_version("lightly")}
        set_value(result, "pretrain_step_ratio_vs_lightly", r["ratio"])
    ratios = {op: paired_ratio(*times[f"fa:{op}"])["ratio"] for op in FA_OPS}
    worst = max(ratios, key=ratios.get)
    result["details"]["fa"] = {
        **common, "ratios": ratios, "worst": worst,
        "op_times_s": {op: times[f"fa:{op}"][0] for op in FA_OPS},
        "baseline_times_s": {op: times[f"fa:{op}"][1] for op in FA_OPS},
        "fa_setting": "FA.POSITION projector, FA.ROLE positive (hardmix: negative), FA.NUM 1, "
                      "defaults otherwise",
    }
    set_value(result, "fa_overhead", ratios[worst])


def bench_gpu(profile: Profile, result: dict, say: Callable[[str], None]) -> None:
    """Where CUDA is available: our MoCo v2 step at paper scale (ResNet-50, 224 px, batch 256,
    65536-key queue, bf16 autocast, channels-last). Absolute numbers, no peer."""
    import torch

    if not torch.cuda.is_available():
        result["details"]["gpu"] = {"skipped": "no CUDA device"}
        return
    torch.backends.cudnn.benchmark = True
    batch, size = 256, 224
    cfg = _pretrain_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE", "resnet50", "MODEL.PROJ_HIDDEN_DIM", 0,
                         "MODEL.MOCO.K", 65536, "MODEL.MOCO.M", 0.999, "DATA.IMAGE_SIZE", size,
                         "SOLVER.BATCH_SIZE", batch, "SOLVER.AMP", "bfloat16",
                         "SOLVER.CHANNELS_LAST", True])
    g = torch.Generator(device="cuda").manual_seed(0)
    x1, x2 = (torch.randn(batch, 3, size, size, device="cuda", generator=g)
              .contiguous(memory_format=torch.channels_last) for _ in range(2))
    step = _our_step(cfg, "cuda")
    n = 10

    def measure() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step(x1, x2)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    say(f"GPU: {torch.cuda.get_device_name()}, MoCo v2 resnet50 {size} px batch {batch}")
    times = interleave({"ours": measure}, max(profile.repeats, 3), 1)["ours"]
    step_s = median(times)
    result["details"]["gpu"] = {
        "device": torch.cuda.get_device_name(), "setting": f"MoCo v2 resnet50, {size} px, batch "
        f"{batch}, queue 65536, bf16 autocast, channels-last, synthetic input",
        "step_s": step_s, "images_per_s": batch / step_s, "times_s": times,
        "steps_per_repeat": n, "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


# ----------------------------------------------------------------------------- augmentation
def find_images(folder: str | os.PathLike | None = None, limit: int = 512) -> tuple[list[str], str]:
    """Real photos for the augmentation benchmark: ``folder`` if given; else the prepared
    DeepForest tiles or labelme photos under the data root; else matplotlib's sample photo.
    Returns (paths, source description)."""
    from pretrain.data import IMAGE_EXTENSIONS

    def scan(d: Path) -> list[str]:
        return sorted(str(f) for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)[:limit]

    if folder is not None:
        paths = scan(Path(folder)) if Path(folder).is_dir() else []
        if not paths:
            raise BenchError(f"{folder}: no image files found for --images")
        return paths, str(folder)
    from feataug.data import default_root

    root = default_root()
    for sub, what in (("deepforest/JPEGImages", "DeepForest NEON aerial tiles"),
                      ("labelme/JPEGImages", "labelme VOC-2011 photos")):
        if (root / sub).is_dir() and (paths := scan(root / sub)):
            return paths, f"{what} ({root / sub})"
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        raise BenchError("no real photos found: run `feataug prepare-data deepforest` or pass --images DIR")
    return [str(photo)], "matplotlib's sample photo grace_hopper.jpg (512x600)"


class _PILGaussianBlur:
    """The MoCo v2 reference blur: PIL's GaussianBlur with radius sigma ~ U(0.1, 2.0)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def torchvision_moco_v2(size: int = 224):
    """The MoCo v2 training pipeline as published (torchvision transforms on PIL images)."""
    from torchvision import transforms as T

    from pretrain.transforms import IMAGENET_MEAN, IMAGENET_STD

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([_PILGaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def bench_aug(profile: Profile, result: dict, say: Callable[[str], None],
              images: str | None = None, size: int = 224) -> None:
    """Two-view MoCo v2 augmentation, decode to normalised float batch, one thread each."""
    import cv2
    import torch
    from PIL import Image

    from pretrain.data import ImageDataset, ImageFiles, collate
    from pretrain.transforms import TwoViews, moco_v2_view, normalize

    paths, source = find_images(images)
    n = profile.aug_images
    order = [paths[i % len(paths)] for i in range(n)]
    view = moco_v2_view(size, 0.2, "strong")
    dataset = ImageDataset(ImageFiles(order), TwoViews(view, view))
    tv = torchvision_moco_v2(size)

    def ours():
        batch = [dataset[(i, 1000 + i)] for i in range(n)]
        (v1, v2), _, _ = collate(batch)
        return normalize(v1), normalize(v2)

    def theirs():
        views = []
        for p in order:
            with Image.open(p) as im:
                img = im.convert("RGB")
            views.append((tv(img), tv(img)))
        return torch.stack([a for a, _ in views]), torch.stack([b for _, b in views])

    say(f"augmentation: {n} images x 2 views at {size} px per measurement, {source}")
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        contenders = {"ours": lambda: seconds_per_unit(ours, 1) / n,
                      "torchvision": lambda: seconds_per_unit(theirs, 1) / n}
        with _bar(2 * (profile.warmup + profile.repeats), "augmentation") as bar:
            times = interleave(contenders, profile.repeats, profile.warmup, lambda _: bar.update())
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    r = paired_ratio(times["torchvision"], times["ours"])  # images/s ratio = inverse time ratio
    result["details"]["aug"] = {
        "repeats": profile.repeats, "n_images": n, "distinct_images": len(set(order)),
        "source": source, "size": size, "threads": 1,
        "ours_images_per_s": 1 / r["denominator_median"],
        "peer_images_per_s": 1 / r["numerator_median"], "ratios": r["ratios"],
        "ours_s_per_image": times["ours"], "peer_s_per_image": times["torchvision"],
        "peer": "torchvision PIL pipeline of MoCo v2 (PIL GaussianBlur as in the reference code)",
        "includes": "decode, two augmented views, stacking, float normalisation",
    }
    set_value(result, "aug_pipeline_ratio_vs_torchvision", r["ratio"])


# ----------------------------------------------------------------------------- COCO evaluation
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


# ----------------------------------------------------------------------------- detection training
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


def _quiet_detectron2_logs() -> None:
    """Detectron2 sets up INFO logging to stdout when its logger is not enabled for INFO:
    enable INFO into a null handler so the benchmark's output stays a progress bar."""
    import logging

    for name in ("detectron2", "fvcore", "transfer", "d2"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.propagate = False
        if not log.handlers:
            log.addHandler(logging.NullHandler())


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

    _quiet_detectron2_logs()
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
        cfg = get_detection_cfg(DETECT_CONFIG, opts)
        cfg.freeze()
        ours_cfg = cfg.clone()
        ours_cfg.defrost()
        ours_cfg.SOLVER.AMP.ENABLED = bool(cfg.SOLVER.AMP.ENABLED or amp)
        ours_cfg.freeze()
        setting = (f"{DETECT_CONFIG.name}, {cfg.SOLVER.IMS_PER_BATCH} images/iter, {len(records)} "
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


# ----------------------------------------------------------------------------- driver
SECTIONS: dict[str, Callable] = {
    "pretrain": bench_pretrain,  # also fa
    "aug": bench_aug,
    "coco_eval": bench_coco_eval,
    "detect": bench_detect,
    "gpu": bench_gpu,  # skipped without CUDA
}


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


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
        kwargs = {"images": images} if name == "aug" else {}
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
                        "DeepForest tiles, else labelme photos, else matplotlib's sample photo)")


def main(args: argparse.Namespace) -> int:
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    try:
        if unknown:
            raise BenchError(f"--only: unknown section(s) {', '.join(unknown)}; "
                             f"choose from {', '.join(SECTIONS)}")
        if not str(args.out).endswith(".json"):
            raise BenchError(f"--out {args.out}: give a .json file name (the table goes beside it)")
        profile = PROFILES["quick" if args.quick else "full"]
        result = run(profile, args.out, only, args.images,
                     say=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True))
    except (BenchError, OSError) as e:
        print(f"feataug bench: error: {e}", file=sys.stderr)
        return 2
    print(format_markdown(result))
    print(f"feataug bench: wrote {args.out} and {Path(args.out).with_suffix('.md')} "
          f"({result['wall_s']:.0f} s)")
    return 0
