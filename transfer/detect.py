"""``feataug detect``: fine-tune and evaluate Faster/Mask R-CNN with Detectron2.

Detectron2's ``train_net`` flags, plus dataset registration from the command line and K-seed
trials::

    feataug detect --config-file configs/detection/tiny_faster_R18_FPN.yaml \\
        --register-voc trees_train data/trees trainval --register-voc trees_test data/trees test \\
        --trials 5 DATASETS.TRAIN "('trees_train',)" DATASETS.TEST "('trees_test',)" \\
        MODEL.WEIGHTS r18.pkl OUTPUT_DIR out/trees

Every run writes ``OUTPUT_DIR/eval_results.json`` (the evaluators' nested dict). With
``--trials K`` trial ``k`` runs with ``SEED`` = base + k (base = ``SEED``, or 0 when negative) in
``OUTPUT_DIR/trial<k>/``, and ``OUTPUT_DIR/trials.json`` / ``trials.md`` hold every metric's mean
and sample standard deviation (n - 1 denominator; 0 for a single trial). ``--resume`` skips
trials that already have results and resumes the others from their last checkpoint.

Weights are checked before anything runs or is written: ``MODEL.WEIGHTS`` is read without
executing anything from it (:func:`transfer.safe_load.load_detectron2_weights`), and loaded into
the model (built on the meta device, no memory) as Detectron2 will load it. Training needs every
ResNet trunk tensor from the file with its shape (``backbone.bottom_up.*`` in FPN models; in C4
models ``backbone.*`` and ``roi_heads.res5.*`` except the added ``res5.norm``), ``--eval-only``
every model tensor. An empty ``MODEL.WEIGHTS`` (random initialization) needs ``--from-scratch``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pretrain.utils.io import atomic_write_text

__all__ = [
    "DetectError",
    "add_arguments",
    "checkpointer_class",
    "main",
    "setup",
    "run",
    "run_detection",
    "flatten_metrics",
    "summarize_trials",
    "format_trials_markdown",
]

logger = logging.getLogger("transfer.detect")


class DetectError(Exception):
    """A detection run that cannot start (bad flags, unregistered data, class mismatch)."""


# ------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "KEY VALUE pairs override the config, e.g. SOLVER.MAX_ITER 100 MODEL.WEIGHTS w.pkl.\n"
        "Datasets named in DATASETS.TRAIN/TEST must be registered (--register-*) or be Detectron2's\n"
        "standard names under $DETECTRON2_DATASETS (voc_2007_trainval, voc_2012_trainval,\n"
        "voc_2007_test, coco_2017_train, coco_2017_val, ...)."
    )
    parser.add_argument(
        "--config-file", required=True, metavar="FILE", help="detection config (yaml)"
    )
    parser.add_argument(
        "--register-voc",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "ROOT", "SPLIT"),
        help="register a VOC-format split (ROOT/Annotations, ROOT/JPEGImages, "
        "ROOT/ImageSets/Main/SPLIT.txt); repeatable",
    )
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format json and its image folder; repeatable",
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank")
    parser.add_argument(
        "--dist-url",
        default="auto",
        help="init method of torch.distributed, e.g. tcp://host:port (auto: a free local port)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="resume from OUTPUT_DIR's last checkpoint"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS, no training"
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="train from random initialization (MODEL.WEIGHTS must be empty)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="K",
        help="train K times with seeds SEED..SEED+K-1; write OUTPUT_DIR/trials.{md,json}",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides"
    )


def main(args: argparse.Namespace) -> int:
    from transfer.config import ConfigError
    from transfer.datasets import DatasetError

    try:
        _check_args(args)
        cfg = setup(args)  # validates config and datasets before any process starts
    except (ConfigError, DatasetError, DetectError) as e:
        print(f"feataug detect: error: {e}", file=sys.stderr)
        return 2
    if args.num_gpus * args.num_machines == 1:
        try:
            run(cfg, args)
        except (DatasetError, DetectError) as e:  # records are read when training starts
            print(f"feataug detect: error: {e}", file=sys.stderr)
            return 1
    else:
        from detectron2.engine import launch

        launch(
            _worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    print(f"feataug detect: outputs in {cfg.OUTPUT_DIR}")
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.trials is not None and args.trials < 1:
        raise DetectError(f"--trials must be >= 1, got {args.trials}")
    if args.trials is not None and args.eval_only:
        raise DetectError("--trials trains K models; it cannot be combined with --eval-only")
    if args.from_scratch and args.eval_only:
        raise DetectError(
            "--eval-only evaluates MODEL.WEIGHTS; it cannot be combined with --from-scratch"
        )
    if args.num_gpus < 1 or args.num_machines < 1 or not 0 <= args.machine_rank < args.num_machines:
        raise DetectError(
            "need --num-gpus >= 1, --num-machines >= 1, 0 <= --machine-rank < --num-machines"
        )
    if args.num_gpus * args.num_machines > 1:
        import torch

        if not torch.cuda.is_available():
            raise DetectError(
                "multi-process training (--num-gpus/--num-machines > 1) needs CUDA GPUs"
            )
        if args.num_gpus > torch.cuda.device_count():
            raise DetectError(
                f"--num-gpus {args.num_gpus} but {torch.cuda.device_count()} GPU(s) visible"
            )
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]


def run_detection(
    config_file: str | os.PathLike,
    opts: Sequence[str] = (),
    *,
    register_voc: Sequence[Sequence[str]] = (),
    register_coco: Sequence[Sequence[str]] = (),
    trials: int | None = None,
    eval_only: bool = False,
    resume: bool = False,
    from_scratch: bool = False,
) -> dict:
    """Library form of ``feataug detect`` in this process (one process, no ``launch``).

    ``register_voc``: ``(NAME, ROOT, SPLIT)`` triples; ``register_coco``: ``(NAME, JSON,
    IMAGE_ROOT)``. ``from_scratch``: train from random initialization (``MODEL.WEIGHTS`` must be
    empty; without it empty weights are refused). Returns the evaluation results (nested dict
    as in ``eval_results.json``), or ``{"trials": [...], "summary": {...}}`` with ``trials``.
    Raises ``ConfigError``, ``DatasetError`` or :class:`DetectError` on bad input.
    """
    args = argparse.Namespace(
        config_file=str(config_file),
        register_voc=[[str(v) for v in r] for r in register_voc],
        register_coco=[[str(v) for v in r] for r in register_coco],
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
        resume=resume,
        eval_only=eval_only,
        from_scratch=from_scratch,
        trials=trials,
        opts=[str(o) for o in opts],
    )
    _check_args(args)
    return run(setup(args), args)


# ------------------------------------------------------------------------------------ setup
def setup(args: argparse.Namespace):
    """Register datasets and build the (frozen) config for ``args``; raise on bad input."""
    import torch

    from transfer import datasets
    from transfer.config import get_detection_cfg

    cfg = get_detection_cfg(args.config_file, args.opts)
    datasets.register_standard_voc()
    classes = cfg.DATASETS.CLASS_NAMES_FILE or None
    for name, root, split in args.register_voc:
        datasets.register_voc(name, root, split, classes, replace=True)
    for name, json_file, image_root in args.register_coco:
        datasets.register_coco(name, json_file, image_root, replace=True)

    _check_datasets(cfg, eval_only=args.eval_only)
    _check_weights(cfg, args)
    _check_output_dir(cfg.OUTPUT_DIR)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("feataug detect: CUDA is not available, running on CPU", file=sys.stderr)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def _check_datasets(cfg, eval_only: bool) -> None:
    """Every named dataset is registered, test sets have a known evaluator, and the number of
    classes agrees with the data (or is taken from it under ``DATASETS.AUTO_NUM_CLASSES``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    train, test = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)
    if not train and not eval_only:
        raise DetectError(
            "DATASETS.TRAIN is empty: name the training sets, e.g. DATASETS.TRAIN \"('x',)\""
        )
    if not test and eval_only:
        raise DetectError("--eval-only needs DATASETS.TEST")
    for name in train + test:
        if name not in DatasetCatalog.list():
            raise DetectError(
                f"dataset {name!r} is not registered: use --register-voc / --register-coco, "
                "or a standard name with its files under $DETECTRON2_DATASETS"
            )
        meta = MetadataCatalog.get(name)
        for key in ("json_file", "dirname"):  # the standard names exist even without their files
            path = getattr(meta, key, None)
            if path and not Path(path).exists():
                raise DetectError(
                    f"{path}: not found (dataset {name!r}; is DETECTRON2_DATASETS set?)"
                )
    for name in test:
        kind = getattr(MetadataCatalog.get(name), "evaluator_type", None)
        if kind not in ("pascal_voc", "coco"):
            raise DetectError(
                f"test set {name!r} has evaluator_type {kind!r}; expected pascal_voc or coco"
            )

    # Class lists of the sets that have one (Detectron2's COCO names set it only on loading).
    known = {
        n: list(MetadataCatalog.get(n).thing_classes)
        for n in train + test
        if hasattr(MetadataCatalog.get(n), "thing_classes")
    }
    if cfg.DATASETS.AUTO_NUM_CLASSES:
        if not known:
            raise DetectError("DATASETS.AUTO_NUM_CLASSES: no dataset declares its classes")
        first, classes = next(iter(known.items()))
        for name, other in known.items():
            if other != classes:
                raise DetectError(
                    f"datasets {first!r} and {name!r} have different classes ({len(classes)} vs "
                    f"{len(other)}); give one class list with DATASETS.CLASS_NAMES_FILE"
                )
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
        return
    for name, classes in known.items():
        if len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise DetectError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
                f"{name!r} has {len(classes)} classes (set DATASETS.AUTO_NUM_CLASSES True to follow the data)"
            )


# ---------------------------------------------------------------------------------- weights
def _check_weights(cfg, args: argparse.Namespace) -> None:
    """``MODEL.WEIGHTS`` agrees with ``--from-scratch``, reads safely and fits the model."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if args.eval_only:
            raise DetectError("--eval-only evaluates MODEL.WEIGHTS, which is empty")
        if not args.from_scratch:
            raise DetectError(
                "MODEL.WEIGHTS is empty: the model would train from random initialization; "
                "give weights (e.g. from feataug convert) or pass --from-scratch"
            )
        return
    if args.from_scratch:
        raise DetectError(f"--from-scratch contradicts MODEL.WEIGHTS {weights}: drop one of them")
    local = weights
    if "://" in weights:
        from detectron2.utils.file_io import PathManager

        try:
            local = PathManager.get_local_path(weights)
        except Exception as e:
            raise DetectError(f"{weights}: MODEL.WEIGHTS cannot be fetched ({e})") from None
    if not Path(local).is_file():
        raise DetectError(f"{weights}: MODEL.WEIGHTS file not found")
    from transfer.safe_load import UnsafeFileError, load_detectron2_weights

    try:
        data = load_detectron2_weights(local)
    except UnsafeFileError as e:
        raise DetectError(f"MODEL.WEIGHTS {e}") from None
    # --eval-only evaluates OUTPUT_DIR's own checkpoint when resuming from one
    resumed = args.resume and Path(cfg.OUTPUT_DIR, "last_checkpoint").is_file()
    if not (args.eval_only and resumed):
        _check_fit(cfg, weights, data, complete=args.eval_only)


def _tensor_like(v) -> bool:
    import torch

    return isinstance(v, np.ndarray | torch.Tensor)


def _trunk_keys(keys: Sequence[str]) -> list[str]:
    """The ResNet trunk's keys of a detector state_dict: ``backbone.bottom_up.*`` (FPN), or
    ``backbone.*`` and ``roi_heads.res5.*`` without the added ``res5.norm`` (C4)."""
    base = (
        "backbone.bottom_up."
        if any(k.startswith("backbone.bottom_up.") for k in keys)
        else "backbone."
    )
    return [
        k
        for k in keys
        if k.startswith(base)
        or (k.startswith("roi_heads.res5.") and not k.startswith("roi_heads.res5.norm."))
    ]


_BLOCK = re.compile(r"(?:^|[._])res([2-5])[._](\d+)[._](conv[1-3]|branch2[a-c])")


def _file_depth(keys) -> int | None:
    """ResNet depth of Detectron2- or Caffe2-named trunk keys, if they make a known ResNet."""
    from transfer.convert import DEPTHS

    blocks, bottleneck = [0, 0, 0, 0], False
    for k in keys:
        m = _BLOCK.search(k)
        if m:
            stage, block = int(m.group(1)) - 2, int(m.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
            bottleneck |= m.group(3) in ("conv3", "branch2c")
    return DEPTHS.get((tuple(blocks), bottleneck))


def _likely_cause(cfg, file_keys: Sequence[str], weights: str) -> str:
    if any(re.search(r"(?:^|\.)layer[1-4]\.\d+\.", k) for k in file_keys):
        return (
            "the file has torchvision names (layer1, ...): not converted? "
            f"run feataug convert {weights} OUT.pkl"
        )
    depth, want = _file_depth(file_keys), cfg.MODEL.RESNETS.DEPTH
    if depth is not None and depth != want:
        return f"wrong depth? the file is ResNet-{depth}, the config MODEL.RESNETS.DEPTH {want}"
    if depth is not None:
        return f"the file holds a ResNet-{depth} but not these tensors, or with other shapes"
    return f"the file's keys look like {file_keys[0]!r}" if file_keys else "the file is empty"


@contextlib.contextmanager
def _quiet(*names: str):
    """Silence these loggers and their children (their warnings on the trial load would
    otherwise reach stderr, or the log of an earlier run in this process)."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _check_fit(cfg, weights: str, data: dict, complete: bool) -> None:
    """Load ``data`` into the model as Detectron2 will (on the meta device) and refuse weights
    that leave trunk tensors (``complete``: any model tensor) random or mis-shaped."""
    import torch
    from detectron2.modeling import build_model

    import transfer.modeling  # noqa: F401  (registers the C4 heads the configs name)

    file_keys = [str(k) for k in data["model"]]
    bad_type = next((k for k, v in data["model"].items() if not _tensor_like(v)), None)
    if bad_type is not None:
        v = data["model"][bad_type]
        raise DetectError(
            f"{weights}: not Detectron2 weights (model[{bad_type!r}] is a {type(v).__name__}): "
            f"a training checkpoint? run feataug convert {weights} OUT.pkl"
        )
    meta = cfg.clone()
    meta.MODEL.DEVICE = "meta"
    with _quiet("detectron2", "fvcore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: copying into meta tensors is a no-op
        with torch.device("meta"):
            model = build_model(meta)
        checkpoint = {**data, "model": dict(data["model"])}
        try:
            result = checkpointer_class()(model)._load_model(checkpoint)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. arrays of Python objects
            reason = " ".join(str(e).split())[:160]
            raise DetectError(f"{weights}: cannot be loaded into the model ({reason})") from None
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    shapes = {k: (tuple(a), tuple(b)) for k, a, b in result.incorrect_shapes}
    lost = set(result.missing_keys) | set(shapes)
    trunk = _trunk_keys(keys)
    wanted = keys if complete else trunk
    bad = [k for k in wanted if k in lost]
    if not bad:
        return
    listing = ", ".join(
        f"{k} (shape {shapes[k][0]} in the file, {shapes[k][1]} in the model)" if k in shapes else k
        for k in bad[:3]
    ) + (", ..." if len(bad) > 3 else "")
    if complete:
        what = (
            f"--eval-only needs the whole model from the file, but {len(bad)} of {len(wanted)} "
            "model tensors are not in it or have another shape"
        )
        if not any(k in lost for k in trunk):
            cause = "only the backbone is there: evaluate a trained detector (model_final.pth)"
        else:
            cause = _likely_cause(cfg, file_keys, weights)
    else:
        what = f"{len(bad)} of {len(wanted)} backbone tensors would stay random"
        cause = _likely_cause(cfg, file_keys, weights)
    raise DetectError(f"{weights}: {what} ({listing}); {cause}")


@functools.cache
def checkpointer_class():
    """Detectron2's ``DetectionCheckpointer`` reading weights through ``transfer.safe_load``."""
    from detectron2.checkpoint import DetectionCheckpointer

    from transfer import safe_load

    class SafeCheckpointer(DetectionCheckpointer):
        """``.pkl`` through the restricted unpickler, other files through ``load_torch`` (no
        placeholders): nothing from a weights file runs. Refusals raise :class:`DetectError`."""

        def _load_file(self, filename):
            try:
                if filename.endswith(".pkl"):
                    return safe_load.load_detectron2_weights(filename)
                return super()._load_file(filename)
            except safe_load.UnsafeFileError as e:
                raise DetectError(str(e)) from None

        def _torch_load(self, f):
            return safe_load.load_torch(f)

    SafeCheckpointer.__module__ = __name__
    return SafeCheckpointer


def _check_output_dir(output_dir: str) -> None:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DetectError(f"OUTPUT_DIR {out}: exists and is not a folder")
    folder = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise DetectError(f"OUTPUT_DIR {out}: cannot be created, {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DetectError(f"OUTPUT_DIR {out}: no write permission in {folder}")


# -------------------------------------------------------------------------------------- run
def _worker(args: argparse.Namespace) -> None:
    """Entry of every process started by ``launch``."""
    cfg = setup(args)  # spawned processes do not inherit the registrations
    run(cfg, args)


def run(cfg, args: argparse.Namespace) -> dict:
    """Train/evaluate once, or ``args.trials`` times; returns the results (rank 0)."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    rank = comm.get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    # One set of handlers per run: in-process callers (the demo, trials) run several times,
    # and Detectron2's cached setup_logger would otherwise stack handlers and repeat every line.
    setup_logger.cache_clear()
    for name in ("detectron2", "fvcore", "transfer"):
        logging.getLogger(name).handlers.clear()
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name=name, abbrev_name=name[:2])
    if args.trials is None:
        return _run_once(cfg, args)

    base = cfg.SEED if cfg.SEED >= 0 else 0
    trials = []
    for k in range(args.trials):
        tcfg = cfg.clone()
        tcfg.defrost()
        tcfg.SEED = base + k
        tcfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, f"trial{k}")
        tcfg.freeze()
        done = Path(tcfg.OUTPUT_DIR, "eval_results.json")
        if args.resume and done.is_file():
            logger.info(f"trial {k}: results exist in {done}, skipped")
            results = json.loads(done.read_text())
        else:
            logger.info(f"trial {k + 1}/{args.trials}: seed {tcfg.SEED}, output {tcfg.OUTPUT_DIR}")
            results = _run_once(tcfg, args)
        trials.append(
            {"trial": k, "seed": tcfg.SEED, "output_dir": tcfg.OUTPUT_DIR, "results": results}
        )
    summary = write_trials(cfg.OUTPUT_DIR, trials) if comm.is_main_process() else None
    return {"trials": trials, "summary": summary}


def _run_once(cfg, args: argparse.Namespace) -> dict:
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from transfer.trainer import Trainer

    rank = comm.get_rank()
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if comm.is_main_process():
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer_class()(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        old = trainer.checkpointer  # the same files and state, read safely
        trainer.checkpointer = checkpointer_class()(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None) or {}
    results = _plain(results or {})
    if comm.is_main_process():
        atomic_write_text(
            os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), json.dumps(results, indent=2)
        )
    return results


def _plain(obj):
    """Evaluator output (OrderedDicts, numpy scalars) as JSON-ready values (NaN/inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (float, np.floating, np.integer)) and not isinstance(obj, bool):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


# ----------------------------------------------------------------------------------- trials
def flatten_metrics(results: Mapping, prefix: str = "") -> dict[str, float]:
    """``{"bbox": {"AP": 1.0}}`` -> ``{"bbox/AP": 1.0}`` (any depth; None kept as NaN)."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "/"))
        elif value is None or isinstance(value, (int, float, np.number)):
            flat[name] = float("nan") if value is None else float(value)
    return flat


def summarize_trials(per_trial: Sequence[Mapping[str, float]]) -> dict[str, dict]:
    """Per metric: ``mean``, ``std`` (sample standard deviation, n - 1 denominator; 0 when one
    value), ``n`` and ``values``, over the trials that report a finite value. Metric order: first
    appearance."""
    names: list[str] = []
    for metrics in per_trial:
        names += [m for m in metrics if m not in names]
    out = {}
    for m in names:
        values = [float(t[m]) for t in per_trial if m in t and math.isfinite(float(t[m]))]
        arr = np.array(values, dtype=np.float64)
        out[m] = {
            "mean": float(arr.mean()) if len(arr) else None,
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else (0.0 if len(arr) else None),
            "n": len(values),
            "values": [
                float(t[m]) if m in t and math.isfinite(float(t[m])) else None for t in per_trial
            ],
        }
    return out


def format_trials_markdown(summary: Mapping[str, Mapping], seeds: Sequence[int]) -> str:
    head = "| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    rule = "|---|---|" + "---|" * len(seeds)
    rows = []
    for m, s in summary.items():
        mean_std = "n/a" if s["mean"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"
        vals = " | ".join("n/a" if v is None else f"{v:.2f}" for v in s["values"])
        rows.append(f"| {m} | {mean_std} | {vals} |")
    return (
        f"{len(seeds)} trials (seeds {', '.join(map(str, seeds))}); "
        "std = sample standard deviation (n - 1)\n\n" + "\n".join([head, rule, *rows]) + "\n"
    )


def write_trials(output_dir: str | os.PathLike, trials: Sequence[Mapping]) -> dict:
    """Write ``trials.json`` and ``trials.md`` in ``output_dir``; returns the summary."""
    summary = summarize_trials([flatten_metrics(t["results"]) for t in trials])
    seeds = [t["seed"] for t in trials]
    doc = {"summary": summary, "trials": list(trials), "std": "sample (ddof=1)"}
    atomic_write_text(Path(output_dir, "trials.json"), json.dumps(_plain(doc), indent=2))
    atomic_write_text(Path(output_dir, "trials.md"), format_trials_markdown(summary, seeds))
    logger.info("trials:\n" + format_trials_markdown(summary, seeds))
    return summary
