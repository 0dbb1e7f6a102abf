"""``feataug detect``: fine-tune and evaluate Faster/Mask R-CNN with Detectron2.

One concern: the command (its flags, every check before anything runs or is written, the run
and its trials); weights, schedules, trials and provenance have their own modules.

Detectron2's ``train_net`` flags, plus dataset registration from the command line and K-seed
trials::

    feataug detect --config-file configs/detection/tiny_faster_R18_FPN.yaml \\
        --register-voc trees_train data/trees trainval --register-voc trees_test data/trees test \\
        --trials 5 DATASETS.TRAIN "('trees_train',)" DATASETS.TEST "('trees_test',)" \\
        MODEL.WEIGHTS r18.pkl OUTPUT_DIR out/trees

Every run writes ``OUTPUT_DIR/eval_results.json`` (the evaluators' nested dict), the config it
ran (``config.yaml``, after rescaling) and what produced it (``provenance.json``, also the head of
``log.txt``: command, weights sha256, versions, git commit; ``transfer/provenance.py``). With
``--trials K`` trial ``k`` runs with ``SEED`` = base + k (base = ``SEED``, or 0 when negative) in
``OUTPUT_DIR/trial<k>/``, and ``OUTPUT_DIR/trials.json`` / ``trials.md`` / ``trials.png`` hold
every metric's mean and sample standard deviation (n − 1 denominator; undefined, shown n/a, for a
single trial). ``--resume`` skips trials that already have results and resumes the others from
their last checkpoint.

Fewer GPUs than the protocol: a config with ``SOLVER.REFERENCE_WORLD_SIZE`` R (the paper configs:
8) is rescaled for the N processes that run it by Detectron2's
``DefaultTrainer.auto_scale_workers`` (images per process stay ``IMS_PER_BATCH / R``; batch and
``BASE_LR`` times N/R, ``MAX_ITER``, ``STEPS``, ``WARMUP_ITERS``, ``CHECKPOINT_PERIOD`` and
``TEST.EVAL_PERIOD`` times R/N). One line at the start says what was rescaled, and a warning
follows when a protocol config runs with other than 2 images per process.

Weights are checked before anything runs or is written (``transfer/weights.py``): read without
executing anything from them, they must fit the model; an empty ``MODEL.WEIGHTS`` (random
initialization) needs ``--from-scratch``. Trial summaries: ``transfer/trials.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pretrain.errors import FeatAugError, TrainingError
from pretrain.utils.io import atomic_write_text
from pretrain.utils.lock import run_lock
from pretrain.utils.logger import setup_logging
from transfer import provenance
from transfer.schedule import check_schedule, rescale_for_world_size
from transfer.trials import (
    _plain,
    flatten_metrics,
    format_trials_markdown,
    summarize_trials,
    write_trials,
)
from transfer.weights import DetectError, check_weights, checkpointer_class

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
    _check_args(args)
    cfg = setup(args)  # validates config and datasets before any process starts
    with run_lock(cfg.OUTPUT_DIR, "feataug detect"):  # held here for every process and trial
        _check_output_dir(cfg.OUTPUT_DIR, args.resume)  # no run has filled it meanwhile
        if args.num_gpus * args.num_machines == 1:
            try:
                run(cfg, args)
            except (TrainingError, DetectError):  # DetectError: a checkpoint refused before use
                raise
            except FeatAugError as e:  # data that fails once the run reads it: the run stops
                raise TrainingError(str(e)) from None
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
    if args.resume and args.eval_only:
        raise DetectError(
            "--eval-only with --resume would evaluate into the run's own folder, replacing its "
            "record: give MODEL.WEIGHTS DIR/model_final.pth and another OUTPUT_DIR"
        )
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
    quiet: bool = False,
    resume: bool = False,
    from_scratch: bool = False,
) -> dict:
    """Library form of ``feataug detect`` in this process (one process, no ``launch``).

    ``register_voc``: ``(NAME, ROOT, SPLIT)`` triples; ``register_coco``: ``(NAME, JSON,
    IMAGE_ROOT)``. ``from_scratch``: train from random initialization (``MODEL.WEIGHTS`` must be
    empty; without it empty weights are refused). ``quiet``: Detectron2's log goes to
    ``OUTPUT_DIR/log.txt`` only, not to the console. Returns the evaluation results (nested dict
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
        quiet=quiet,
    )
    _check_args(args)
    cfg = setup(args)
    with run_lock(cfg.OUTPUT_DIR, "feataug detect"):
        _check_output_dir(cfg.OUTPUT_DIR, args.resume)
        return run(cfg, args)


# ------------------------------------------------------------------------------------ setup
def setup(args: argparse.Namespace, records: bool = True):
    """Register datasets and build the (frozen) config for ``args``; raise on bad input.
    ``records``: also read every dataset's records (the processes ``launch`` starts skip it)."""
    import torch

    with warnings.catch_warnings():  # fvcore and Detectron2 call torch.jit.script at import
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning,
                                r"torch\.jit\._script")
        from transfer import datasets, trainer  # noqa: F401  (trainer: Detectron2's models)
        from transfer.config import get_detection_cfg

    cfg = get_detection_cfg(args.config_file, args.opts)
    datasets.register_standard_voc()
    classes = cfg.DATASETS.CLASS_NAMES_FILE or None
    for name, root, split in args.register_voc:
        datasets.register_voc(name, root, split, classes, replace=True)
    for name, json_file, image_root in args.register_coco:
        datasets.register_coco(name, json_file, image_root, replace=True)

    check_schedule(cfg, args.num_gpus * args.num_machines)
    _check_datasets(cfg, eval_only=args.eval_only)
    if records:  # bad data is refused before a model is built or a file written
        used = [] if args.eval_only else list(cfg.DATASETS.TRAIN)
        datasets.check_records(used + list(cfg.DATASETS.TEST))
    check_weights(cfg, args)
    _check_output_dir(cfg.OUTPUT_DIR, args.resume)
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


# what a detection run leaves in its OUTPUT_DIR (and in each trial's folder)
RUN_FILES = ("last_checkpoint", "model_*.pth", "eval_results.json", "metrics.json",
             "trials.json")


def _check_output_dir(output_dir: str, resume: bool) -> None:
    """A folder that can be written, and never one holding an earlier run unless resuming it
    (a fresh run would replace its checkpoints and results)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DetectError(f"OUTPUT_DIR {out}: exists and is not a folder")
    folder = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise DetectError(f"OUTPUT_DIR {out}: cannot be created, {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DetectError(f"OUTPUT_DIR {out}: no write permission in {folder}")
    if resume or not out.is_dir():
        return
    held = sorted({str(p.relative_to(out)) for pattern in RUN_FILES
                   for p in (*out.glob(pattern), *out.glob(f"trial*/{pattern}")) if p.is_file()})
    if held:
        raise DetectError(
            f"OUTPUT_DIR {out} already holds a run ({', '.join(held[:3])}"
            f"{', ...' if len(held) > 3 else ''}): use --resume to continue it, or another "
            "OUTPUT_DIR (also to evaluate it: --eval-only MODEL.WEIGHTS DIR/model_final.pth)"
        )


# -------------------------------------------------------------------------------------- run
def _worker(args: argparse.Namespace) -> None:
    """Entry of every process started by ``launch``."""
    cfg = setup(args, records=False)  # spawned processes do not inherit the registrations
    run(cfg, args)


def run(cfg, args: argparse.Namespace) -> dict:
    """Train/evaluate once, or ``args.trials`` times; returns the results (rank 0)."""
    from detectron2.utils import comm

    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    # One set of handlers per run (in-process callers run several times): the log file always,
    # the console unless ``args.quiet`` (the demo and the study keep Detectron2 in files).
    record = None
    if comm.is_main_process():  # before logging opens log.txt: the header starts this run's part
        record = provenance.collect(cfg, getattr(args, "argv", None), comm.get_world_size())
        provenance.write(cfg.OUTPUT_DIR, record)
    setup_logging(("detectron2", "fvcore", "transfer", "d2"), Path(cfg.OUTPUT_DIR) / "log.txt",
                  console=not getattr(args, "quiet", False), main=comm.is_main_process())
    if record is not None:
        logger.info(f"provenance: {Path(cfg.OUTPUT_DIR, 'provenance.json')}")
    if not args.eval_only:
        _, lines = rescale_for_world_size(cfg, comm.get_world_size())
        logger.info(lines[0])
        for line in lines[1:]:
            logger.warning(line)
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
        if record is not None:
            provenance.write(tcfg.OUTPUT_DIR, record, log=False)
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
    summary = write_trials(cfg.OUTPUT_DIR, trials, record) if comm.is_main_process() else None
    return {"trials": trials, "summary": summary}


def _run_once(cfg, args: argparse.Namespace) -> dict:
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from transfer.trainer import Trainer

    rank = comm.get_rank()
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if comm.is_main_process():  # the config as the trainer runs it (rescaled for the processes)
        ran = cfg if args.eval_only else rescale_for_world_size(cfg, comm.get_world_size())[0]
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), ran.dump())
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer_class()(model, save_dir=cfg.OUTPUT_DIR).load(cfg.MODEL.WEIGHTS)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        old = trainer.checkpointer  # the same files and state, read safely
        trainer.checkpointer = checkpointer_class()(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        # resuming OUTPUT_DIR's own checkpoint: exactly this model (check_resumed read it before
        # the run; this also guards the processes that ``launch`` starts)
        trainer.checkpointer.exact = args.resume and trainer.checkpointer.has_checkpoint()
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None) or {}
    results = _plain(results or {})
    if comm.is_main_process():
        atomic_write_text(
            os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), json.dumps(results, indent=2)
        )
    return results


