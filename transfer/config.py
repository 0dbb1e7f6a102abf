"""Detection config: Detectron2's defaults plus the few keys FeatAug adds.

Keys added by :func:`add_feataug_config` (Detectron2's own keys keep their defaults):

``SOLVER.AMP.PRECISION``
    ``"auto"``, ``"float16"`` or ``"bfloat16"``. Used when ``SOLVER.AMP.ENABLED``: CUDA trains
    with Detectron2's ``AMPTrainer`` (auto: bfloat16 where the GPU supports it, else float16),
    CPU with a bfloat16 autocast trainer
    (``transfer.trainer.CPUAutocastTrainer``). On a CPU without native bfloat16 (no AVX512-BF16 /
    AMX) ``auto`` trains in float32, because emulated bfloat16 is several times slower;
    ``bfloat16`` forces it.
``DATASETS.AUTO_NUM_CLASSES``
    when True, ``MODEL.ROI_HEADS.NUM_CLASSES`` is set from the training sets' ``thing_classes``
    (they must agree), so a config serves any registered dataset.
``DATASETS.CLASS_NAMES_FILE``
    optional text file, one class name a line: the class list of every ``--register-voc``
    dataset (otherwise classes are collected from the annotations of the registered split;
    keep train and test consistent by giving a file when a class may be missing from one).
``LOGGER.WANDB``, ``LOGGER.WANDB_PROJECT``, ``_ENTITY``, ``_NAME``, ``_GROUP``, ``_MODE``
    Weights & Biases, as for pretraining (the same keys and defaults, ``pretrain.config``):
    the flat config, the latest scalars of Detectron2's event storage (step: the iteration)
    and the evaluation results (``transfer.wandb_writer.WandbWriter``); ``--resume`` goes on in
    the run whose id ``OUTPUT_DIR/wandb_run.json`` keeps. Off by default; on without ``wandb``
    installed, refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detectron2.config import CfgNode, get_cfg

from pretrain.config import get_cfg as get_pretrain_cfg
from pretrain.config import merge_config_file, merge_overrides
from pretrain.errors import ConfigError
from pretrain.utils.tracking import check_wandb


def add_feataug_config(cfg: CfgNode) -> CfgNode:
    """Add FeatAug's keys (with defaults) to a Detectron2 config, in place; returns ``cfg``."""
    cfg.SOLVER.AMP.PRECISION = "auto"
    cfg.DATASETS.AUTO_NUM_CLASSES = False
    cfg.DATASETS.CLASS_NAMES_FILE = ""
    cfg.LOGGER = CfgNode(get_pretrain_cfg().LOGGER)  # one set of W&B keys for both halves
    return cfg


def get_detection_cfg(config_file: str | Path | None, opts: Sequence[str] | None = None) -> CfgNode:
    """Detectron2 defaults + FeatAug keys, merged with ``config_file`` and ``KEY VALUE`` ``opts``.

    The returned config is not frozen (the caller may still fill ``NUM_CLASSES`` etc.).
    Raises :class:`ConfigError` naming the file for a missing file or a bad key in it, and the
    ``KEY VALUE`` pair for a bad override.
    """
    cfg = add_feataug_config(get_cfg())
    if config_file:
        merge_config_file(cfg, config_file)
    overrides = dict(merge_overrides(cfg, opts))  # key -> its last value

    def source(key: str) -> str:
        if key in overrides:
            return f"command-line override {key} {overrides[key]}"
        return str(config_file) if config_file else "default config"

    _check(cfg, source)
    return cfg


def _check(cfg: CfgNode, source) -> None:
    """Values of FeatAug's keys, and the element types of list keys (:func:`_check_sequences`);
    ``source(key)`` names the file or override that set ``key``."""
    if cfg.SOLVER.AMP.PRECISION not in ("auto", "float16", "bfloat16"):
        raise ConfigError(
            f"{source('SOLVER.AMP.PRECISION')}: SOLVER.AMP.PRECISION must be auto, float16 or "
            f"bfloat16, got {cfg.SOLVER.AMP.PRECISION!r}"
        )
    _check_sequences(cfg, source)
    check_wandb(cfg, source("LOGGER.WANDB_MODE"))


# channels of the images each INPUT.FORMAT gives the model
_CHANNELS = {"BGR": 3, "RGB": 3, "YUV-BT.601": 3, "L": 1}


def _element_kind(v) -> str | None:
    if isinstance(v, bool):
        return "true/false values"
    if isinstance(v, int):
        return "integers"
    if isinstance(v, float):
        return "numbers"
    return "strings" if isinstance(v, str) else None


def _fits(v, kind: str) -> bool:
    got = _element_kind(v)
    return got == kind or (kind == "numbers" and got == "integers")


def _check_sequences(cfg: CfgNode, source) -> None:
    """Every key whose default is a flat list of one kind (integers, numbers, strings, booleans:
    ``SOLVER.STEPS``, ``MODEL.PIXEL_MEAN``, ``INPUT.MIN_SIZE_TRAIN``, ...) holds a flat list of
    that kind, which Detectron2 would otherwise find wrong only when the model or the schedule is
    built; ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` have one value per channel of ``INPUT.FORMAT``."""
    def walk(node: CfgNode, default: CfgNode, prefix: str) -> None:
        for key, ref in default.items():
            value, name = node.get(key), prefix + key
            if isinstance(ref, CfgNode):
                walk(value, ref, name + ".")
                continue
            kinds = {_element_kind(x) for x in ref} if isinstance(ref, list | tuple) else ()
            if len(kinds) != 1 or None in kinds:
                continue  # not a sequence, empty, nested or mixed: Detectron2's own rules
            (kind,) = kinds
            if not all(_fits(x, kind) for x in value):
                raise ConfigError(f"{source(name)}: {name} must be a flat list of {kind} (the "
                                  f"default is {list(ref)}), got {list(value)!r:.80}")

    walk(cfg, add_feataug_config(get_cfg()), "")
    channels = _CHANNELS.get(cfg.INPUT.FORMAT)
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        value, name = cfg.MODEL[key], f"MODEL.{key}"
        if channels is not None and len(value) != channels:
            raise ConfigError(f"{source(name)}: {name} has {len(value)} values, but INPUT.FORMAT "
                              f"{cfg.INPUT.FORMAT} images have {channels} channels")
    if not all(0 < s < float("inf") for s in cfg.MODEL.PIXEL_STD):
        raise ConfigError(f"{source('MODEL.PIXEL_STD')}: MODEL.PIXEL_STD must be positive "
                          f"numbers, got {list(cfg.MODEL.PIXEL_STD)}")
