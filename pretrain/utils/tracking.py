"""Weights & Biases runs (the ``LOGGER.*`` keys), for pretraining, detection and study jobs.

W&B is optional (``pip install 'feataug[wandb]'``) and off unless ``LOGGER.WANDB``;
``metrics.jsonl`` and TensorBoard are written either way. :func:`check_wandb` refuses the key,
in one line, before anything is written when ``wandb`` is not installed.

A run's W&B id is kept in its output folder (``wandb_run.json``): a resumed run, or a later
stage of the same job (a study's evaluation after pretraining), goes on in the same W&B run
(``wandb.init(id=..., resume="allow")``). W&B's own files go to ``$WANDB_DIR`` when it is set,
else to the output folder (``OUTPUT_DIR/wandb``). ``LOGGER.WANDB_MODE`` empty leaves the mode to
wandb (``$WANDB_MODE``, else online); ``offline`` writes the run to disk only (``wandb sync``
uploads it later). The callers open runs on rank 0 only.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ..config import flat_config
from ..errors import ConfigError, reason
from .io import atomic_write_text

__all__ = ["RUN_FILE", "WANDB_MISSING", "check_wandb", "open_run", "stored_run_id"]

WANDB_MISSING = "LOGGER.WANDB is True but wandb is not installed: pip install 'feataug[wandb]'"
WANDB_MODES = ("", "online", "offline", "disabled")
RUN_FILE = "wandb_run.json"  # {"wandb_run_id": ...} in the run's output folder
# What wandb.init refuses in a name, checked before a run writes anything: a project name
# (wandb's settings validator) has at most 128 characters and none of these; no name holds a
# control character.
NAME_RULES = {"WANDB_PROJECT": ("/\\#?%:", 128), "WANDB_ENTITY": ("", None),
              "WANDB_NAME": ("", None), "WANDB_GROUP": ("", None)}


def check_wandb(cfg, where: str = "") -> None:
    """Raise :class:`ConfigError` for a ``LOGGER.WANDB_MODE`` that is not one of
    ``WANDB_MODES``, a name W&B would refuse (:data:`NAME_RULES`), and
    (:data:`WANDB_MISSING`) when ``LOGGER.WANDB`` is on and ``wandb`` cannot be imported.
    ``where`` (e.g. the config file) prefixes the key's message. Whether an online run has a
    login is wandb's to say, at the run's start (:func:`open_run`)."""
    at = f"{where}{': ' if where else ''}"
    mode = cfg.LOGGER.WANDB_MODE
    if mode not in WANDB_MODES:
        raise ConfigError(f"{at}LOGGER.WANDB_MODE must be empty, online, offline or disabled, "
                          f"got {mode!r}")
    for key, (banned, longest) in NAME_RULES.items():
        value = cfg.LOGGER[key]
        bad = sorted({c for c in value if c in banned or not c.isprintable()})
        too_long = longest is not None and len(value) > longest
        if too_long or bad:
            why = (f"longer than {longest} characters ({len(value)})" if too_long
                   else f"contains {', '.join(map(repr, bad))}")
            raise ConfigError(f"{at}LOGGER.{key} {value[:40]!r}{'...' * (len(value) > 40)}: "
                              f"{why}; W&B would refuse it")
    if not cfg.LOGGER.WANDB:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(WANDB_MISSING) from None


def stored_run_id(out: str | os.PathLike) -> str | None:
    """The W&B run id kept in output folder ``out`` (None: none yet, or unreadable)."""
    try:
        run_id = json.loads((Path(out) / RUN_FILE).read_text())["wandb_run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def open_run(cfg, out: str | os.PathLike, resume: bool, job_type: str):
    """Start the W&B run of output folder ``out`` for config ``cfg`` (its ``LOGGER`` keys say
    where; the whole config, flat, is the run's config) and return it (a ``wandb`` Run).

    With ``resume`` and an id kept in ``out``, the run goes on under that id; otherwise a new id
    is kept there first. The name is ``LOGGER.WANDB_NAME``, else ``out``'s folder name; the
    project ``LOGGER.WANDB_PROJECT``, else ``$WANDB_PROJECT``, else ``feataug``. A failing
    ``wandb.init`` (online without a login, say) is one :class:`ConfigError`.
    """
    import wandb

    out, log = Path(out), cfg.LOGGER
    run_id = stored_run_id(out) if resume else None
    if run_id is None:
        run_id = secrets.token_hex(6)  # W&B ids: letters, digits, - and _
        atomic_write_text(out / RUN_FILE, json.dumps({"wandb_run_id": run_id}) + "\n")
    # the environment is read here, at every run: wandb reads it once per process
    env = os.environ.get
    kwargs = dict(project=log.WANDB_PROJECT or env("WANDB_PROJECT") or "feataug",
                  entity=log.WANDB_ENTITY or env("WANDB_ENTITY") or None,
                  name=log.WANDB_NAME or out.resolve().name, group=log.WANDB_GROUP or None,
                  job_type=job_type, id=run_id, resume="allow", dir=env("WANDB_DIR") or str(out))
    mode = log.WANDB_MODE or env("WANDB_MODE")
    if mode:
        kwargs["mode"] = mode
    try:
        run = wandb.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - wandb's errors have no common base class
        hint = "" if mode in ("offline", "disabled") else \
            "; log in (wandb login) or set LOGGER.WANDB_MODE offline"
        raise ConfigError(f"LOGGER.WANDB: wandb.init failed ({reason(e, with_type=True)}){hint}") \
            from e
    # a resumed run may change resume-free keys (DATALOADER.NUM_WORKERS, ...): allowed here
    run.config.update(flat_config(cfg), allow_val_change=True)
    return run
