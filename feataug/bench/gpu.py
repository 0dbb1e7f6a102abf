"""``feataug bench --gpu``: pretraining at the speed of the GPU, one prepared run.

On one GPU with 16 cores the ``gpu`` profile takes about 5 minutes (at most 8: a phase that would
start past ``GpuProfile.budget_s`` is skipped and says so). Phases, each written to the JSON as
soon as it is done:

1. ``images``: ``GpuProfile.images`` ImageNet-like JPEGs (400 x 350, quality 90), random crops of
   real photos (scikit-image's sample photos and, when cached, the DeepForest tiles, both fetched
   by ``feataug.data.fetch``; or ``--images DIR``), written by every core into a temporary
   folder in memory (``/dev/shm`` when present), so reading them is page-cache speed
   (``jpegs.py``).
2. ``model``: MoCo v2 ResNet-50, 224 px, batch 256, bf16 autocast, channels-last, the step alone
   on device tensors: img/s, MFU, peak memory.
3. ``end_to_end``: ``pretrain.engine.train`` on those JPEGs with the CPU path
   (``DATA.AUG_DEVICE cpu``: loader workers run the whole OpenCV pipeline) and the device path
   (``cuda``: workers decode and crop, ``device_aug.augment`` does the rest on the GPU) at each
   worker count: img/s and data-time fraction from the run's own ``metrics.jsonl`` (its first
   half dropped: worker start-up, cuDNN autotuning and the prefetch backlog), MFU, peak memory.
4. ``device_aug``: ``augment`` of one batch's two views, ms per step; and the device ops'
   agreement with OpenCV on this GPU (``bench_device_aug``).
5. ``detect``: Faster R-CNN R50-FPN iterations/s with Detectron2's ``AMPTrainer`` (our
   ``transfer.trainer.Trainer`` with ``SOLVER.AMP.ENABLED``), 16 generated 640 px images/iter.

MFU = img/s x FLOP per image / the GPU's dense bf16 peak: 32.7 GFLOP per image for MoCo v2
ResNet-50 at 224 px (query forward + backward = 3 x 8.2, key forward 8.2); the peaks are
``PEAK_BF16`` (NVIDIA data sheets), and an unknown GPU gets no MFU rather than a guess.

``--dry-run`` runs every phase on tiny sizes (ResNet-18, 32 px, 48 images, the tiny detection
config) on the CPU when there is no GPU, with ``DATA.AUG_DEVICE cpu_split`` as the device path:
it checks the code paths in seconds and its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feataug import configs_dir

from .harness import BenchError, machine_info, median, write_outputs
from .jpegs import load_photos, memory_tmpdir, synthesize_jpegs

SCHEMA_VERSION = 1
# Dense bf16 tensor-core peak in FLOP/s (no sparsity), NVIDIA data sheets; matched against
# torch.cuda.get_device_name(), first match wins.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)
# FLOP per image of one MoCo v2 step: query forward + backward (3 x forward) + key forward.
STEP_FLOP_PER_IMAGE = {("resnet50", 224): 4 * 8.18e9}


@dataclass(frozen=True)
class GpuProfile:
    name: str
    images: int  # synthesised JPEGs
    image_wh: tuple[int, int]  # their size, width x height
    backbone: str
    size: int  # view size
    batch: int
    queue: int
    workers: tuple[int, ...]  # loader workers of the end-to-end runs
    iters: int  # iterations per end-to-end run (one epoch at most)
    log_period: int
    model_steps: int  # per measurement of the model-only step
    model_repeats: int
    detect_config: str
    detect_opts: tuple = ()
    detect_images: int = 64
    detect_image_size: int = 640
    detect_iters: int = 20
    detect_warmup: int = 5
    budget_s: float = 420.0  # no phase starts after this many seconds


PROFILES = {
    "gpu": GpuProfile(
        "gpu", images=30720, image_wh=(400, 350), backbone="resnet50", size=224, batch=256,
        queue=65536, workers=(6, 10, 15), iters=120, log_period=10, model_steps=20,
        model_repeats=3, detect_config="coco_R_50_FPN_1x.yaml",
        detect_opts=("MODEL.MASK_ON", False, "SOLVER.IMS_PER_BATCH", 16,
                     "DATALOADER.NUM_WORKERS", 8, "INPUT.MIN_SIZE_TRAIN", (640,),
                     "INPUT.MAX_SIZE_TRAIN", 1000)),
    "dry": GpuProfile(
        "dry", images=48, image_wh=(64, 56), backbone="resnet18", size=32, batch=8, queue=64,
        workers=(0, 1), iters=6, log_period=2, model_steps=1, model_repeats=1,
        detect_config="tiny_faster_R18_FPN.yaml",
        detect_opts=("SOLVER.IMS_PER_BATCH", 2, "INPUT.MIN_SIZE_TRAIN", (128,),
                     "INPUT.MAX_SIZE_TRAIN", 160, "TEST.PRECISE_BN.ENABLED", False),
        detect_images=4, detect_image_size=128, detect_iters=1, detect_warmup=0, budget_s=600),
}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of the named GPU, or None when it is not in ``PEAK_BF16``."""
    return next((v for key, v in PEAK_BF16 if key in device_name), None)


def mfu(images_per_s: float, backbone: str, size: int, device_name: str) -> float | None:
    """Model FLOP utilisation, or None when the step's FLOP or the GPU's peak is unknown."""
    flop, peak = STEP_FLOP_PER_IMAGE.get((backbone, size)), peak_flops(device_name)
    return None if flop is None or peak is None else images_per_s * flop / peak


# ----------------------------------------------------------------------------- phases
def _pretrain_opts(p: GpuProfile, device: str) -> list:
    from pretrain.utils.amp import cpu_has_native_bf16

    amp = "bfloat16" if device == "cuda" or cpu_has_native_bf16() else "off"
    return ["MODEL.METHOD", "moco", "MODEL.BACKBONE", p.backbone, "MODEL.MOCO.K", p.queue,
            "MODEL.MOCO.M", 0.999, "DATA.IMAGE_SIZE", p.size, "SOLVER.BATCH_SIZE", p.batch,
            "SOLVER.AMP", amp, "SOLVER.CHANNELS_LAST", True, "DEVICE", device]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def phase_model(p: GpuProfile, device: str, device_name: str) -> dict:
    """The MoCo v2 step alone, on synthetic normalised channels-last device tensors."""
    import torch

    from pretrain.config import load_cfg

    from .pretrain_step import _our_step

    cfg = load_cfg(None, _pretrain_opts(p, device))
    _reset_peak(device)
    step = _our_step(cfg, device)
    g = torch.Generator(device=device).manual_seed(0)
    x1, x2 = (torch.randn(p.batch, 3, p.size, p.size, device=device, generator=g)
              .contiguous(memory_format=torch.channels_last) for _ in range(2))

    def measure() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(p.model_steps):
            step(x1, x2)
        _sync(device)
        return (time.perf_counter() - start) / p.model_steps

    measure()  # warm-up: cuDNN autotuning, allocator
    times = [measure() for _ in range(p.model_repeats)]
    step_s = median(times)
    ips = p.batch / step_s
    return {"step_s": step_s, "images_per_s": ips, "times_s": times,
            "mfu": mfu(ips, p.backbone, p.size, device_name), "peak_memory_gib": _peak_gib(device),
            "amp": cfg.SOLVER.AMP}


def phase_end_to_end(p: GpuProfile, device: str, device_name: str, data: Path, work: Path,
                     path: str, workers: int) -> dict:
    """``pretrain.engine.train`` for ``p.iters`` iterations; the second half of its metrics."""
    from pretrain.config import load_cfg
    from pretrain.engine import train

    out = work / f"run-{path}-{workers}"
    aug = {"cpu": "cpu", "device": "cuda" if device == "cuda" else "cpu_split"}[path]
    cfg = load_cfg(None, _pretrain_opts(p, device) + [
        "DATA.ROOT", str(data), "OUTPUT_DIR", str(out), "DATA.AUG_DEVICE", aug,
        "DATALOADER.NUM_WORKERS", workers, "SOLVER.EPOCHS", 1, "SOLVER.MAX_ITER", p.iters,
        "LOG_PERIOD", p.log_period, "TENSORBOARD", False, "KNN.PERIOD", 0])
    _reset_peak(device)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time" in r]
    kept = [r for r in rows if r["iter"] > rows[-1]["iter"] // 2] or rows[-1:]
    step_s = sum(r["time"] for r in kept) / len(kept)
    data_s = sum(r["data_time"] for r in kept) / len(kept)
    ips = p.batch / step_s
    shutil.rmtree(out, ignore_errors=True)
    return {"path": path, "aug_device": aug, "workers": workers, "images_per_s": ips,
            "step_s": step_s, "data_time_fraction": data_s / step_s,
            "mfu": mfu(ips, p.backbone, p.size, device_name), "peak_memory_gib": _peak_gib(device),
            "measured_iters": [r["iter"] for r in kept], "window_step_s": [r["time"] for r in rows],
            "wall_s": round(wall, 1)}


def phase_device_aug(p: GpuProfile, device: str, data: Path, photos: list[np.ndarray]) -> dict:
    """``augment`` of a batch's two views (crops from the synthesised JPEGs), and the device ops
    against OpenCV on this device."""

    from pretrain.config import load_cfg
    from pretrain.data import ImageDataset, collate, scan_folder
    from pretrain.device_aug import augment
    from pretrain.transforms import build_pretrain_transform

    from .aug import bench_device_aug

    cfg = load_cfg(None, ["DATA.IMAGE_SIZE", p.size])
    source = scan_folder(data)
    ds = ImageDataset(source, build_pretrain_transform(cfg, split=True))
    (c1, c2, p1, p2), _, _ = collate([ds[(i % len(source), i)] for i in range(p.batch)])
    c1, c2 = c1.to(device), c2.to(device)

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        augment(c1, p1)
        augment(c2, p2)
        _sync(device)
        return time.perf_counter() - start

    run()
    times = [run() for _ in range(5)]
    agreement = bench_device_aug(photos[:8], size=p.size, device=device, repeats=1)
    return {"ms_per_step": 1e3 * median(times), "batch": p.batch, "times_s": times,
            "max_lsb": agreement["aug_device_vs_cpu_max_lsb"],
            "cpu_ms_per_image": {k[len("aug_cpu_ms_per_image_"):]: v for k, v in agreement.items()
                                 if k.startswith("aug_cpu_ms_per_image_")}}


def phase_detect(p: GpuProfile, device: str, work: Path) -> dict:
    """Detectron2 iterations/s: ``transfer.trainer.Trainer`` with ``SOLVER.AMP.ENABLED`` (its
    ``AMPTrainer`` on CUDA), generated images."""
    import copy

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.env import seed_all_rng

    from pretrain.utils.logger import setup_logging
    from transfer.config import get_detection_cfg
    from transfer.trainer import Trainer

    from .detect import _SteppedTrainer, make_detection_images

    setup_logging(("detectron2", "fvcore", "transfer", "d2"), console=False)
    name = "feataug_bench_gpu_detect"
    folder = work / "detect"
    folder.mkdir(parents=True, exist_ok=True)
    records = make_detection_images(folder, p.detect_images, p.detect_image_size)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: copy.deepcopy(records))
    MetadataCatalog.get(name).set(thing_classes=["blue box", "red box"])
    opts = ["DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "DATASETS.AUTO_NUM_CLASSES", False,
            "MODEL.ROI_HEADS.NUM_CLASSES", 2, "MODEL.DEVICE", device, "MODEL.WEIGHTS", "",
            "SOLVER.MAX_ITER", 1000000, "SOLVER.AMP.ENABLED", True, "OUTPUT_DIR", str(folder),
            *p.detect_opts]
    cfg = get_detection_cfg(configs_dir() / "detection" / p.detect_config, opts)
    cfg.freeze()
    seed_all_rng(0)
    trainer = _SteppedTrainer(Trainer(cfg))
    try:
        if p.detect_warmup:
            trainer.iterations(p.detect_warmup, 0)
        _sync(device)
        _reset_peak(device)
        s_per_iter = trainer.iterations(p.detect_iters, 1)
        _sync(device)
    finally:
        trainer.close()
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    loop = trainer.trainer.step_loop  # None: Detectron2's plain SimpleTrainer
    return {"iter_per_s": 1 / s_per_iter, "images_per_iter": cfg.SOLVER.IMS_PER_BATCH,
            "config": p.detect_config,
            "trainer": "SimpleTrainer" if loop is None else type(loop).__name__,
            "image_size": p.detect_image_size, "iters": p.detect_iters,
            "peak_memory_gib": _peak_gib(device)}


# ----------------------------------------------------------------------------- the run
def run_gpu(profile: GpuProfile, out: str | os.PathLike, images: str | None = None,
            say: Callable[[str], None] = print) -> dict:
    """Every phase of ``profile``; writes ``out`` (JSON) and the markdown beside it after each."""
    import torch

    cuda = torch.cuda.is_available()
    if profile.name != "dry" and not cuda:
        raise BenchError("--gpu needs a CUDA GPU and torch sees none (torch.cuda.is_available() "
                         "is False); `feataug bench --gpu --dry-run` runs the tiny version on the CPU")
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    if cuda:
        torch.backends.cudnn.benchmark = True
    p = profile
    result = {"schema": SCHEMA_VERSION, "profile": p.name, "complete": False, "device": name,
              "peak_bf16_flops": peak_flops(name) if cuda else None,
              "setting": f"MoCo v2 {p.backbone}, {p.size} px, batch {p.batch}, queue {p.queue}, "
                         "bf16 autocast (CPU: only with native bf16), channels-last",
              "machine": machine_info(), "phases": {}}
    start = time.perf_counter()

    def phase(key: str, fn: Callable[[], dict]) -> None:
        if time.perf_counter() - start > p.budget_s:
            result["phases"][key] = {"skipped": f"past the {p.budget_s:.0f} s budget"}
        else:
            t = time.perf_counter()
            say(f"{key} ...")
            try:
                result["phases"][key] = {**fn(), "phase_s": round(time.perf_counter() - t, 1)}
            except Exception as e:  # one broken phase must not cost the others their GPU time
                say(f"{key} failed:\n{traceback.format_exc()}")
                result["phases"][key] = {"error": f"{type(e).__name__}: {e}",
                                         "phase_s": round(time.perf_counter() - t, 1)}
                if cuda:
                    torch.cuda.empty_cache()
        write_outputs(result, out, format_gpu_markdown)

    photos, source = load_photos(images)
    jpeg_bytes = p.images * p.image_wh[0] * p.image_wh[1] * 3 // 4  # q90: well under raw / 4
    work = Path(tempfile.mkdtemp(prefix="feataug-bench-gpu-", dir=memory_tmpdir(jpeg_bytes)))
    try:
        data = work / "jpegs"
        data.mkdir()
        phase("images", lambda: {**synthesize_jpegs(data, p.images, photos, p.image_wh),
                                 "source": source, "folder": str(work)})
        phase("model", lambda: phase_model(p, device, name))
        for path in ("cpu", "device"):
            for w in p.workers:
                phase(f"end_to_end/{path}/{w}",
                      lambda path=path, w=w: phase_end_to_end(p, device, name, data, work, path, w))
        phase("device_aug", lambda: phase_device_aug(p, device, data, photos))
        phase("detect", lambda: phase_detect(p, device, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["complete"] = all("skipped" not in v and "error" not in v
                             for v in result["phases"].values())
    result["failed"] = [k for k, v in result["phases"].items() if "error" in v]
    result["wall_s"] = round(time.perf_counter() - start, 1)
    write_outputs(result, out, format_gpu_markdown)
    return result


def _f(v, fmt: str = ".0f") -> str:
    return "—" if v is None else format(v, fmt)


def format_gpu_markdown(result: dict) -> str:
    """The GPU report: one row per pretraining measurement, then augmentation and detection."""
    ph = result["phases"]
    lines = [f"# feataug bench --gpu ({result['profile']})", "",
             f"{result['device']}: {result['setting']}.", ""]
    if "images" in ph and "n" in ph["images"]:
        im = ph["images"]
        lines += [f"Data: {im['n']} JPEGs {im['width']}x{im['height']} q{im['quality']} "
                  f"(mean {im['mean_kib']} KiB) from {im['source']}, in memory.", ""]
    lines += ["| run | workers | img/s | data time | MFU | peak GiB |", "|---|---|---|---|---|---|"]
    for key, v in ph.items():
        if key != "model" and not key.startswith("end_to_end/"):
            continue
        if "skipped" in v or "error" in v:
            why = f"skipped: {v['skipped']}" if "skipped" in v else f"failed: {v['error']}"
            lines.append(f"| {key} | | {why} | | | |")
            continue
        run = "model step only" if key == "model" else f"end to end, {v['path']} path"
        workers = "—" if key == "model" else str(v["workers"])
        frac = "—" if key == "model" else f"{100 * v['data_time_fraction']:.0f} %"
        mfu_cell = "—" if v.get("mfu") is None else f"{100 * v['mfu']:.1f} %"
        lines.append(f"| {run} | {workers} | {_f(v['images_per_s'])} | {frac} | {mfu_cell} | "
                     f"{_f(v.get('peak_memory_gib'), '.1f')} |")
    aug, det = ph.get("device_aug", {}), ph.get("detect", {})
    for key, v in (("Device augmentation", aug), ("Detection", det)):
        if "error" in v:
            lines += ["", f"{key}: failed: {v['error']}"]
    if "ms_per_step" in aug:
        lsb = max(aug["max_lsb"].values())
        lines += ["", f"Device augmentation: {aug['ms_per_step']:.1f} ms per step (two views of "
                      f"{aug['batch']}); max {lsb} LSB from OpenCV on this device."]
    if "iter_per_s" in det:
        lines += ["", f"Detection ({det['config']}, {det['images_per_iter']} images/iter, "
                      f"{det['trainer']}): {det['iter_per_s']:.2f} it/s."]
    return "\n".join(lines) + "\n"

