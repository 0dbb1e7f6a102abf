"""``feataug detect``: fine-tune and evaluate Faster/Mask R-CNN with Detectron2.

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

Everything is checked before anything runs or is written (``transfer/preflight.py``); weights are
read without executing anything from them and must fit the model, and an empty ``MODEL.WEIGHTS``
(random initialization) needs ``--from-scratch`` (``transfer/weights.py``). The flags become a
:class:`~transfer.options.DetectOptions`; :func:`run_detection` is the same run for library
callers. The run itself: ``transfer/runner.py``; trial summaries: ``transfer/trials.py``.

``LOGGER.WANDB True`` (``pip install 'feataug[wandb]'``) also logs every run to Weights & Biases
(``transfer/wandb_writer.py``): the config, the scalars Detectron2 logs, the evaluation results;
``--resume`` goes on in the same W&B run.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from pretrain.errors import FeatAugError, TrainingError
from pretrain.utils.lock import run_lock
from transfer.options import DetectOptions
from transfer.preflight import check_output_dir, setup
from transfer.runner import run, worker
from transfer.trials import flatten_metrics, format_trials_markdown, summarize_trials
from transfer.weights import DetectError, checkpointer_class

__all__ = [
    "DetectError",
    "DetectOptions",
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
    options = DetectOptions.from_args(args)
    options.check()
    cfg = setup(options)  # validates config and datasets before any process starts
    with run_lock(cfg.OUTPUT_DIR, "feataug detect"):  # held here for every process and trial
        check_output_dir(cfg.OUTPUT_DIR, options.resume)  # no run has filled it meanwhile
        if options.world_size == 1:
            try:
                run(cfg, options)
            except (TrainingError, DetectError):  # DetectError: a checkpoint refused before use
                raise
            except FeatAugError as e:  # data that fails once the run reads it: the run stops
                raise TrainingError(str(e)) from None
        else:
            from detectron2.engine import launch

            launch(
                worker,
                options.num_gpus,
                num_machines=options.num_machines,
                machine_rank=options.machine_rank,
                dist_url=options.dist_url,
                args=(options,),
            )
    print(f"feataug detect: outputs in {cfg.OUTPUT_DIR}")
    return 0


def run_detection(
    options: DetectOptions | str | os.PathLike, opts: Sequence[str] = (), **fields
) -> dict:
    """``feataug detect`` in this process (one process, no ``launch``) for ``options``.

    ``options`` is a :class:`DetectOptions`; a config file with ``opts`` and other
    :class:`DetectOptions` fields as keywords is short for ``DetectOptions(config_file, opts,
    **fields)``. Returns the evaluation results (nested dict as in ``eval_results.json``), or
    ``{"trials": [...], "summary": {...}}`` with ``trials``. Raises ``ConfigError``,
    ``DatasetError`` or :class:`DetectError` on bad input.
    """
    if not isinstance(options, DetectOptions):
        options = DetectOptions(options, tuple(opts), **fields)
    elif opts or fields:
        raise TypeError("run_detection: give a DetectOptions, or a config file with its options")
    if options.world_size != 1:
        raise DetectError(
            f"run_detection runs in this process; {options.world_size} processes "
            "(--num-gpus/--num-machines) need feataug detect"
        )
    options.check()
    cfg = setup(options)
    with run_lock(cfg.OUTPUT_DIR, "feataug detect"):
        check_output_dir(cfg.OUTPUT_DIR, options.resume)
        return run(cfg, options)
