"""The folder of a linear evaluation (``feataug lincls``, :mod:`pretrain.lincls`): its lock,
``config.yaml`` and ``provenance.json``, and the resume state ``lincls_last.pth``.

``lincls_last.pth`` is a ``torch.save`` dict of plain data (``torch.load(weights_only=True)``
reads it; FeatAug reads it through :func:`pretrain.utils.safe_load.load_torch`):

==============  =====================================================================
``kind``        ``"feataug-lincls"``; ``version``: ``STATE_VERSION``
``epoch``       completed epochs
``identity``    what defines the evaluation (:func:`pretrain.lincls.identity`)
``config``      the full config as a YAML string
``head``        the linear layer's ``state_dict`` (``weight`` [K, C], ``bias`` [K])
``optimizer``   the optimizer's ``state_dict`` (momentum buffers)
``schedule``    its name, the epoch reached and the next epoch's lr
``rng``         every rank's RNG states (python, numpy, torch, CUDA), rank order
``sampler``     seed, epoch, images, process count, per-rank batch, steps per epoch
``history``     per epoch: lr and rank 0's mean loss
==============  =====================================================================
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.checkpoint import rng_state, set_rng_state
from pretrain.errors import CheckpointError, ConfigError, reason
from pretrain.utils.dist import (
    all_gather_object,
    any_across_ranks,
    barrier,
    get_rank,
    get_world_size,
    is_main_process,
)
from pretrain.utils.io import atomic_torch_save, atomic_write_text, read_regular

__all__ = ["RESULT_NAME", "STATE_NAME", "evaluation_folder", "load_state", "locked",
           "save_state", "start_folder"]

STATE_NAME, RESULT_NAME = "lincls_last.pth", "lincls.json"
STATE_KIND, STATE_VERSION = "feataug-lincls", 1
# fields only the provenance.json of an evaluation has (start_folder): they mark its folder
RECORD_FIELDS = ("checkpoint", "splits", "start_epoch")
# the state's fields load_state reads, with their types
STATE_FIELDS = {"epoch": int, "identity": dict, "head": dict, "optimizer": dict, "rng": list,
                "history": list}


def evaluation_folder(out: Path) -> bool:
    """Whether ``out`` is the folder of an evaluation: its ``provenance.json`` is the record
    :func:`start_folder` writes there before anything else (so also after a first epoch that
    was interrupted). Anything else, a run's or a user's, is not ours to replace."""
    try:
        record = json.loads(read_regular(out / "provenance.json"))
    except (OSError, ValueError):  # absent, not a regular file, unreadable, not JSON
        return False
    return isinstance(record, dict) and all(k in record for k in RECORD_FIELDS)


@contextlib.contextmanager
def locked(out: Path | None, device: torch.device, fresh: bool):
    """Rank 0 holds ``out``'s lock for the block and checks, under it, that a ``fresh`` run
    finds no evaluation there (another may have finished since the caller looked); every rank
    raises when rank 0 was refused, so none waits for it in a collective."""
    from pretrain.utils.lock import run_lock

    held, refusal = contextlib.ExitStack(), None
    if out is not None and is_main_process():
        try:
            held.enter_context(run_lock(out, "feataug lincls", key="--output-dir"))
            found = [n for n in (STATE_NAME, RESULT_NAME) if (out / n).exists()] if fresh else []
            if found:
                raise ConfigError(f"--output-dir {out}: holds an evaluation ({found[0]}); "
                                  "--resume continues it, --overwrite replaces it")
        except ConfigError as e:
            held.close()
            refusal = e
    if any_across_ranks(refusal is not None, device):
        raise refusal or ConfigError(f"--output-dir {out}: refused by rank 0")
    with held:
        yield


def start_folder(out: Path, cfg, roots: tuple[str, str], record: dict | None, start: int,
                 sizes: dict) -> None:
    """Rank 0: ``config.yaml`` and ``provenance.json`` (``record``'s fields, the fingerprints of
    the ``roots`` (train, val), the split ``sizes``, the ``start`` epoch); a fresh run drops the
    files of an earlier evaluation there (:func:`locked` checked they may go). Then every rank
    goes on."""
    if is_main_process():
        from pretrain.utils import provenance

        out.mkdir(parents=True, exist_ok=True)
        if not start:
            for name in (STATE_NAME, RESULT_NAME):
                (out / name).unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", cfg.dump())
        data = {"train": provenance.data_fingerprint(roots[0]),
                "val": provenance.data_fingerprint(roots[1])}
        provenance.write(out, provenance.collect(
            world_size=get_world_size(), packages=provenance.PRETRAIN_PACKAGES,
            **(record or {}), data=data, splits=sizes, start_epoch=start), log=False)
    barrier()


def save_state(path: Path, *, epoch: int, identity: dict, config: str, head: nn.Module,
               optimizer: torch.optim.Optimizer, schedule: dict, sampler: dict,
               history: list) -> None:
    """Every rank's RNG states to rank 0, which writes the state ``path`` atomically.
    Collective: every rank calls it."""
    rngs = all_gather_object(rng_state())
    if not is_main_process():
        return
    state = {
        "kind": STATE_KIND, "version": STATE_VERSION, "epoch": epoch, "identity": identity,
        "config": config, "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "optimizer": optimizer.state_dict(), "schedule": schedule, "rng": rngs,
        "sampler": sampler, "history": list(history),
    }  # fmt: skip
    atomic_torch_save(state, path)


def load_state(path: Path, ident: dict, head: nn.Linear, optimizer) -> tuple[int, list]:
    """Load ``path`` into ``head`` and ``optimizer`` and this rank's RNG states; returns
    (epochs done, history). Refused, with one line naming the field, where a field is missing,
    of another type or out of range, does not fit, or where its ``identity`` differs from
    ``ident`` (:func:`pretrain.lincls.identity`)."""
    from pretrain.utils.safe_load import UnsafeFileError, load_torch

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; --resume continues an evaluation from the "
                              f"{STATE_NAME} it wrote")
    try:
        st = load_torch(path)  # plain data only: nothing in it runs
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(st, dict) or st.get("kind") != STATE_KIND:
        raise CheckpointError(f"{path}: not a {STATE_NAME} written by feataug lincls")
    if st.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: field 'version' is {st.get('version')!r}; this FeatAug "
                              f"reads version {STATE_VERSION}")
    for field, kind in STATE_FIELDS.items():
        if field not in st:
            raise CheckpointError(f"{path}: field '{field}' is missing")
        if not isinstance(st[field], kind) or isinstance(st[field], bool):
            raise CheckpointError(f"{path}: field '{field}' is a {type(st[field]).__name__}, "
                                  f"not {kind.__name__}")
    saved = st["identity"]
    diff = [f"{k} {saved.get(k)!r:.80} -> {v!r}" for k, v in ident.items()
            if not _same(saved.get(k), v)]
    if diff:
        more = f" and {len(diff) - 2} more" if len(diff) > 2 else ""
        raise ConfigError(f"{path} was written with other settings ({'; '.join(diff[:2])}{more}): "
                          "resume with the same ones, or start afresh with --overwrite")
    epoch, epochs, history = st["epoch"], ident["LINCLS.EPOCHS"], st["history"]
    if not 1 <= epoch <= epochs:  # saved after each epoch: 1 .. EPOCHS
        raise CheckpointError(f"{path}: field 'epoch' {epoch} is not in 1..{epochs}")
    if len(history) != epoch or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"{path}: field 'history' must hold one record per epoch done "
                              f"({epoch}), not {len(history)}")
    _check_head(path, st["head"], head)
    for field, load in (("head", head.load_state_dict), ("optimizer", optimizer.load_state_dict),
                        ("rng", lambda rngs: _set_rng(path, rngs))):
        try:
            load(st[field])
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: field '{field}' does not fit this evaluation "
                                  f"({reason(e, with_type=True)})") from None
    return epoch, list(history)


def _same(saved, value) -> bool:
    """``saved == value`` for an identity entry; False where the comparison itself fails (a
    crafted file's tensor compared with a number)."""
    try:
        return bool(saved == value)
    except (RuntimeError, TypeError, ValueError):
        return False


def _check_head(path: Path, saved: dict, head: nn.Linear) -> None:
    """One line naming every key of the saved layer that is missing, extra or of another shape
    (``load_state_dict``'s own message names none of them on its first line)."""
    want = {k: list(v.shape) for k, v in head.state_dict().items()}
    got = {k: list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
           for k, v in saved.items()}
    diff = [f"{k} {got.get(k, 'missing')} (this evaluation's: {want.get(k, 'none')})"
            for k in sorted(want.keys() | got.keys(), key=str) if got.get(k) != want.get(k)]
    if diff:
        raise CheckpointError(f"{path}: field 'head' does not fit this evaluation's "
                              f"layer: {'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}")


def _set_rng(path: Path, rngs: list) -> None:
    """This rank's RNG states from every rank's (``rng``); another process count keeps the
    current states, with a warning."""
    world = get_world_size()
    if len(rngs) == world:
        set_rng_state(rngs[get_rank()])
    elif is_main_process():
        print(f"warning: {path} was written by {len(rngs)} process(es), this run has "
              f"{world}: the float sums, hence the last bits, will differ from an uninterrupted "
              "run", file=sys.stderr)
