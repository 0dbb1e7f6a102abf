"""What produced a detection output folder: ``provenance.json`` and the head of ``log.txt``.

:func:`collect` is ``pretrain.utils.provenance.collect`` (the command line, working folder, UTC
start time, package versions, git commit and dirty flag, process count, Python version) for
torch, torchvision, detectron2, faster-coco-eval and numpy, with ``MODEL.WEIGHTS`` and the
sha256 of its bytes, and Detectron2's ``collect_env_info()`` table. The final config is
``config.yaml`` beside it. Nothing here fails a run: a value that cannot be found is None.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.utils import provenance as common
from pretrain.utils.provenance import file_sha256, header, package_version, write

__all__ = ["collect", "file_sha256", "header", "package_version", "write"]


def _weights(weights: str) -> dict:
    """``MODEL.WEIGHTS`` as given, the local file it resolves to and the sha256 of its bytes."""
    if not weights:
        return {"path": "", "file": None, "sha256": None}
    local = weights
    if "://" in weights:
        try:
            from detectron2.utils.file_io import PathManager

            local = PathManager.get_local_path(weights)
        except Exception:
            local = None
    if local is None or not Path(local).is_file():
        return {"path": weights, "file": local, "sha256": None}
    return {"path": weights, "file": str(Path(local).resolve()), "sha256": file_sha256(local)}


def _env_info() -> str | None:
    import logging

    probe = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime" on CPU machines
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        from detectron2.utils.collect_env import collect_env_info

        return collect_env_info()
    except Exception:  # a probe of the environment failed: record nothing rather than stop
        return None
    finally:
        probe.setLevel(level)


def collect(cfg, argv: list[str] | None = None, world_size: int = 1) -> dict:
    """The provenance record of a run of ``cfg`` started by ``argv`` (default ``sys.argv``)."""
    record = common.collect(argv, world_size, tuple(common.PACKAGES),
                            weights=_weights(cfg.MODEL.WEIGHTS))
    return {**record, "env": _env_info()}
