"""Detection config: Detectron2's defaults plus the few keys FeatAug adds.

Keys added by :func:`add_feataug_config` (Detectron2's own keys keep their defaults):

``SOLVER.AMP.PRECISION``
    ``"auto"``, ``"float16"`` or ``"bfloat16"``. Used when ``SOLVER.AMP.ENABLED``: CUDA trains
    with Detectron2's ``AMPTrainer`` (auto: float16), CPU with a bfloat16 autocast trainer
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


class ConfigError(Exception):
    """A detection config file or override that cannot be used."""


def add_feataug_config(cfg: CfgNode) -> CfgNode:
    """Add FeatAug's keys (with defaults) to a Detectron2 config, in place; returns ``cfg``."""
    cfg.SOLVER.AMP.PRECISION = "auto"
    cfg.DATASETS.AUTO_NUM_CLASSES = False
    cfg.DATASETS.CLASS_NAMES_FILE = ""
    return cfg


def get_detection_cfg(config_file: str | Path | None, opts: Sequence[str] | None = None) -> CfgNode:
    """Detectron2 defaults + FeatAug keys, merged with ``config_file`` and ``KEY VALUE`` ``opts``.

    The returned config is not frozen (the caller may still fill ``NUM_CLASSES`` etc.).
    Raises :class:`ConfigError` with the file name for a missing file, an unknown key or a
    malformed override.
    """
    cfg = add_feataug_config(get_cfg())
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            cfg.merge_from_file(str(path))
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"{path}: {_reason(e)}") from None
        except Exception as e:  # yaml syntax errors
            if type(e).__module__.startswith("yaml"):
                raise ConfigError(f"{path}: invalid YAML: {_reason(e)}") from None
            raise
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides must come in KEY VALUE pairs, got {len(opts)} items: {opts}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"command-line override: {_reason(e)}") from None
    _check(cfg)
    return cfg


def _reason(e: BaseException) -> str:
    return " ".join(str(e.args[0] if len(e.args) == 1 else e).split()) or type(e).__name__


def _check(cfg: CfgNode) -> None:
    if cfg.SOLVER.AMP.PRECISION not in ("auto", "float16", "bfloat16"):
        raise ConfigError(
            f"SOLVER.AMP.PRECISION must be auto, float16 or bfloat16, got {cfg.SOLVER.AMP.PRECISION!r}"
        )
