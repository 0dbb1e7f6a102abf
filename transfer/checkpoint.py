"""Detection checkpoints loaded without running anything from the file (:class:`SafeCheckpointer`).

Detectron2's ``DetectionCheckpointer`` reads a file with ``pickle.load`` / ``torch.load`` in its
private file reader, which nothing public replaces. :class:`SafeCheckpointer` therefore overrides
the public ``load``: the file is read by :func:`transfer.weights.read_weights` (``.pkl``: the
restricted unpickler; pycls ``.pyth`` and other files: ``load_torch``, no placeholders), and its
tensors go into the model by :func:`load_model_state`, which loads them as
``DetectionCheckpointer`` does. Checked against Detectron2 0.7.2 with fvcore 0.1.5
(``tests/test_transfer_checkpoint.py`` compares the two on the same files).
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlparse, urlunparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from fvcore.common.checkpoint import (
    get_missing_parameters_message,
    get_unexpected_parameters_message,
)
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, ObserverBase

from pretrain.utils.safe_load import UnsafeFileError
from transfer.weights import DetectError, misfit, misfit_error, read_weights

__all__ = ["LoadResult", "SafeCheckpointer", "load_model_state"]


class LoadResult(NamedTuple):
    """What a load left out: model tensors not in the file, file tensors not in the model, and
    ``(key, shape in the file, shape in the model)`` of tensors skipped for their shape (the
    fields of fvcore's incompatible keys)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    incorrect_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]


def _to_tensors(state: dict) -> None:
    """numpy arrays of ``state`` as tensors, in place; any other non-tensor value is refused."""
    for key in list(state):
        value = state[key]
        if isinstance(value, np.ndarray):
            state[key] = torch.from_numpy(value)
        elif not isinstance(value, torch.Tensor):
            raise ValueError(f"Unsupported type found in checkpoint! {key}: {type(value)}")


def _strip_prefix(state: dict, prefix: str) -> None:
    """Drop ``prefix`` (a ``DistributedDataParallel`` model's ``module.``) from every key, in
    place, when every key has it; keys are re-inserted in sorted order."""
    keys = sorted(state)
    if not all(not key or key.startswith(prefix) for key in keys):
        return
    for key in keys:
        state[key[len(prefix) :]] = state.pop(key)
    # torch's per-module version record of a saved state_dict, keyed by the same prefixes
    metadata = getattr(state, "_metadata", None)
    for key in list(metadata or ()):
        if key:
            metadata[key[len(prefix) :]] = metadata.pop(key)


def _shape_may_differ(model: nn.Module, key: str, value: Any) -> bool:
    """Tensors whose shape is not the model's to check: lazy parameters not yet materialized,
    and quantization observers' buffers (they resize themselves when loaded)."""
    if isinstance(value, nn.parameter.UninitializedParameter):
        return True
    owner = model.get_submodule(key.rpartition(".")[0])
    return isinstance(owner, ObserverBase | FakeQuantizeBase)


def load_model_state(model: nn.Module, checkpoint: dict) -> LoadResult:
    """Load ``checkpoint["model"]`` (popped from ``checkpoint``) into ``model`` as
    ``DetectionCheckpointer`` does.

    numpy arrays become tensors (any other value is a ``ValueError``); with
    ``matching_heuristics`` the names are matched to the model's by Detectron2's
    ``align_and_update_state_dicts`` (Caffe2 names converted first when ``__author__`` is
    ``Caffe2``); a ``module.`` prefix on every key is dropped; a tensor whose shape differs from
    the model's is skipped and reported; the rest loads with ``strict=False``. The model's own
    ``pixel_mean`` / ``pixel_std`` buffers are not reported missing (the config sets them), nor
    old checkpoints' ``anchor_generator.cell_anchors`` unexpected.
    """
    state = checkpoint.pop("model")
    _to_tensors(state)
    if checkpoint.get("matching_heuristics", False):
        caffe2 = checkpoint.get("__author__") == "Caffe2"
        state = align_and_update_state_dicts(model.state_dict(), state, c2_conversion=caffe2)
    _strip_prefix(state, "module.")
    model_state = model.state_dict()
    incorrect = []
    for key in list(state):
        if key not in model_state or _shape_may_differ(model, key, model_state[key]):
            continue
        have, want = tuple(state[key].shape), tuple(model_state[key].shape)
        if have != want:
            incorrect.append((key, have, want))
            del state[key]
    loaded = model.load_state_dict(state, strict=False)
    own_buffers = dict(model.named_buffers(recurse=False))
    missing = [k for k in loaded.missing_keys
               if not (k in ("pixel_mean", "pixel_std") and k in own_buffers)]
    unexpected = [k for k in loaded.unexpected_keys if "anchor_generator.cell_anchors" not in k]
    return LoadResult(missing, unexpected, incorrect)


def _unshared(model: nn.Module, keys: list[str]) -> list[str]:
    """Missing ``keys`` less those whose tensor was loaded under another of its names (a module
    the model holds twice)."""
    names = defaultdict(set)  # tensor -> every name it has in the model
    for name, tensor in itertools.chain(model.named_parameters(remove_duplicate=False),
                                        model.named_buffers(remove_duplicate=False)):
        names[id(tensor)].add(name)
    left = set(keys)
    for group in names.values():
        if group & left and not group <= left:
            left -= group
    return list(left)


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``load`` runs nothing from a weights file.

    Every file is read by :func:`transfer.weights.read_weights` and loaded by
    :func:`load_model_state`; refusals raise :class:`~transfer.weights.DetectError` naming the
    file. Detectron2's ``?matching_heuristics=True`` URL query is kept (for torch files, as
    Detectron2 reads it). With ``exact`` (resuming OUTPUT_DIR's own checkpoint, which
    ``transfer.weights.check_resumed`` checked before the run), a tensor the file lacks, one of
    another shape or one the model lacks is an error instead of Detectron2's warning;
    :meth:`resume_or_load` sets it for the run's own last checkpoint. Saving is Detectron2's.
    """

    exact = False

    def __init__(self, model: nn.Module, save_dir: str = "", *, exact: bool = False,
                 save_to_disk: bool | None = None, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.exact = exact

    def load(self, path: str, checkpointables: list[str] | None = None, *,
             exact: bool | None = None) -> dict[str, Any]:
        """Load the model and ``checkpointables`` (default: all) from ``path`` (a file or a
        URL Detectron2's ``PathManager`` resolves); returns the checkpoint's other entries.
        ``exact``: this load only (default: the checkpointer's :attr:`exact`)."""
        if not path:
            self.logger.info("No checkpoint found. Initializing model from scratch")
            return {}
        self.logger.info(f"[SafeCheckpointer] Loading from {path} ...")
        url = urlparse(path)
        local = self.path_manager.get_local_path(urlunparse((*url[:4], "", url.fragment)))
        if not os.path.isfile(local):
            raise DetectError(f"{path}: checkpoint not found")
        try:
            checkpoint = read_weights(local)
        except UnsafeFileError as e:
            raise DetectError(str(e)) from None
        if not local.endswith((".pkl", ".pyth")):
            _apply_query(checkpoint, url)
        result = load_model_state(self.model, checkpoint)
        bad = misfit(result) if (self.exact if exact is None else exact) else []
        if bad:
            raise misfit_error(url.geturl(), bad)
        self.log_incompatible(result)
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key in checkpoint:
                self.logger.info(f"Loading {key} from {path} ...")
                self.checkpointables[key].load_state_dict(_copied(checkpoint.pop(key)))
        return checkpoint

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """The last checkpoint of ``save_dir`` with every checkpointable when resuming and there
        is one (it must be exactly the model), else only the model from ``path``."""
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file(), exact=True)
        return self.load(path, checkpointables=[])

    def log_incompatible(self, result: LoadResult) -> None:
        """Warn about what the load left out, in fvcore's words."""
        for key, have, want in result.incorrect_shapes:
            self.logger.warning(
                f"Skip loading parameter '{key}' to the model due to incompatible shapes: {have} "
                f"in the checkpoint but {want} in the model! You might want to double check if "
                "this is expected."
            )
        missing = _unshared(self.model, result.missing_keys)
        if missing:
            self.logger.warning(get_missing_parameters_message(missing))
        if result.unexpected_keys:
            self.logger.warning(get_unexpected_parameters_message(result.unexpected_keys))


def _copied(node: Any) -> Any:
    """``node`` with every tensor copied. A zip checkpoint is read memory-mapped, and an
    optimizer keeps the state tensors it is given: they would go on reading the file, which a
    later save under the same name (``model_final`` of a resumed run) truncates."""
    if isinstance(node, torch.Tensor):
        return node.clone()
    if isinstance(node, dict):
        return {k: _copied(v) for k, v in node.items()}
    if type(node) in (list, tuple):
        return type(node)(_copied(v) for v in node)
    return node


def _apply_query(checkpoint: dict, url) -> None:
    """Detectron2's URL query of a torch file: ``matching_heuristics=True`` turns the name
    matching on; any other query is refused."""
    queries = parse_qs(url.query)
    if queries.pop("matching_heuristics", "False") == ["True"]:
        checkpoint["matching_heuristics"] = True
    if queries:
        raise DetectError(f"{url.geturl()}: unsupported URL query {queries}")
