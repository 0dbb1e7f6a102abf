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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detectron2.config import CfgNode, get_cfg

from pretrain.config import merge_config_file, merge_overrides
from pretrain.errors import ConfigError


def add_feataug_config(cfg: CfgNode) -> CfgNode:
    """Add FeatAug's keys (with defaults) to a Detectron2 config, in place; returns ``cfg``."""
    cfg.SOLVER.AMP.PRECISION = "auto"
    cfg.DATASETS.AUTO_NUM_CLASSES = False
    cfg.DATASETS.CLASS_NAMES_FILE = ""
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
    """Values of FeatAug's keys; ``source(key)`` names the file or override that set ``key``."""
    if cfg.SOLVER.AMP.PRECISION not in ("auto", "float16", "bfloat16"):
        raise ConfigError(
            f"{source('SOLVER.AMP.PRECISION')}: SOLVER.AMP.PRECISION must be auto, float16 or "
            f"bfloat16, got {cfg.SOLVER.AMP.PRECISION!r}"
        )
