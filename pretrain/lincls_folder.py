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
import sys
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.checkpoint import rng_state, set_rng_state
from pretrain.errors import CheckpointError, ConfigError
from pretrain.utils.dist import (
    all_gather_object,
    any_across_ranks,
    barrier,
    get_rank,
    get_world_size,
    is_main_process,
)
from pretrain.utils.io import atomic_torch_save, atomic_write_text

__all__ = ["RESULT_NAME", "STATE_NAME", "load_state", "locked", "save_state", "start_folder"]

STATE_NAME, RESULT_NAME = "lincls_last.pth", "lincls.json"
STATE_KIND, STATE_VERSION = "feataug-lincls", 1


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
    (epochs done, history). Refused, with one line, where its ``identity`` differs from
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
    saved = st.get("identity") or {}
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in ident.items() if saved.get(k) != v]
    if diff:
        more = f" and {len(diff) - 2} more" if len(diff) > 2 else ""
        raise ConfigError(f"{path} was written with other settings ({'; '.join(diff[:2])}{more}): "
                          "resume with the same ones, or start afresh with --overwrite")
    try:
        head.load_state_dict(st["head"])
        optimizer.load_state_dict(st["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit this evaluation "
                              f"({str(e).strip().splitlines()[0]})") from None
    rngs, world = st.get("rng") or [], get_world_size()
    if len(rngs) == world:
        set_rng_state(rngs[get_rank()])
    elif is_main_process():
        print(f"warning: {path} was written by {len(rngs)} process(es), this run has {world}: "
              "the float sums, hence the last bits, will differ from an uninterrupted run",
              file=sys.stderr)
    return int(st["epoch"]), list(st.get("history") or [])
