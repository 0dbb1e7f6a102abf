"""Everything checked before a detection run starts or writes anything: :func:`setup`.

The datasets are registered and their records read, the config is built and checked (schedule,
classes, evaluators), the weights are read safely and must fit the model
(:mod:`transfer.weights`), and OUTPUT_DIR must be writable and hold no other run.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from pretrain.utils.io import check_output_folder
from transfer.options import DetectOptions
from transfer.schedule import check_schedule
from transfer.weights import DetectError, check_weights

__all__ = ["RUN_FILES", "check_output_dir", "setup"]

# what a detection run leaves in its OUTPUT_DIR (and in each trial's folder)
RUN_FILES = ("last_checkpoint", "model_*.pth", "eval_results.json", "metrics.json",
             "trials.json")


def setup(options: DetectOptions, records: bool = True):
    """Register datasets and build the (frozen) config for ``options``; raise on bad input.
    ``records``: also read every dataset's records (the processes ``launch`` starts skip it)."""
    import torch

    with warnings.catch_warnings():  # fvcore and Detectron2 call torch.jit.script at import
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning,
                                r"torch\.jit\._script")
        from transfer import datasets, trainer  # noqa: F401  (trainer: Detectron2's models)
        from transfer.config import get_detection_cfg

    cfg = get_detection_cfg(options.config_file, options.opts)
    datasets.register_standard_voc()
    classes = cfg.DATASETS.CLASS_NAMES_FILE or None
    for name, root, split in options.register_voc:
        datasets.register_voc(name, root, split, classes, replace=True)
    for name, json_file, image_root in options.register_coco:
        datasets.register_coco(name, json_file, image_root, replace=True)

    check_schedule(cfg, options.world_size)
    _check_datasets(cfg, eval_only=options.eval_only)
    if records:  # bad data is refused before a model is built or a file written
        used = [] if options.eval_only else list(cfg.DATASETS.TRAIN)
        datasets.check_records(used + list(cfg.DATASETS.TEST))
    check_weights(cfg, eval_only=options.eval_only, from_scratch=options.from_scratch,
                  resume=options.resume, trials=options.trials)
    check_output_dir(cfg.OUTPUT_DIR, options.resume)
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


def check_output_dir(output_dir: str, resume: bool) -> None:
    """A folder that can be written, and never one holding an earlier run unless resuming it
    (a fresh run would replace its checkpoints and results)."""
    out = Path(output_dir)
    check_output_folder(out, DetectError)
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
