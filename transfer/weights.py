"""Detection weights: read without executing anything, and checked to fit the model.

``MODEL.WEIGHTS`` is read through ``pretrain.utils.safe_load`` (a Detectron2 ``.pkl`` with the
numpy allow-list, other files with torch's) and loaded into the model built on the meta device
(no memory) exactly as :class:`transfer.checkpoint.SafeCheckpointer` will load it. Training needs
every ResNet trunk tensor from the file with its shape (``backbone.bottom_up.*`` in FPN models;
in C4 models ``backbone.*`` and ``roi_heads.res5.*`` except the added ``res5.norm``),
``--eval-only`` every model tensor. An empty ``MODEL.WEIGHTS`` (random initialization) needs
``--from-scratch``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.errors import FeatAugError
from pretrain.utils.safe_load import UnsafeFileError, load_pickle, load_torch


class DetectError(FeatAugError):
    """A detection run that cannot start (bad flags, unregistered data, weights that do not
    fit, class mismatch)."""


def read_weights(path: str | Path) -> dict:
    """The checkpoint dict Detectron2's ``DetectionCheckpointer`` reads from ``path``, read
    without running anything from the file.

    ``.pkl``: :func:`load_pickle`, then Detectron2's reading of it (a Detectron2 model-zoo dict
    with ``model`` and ``__author__`` as is; otherwise Caffe2 ``blobs`` without ``*_momentum``,
    marked for name matching). ``.pyth`` (pycls): its ``model_state``, marked for name
    matching. Other files: :func:`load_torch` (no placeholders), the object itself or its
    ``model``.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        data = load_pickle(path)
        if not isinstance(data, dict):
            raise UnsafeFileError(f"{path}: not Detectron2 weights (a {type(data).__name__})")
        if not ("model" in data and "__author__" in data):
            blobs = data.get("blobs", data)
            if not isinstance(blobs, dict):
                raise UnsafeFileError(f"{path}: 'blobs' is a {type(blobs).__name__}, not a dict")
            model = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
            data = {"model": model, "__author__": "Caffe2", "matching_heuristics": True}
    elif path.suffix == ".pyth":  # pycls: the model under "model_state"
        state = load_torch(path)
        if not isinstance(state, dict) or not isinstance(state.get("model_state"), dict):
            raise UnsafeFileError(f"{path}: not pycls weights (no 'model_state' dict)")
        model = {k: v for k, v in state["model_state"].items()
                 if not str(k).endswith("num_batches_tracked")}
        data = {"model": model, "__author__": "pycls", "matching_heuristics": True}
    else:
        data = load_torch(path)
        if not isinstance(data, dict):
            raise UnsafeFileError(f"{path}: not model weights (a {type(data).__name__})")
        if "model" not in data:
            data = {"model": data}
    if not isinstance(data["model"], dict):
        raise UnsafeFileError(f"{path}: 'model' is a {type(data['model']).__name__}, not a dict")
    return data


def check_weights(cfg, *, eval_only: bool, from_scratch: bool, resume: bool = False,
                  trials: int | None = None) -> None:
    """``MODEL.WEIGHTS`` agrees with ``--from-scratch``, reads safely and fits the model (the
    whole model for ``eval_only``); with ``resume``, also the checkpoints the run (or each of its
    ``trials``) will resume from (:func:`check_resumed`). The arguments are ``feataug detect``'s
    flags."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if eval_only:
            raise DetectError("--eval-only evaluates MODEL.WEIGHTS, which is empty")
        if not from_scratch:
            raise DetectError(
                "MODEL.WEIGHTS is empty: the model would train from random initialization; "
                "give weights (e.g. from feataug convert) or pass --from-scratch"
            )
        return
    if from_scratch:
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
    try:
        data = read_weights(local)
    except UnsafeFileError as e:
        raise DetectError(f"MODEL.WEIGHTS {e}") from None
    _check_fit(cfg, weights, data, complete=eval_only)
    _check_settings(cfg, weights, data)
    if resume:
        check_resumed(cfg, trials)


def check_resumed(cfg, trials: int | None) -> None:
    """The checkpoints ``--resume`` will load instead of MODEL.WEIGHTS (``last_checkpoint`` of
    OUTPUT_DIR, or of each trial's folder) are read safely and must be exactly this config's
    model: checked here, before anything is written or a process is started."""
    out = Path(cfg.OUTPUT_DIR)
    folders = [out] if trials is None else [out / f"trial{k}" for k in range(trials)]
    for folder in folders:
        pointer = folder / "last_checkpoint"
        if not pointer.is_file():
            continue
        name = pointer.read_text().strip()
        path = folder / name
        if not name or not path.is_file():
            raise DetectError(f"{pointer}: names {name!r}, which is not in {folder}; "
                              "remove it to start that run afresh")
        try:
            data = read_weights(path)
        except UnsafeFileError as e:
            raise DetectError(str(e)) from None
        _check_fit(cfg, str(path), data, complete=True, exact=True)


def _check_settings(cfg, weights: str, data: dict) -> None:
    """Converted weights carry the config values they need (``transfer.convert``): the config
    must have them (pixel mean/std, input format, stride placement, ...)."""
    need = data.get("feataug", {}).get("config") if isinstance(data.get("feataug"), dict) else None
    if not isinstance(need, dict):
        return  # not converted by FeatAug (e.g. a trained detector): nothing recorded
    wrong = []
    for key, want in need.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        have = list(node) if isinstance(node, (list, tuple)) else node
        same = (len(have) == len(want) and all(abs(a - b) < 1e-3 for a, b in zip(have, want, strict=True))
                if isinstance(want, list) and isinstance(have, list) else have == want)
        if not same:
            wrong.append(f"{key} {want} (config: {have})")
    if wrong:
        raise DetectError(f"{weights}: these weights need {'; '.join(wrong)}: set them in the "
                          "config or as overrides (feataug convert printed them)")


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
    from transfer.resnet_trunk import DEPTHS

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
def quiet_loggers(*names: str):
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


def misfit(result) -> list[str]:
    """What keeps a checkpoint from being exactly the model: each tensor of another shape, not
    in the file, or not in the model (``result``: the incompatible keys of a load,
    :class:`transfer.checkpoint.LoadResult`)."""
    shaped = {k for k, _, _ in result.incorrect_shapes}
    return ([f"{k} (shape {tuple(a)} in the file, {tuple(b)} in the model)"
             for k, a, b in result.incorrect_shapes]
            + [f"{k} (not in the file)" for k in result.missing_keys
               if k not in shaped and not k.endswith("num_batches_tracked")]
            + [f"{k} (not in the model)" for k in result.unexpected_keys])


def misfit_error(weights: str, bad: list[str]) -> DetectError:
    """The refusal of a checkpoint to resume from that is not exactly the model."""
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return DetectError(f"{weights}: does not fit the model ({', '.join(bad[:3])}{more}): --resume "
                       "continues a run of this config, and this checkpoint is of another model")


def _check_fit(cfg, weights: str, data: dict, complete: bool, exact: bool = False) -> None:
    """Load ``data`` into the model as Detectron2 will (on the meta device) and refuse weights
    that leave trunk tensors (``complete``: any model tensor) random or mis-shaped; ``exact``
    (a checkpoint to resume): also tensors the model does not have (``misfit``)."""
    import torch
    from detectron2.modeling import build_model

    import transfer.modeling  # noqa: F401  (registers the C4 heads the configs name)
    from transfer.checkpoint import load_model_state

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
    with quiet_loggers("detectron2", "fvcore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: copying into meta tensors is a no-op
        with torch.device("meta"):
            model = build_model(meta)
        checkpoint = {**data, "model": dict(data["model"])}
        try:
            result = load_model_state(model, checkpoint)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. arrays of Python objects
            reason = " ".join(str(e).split())[:160]
            raise DetectError(f"{weights}: cannot be loaded into the model ({reason})") from None
    if exact:
        bad = misfit(result)
        if bad:
            raise misfit_error(weights, bad)
        return
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


def checkpointer_class() -> type:
    """:class:`transfer.checkpoint.SafeCheckpointer`, imported when asked for (it imports
    Detectron2, which the checks above need only when they run)."""
    from transfer.checkpoint import SafeCheckpointer

    return SafeCheckpointer
