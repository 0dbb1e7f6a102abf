"""What a grid file or a flag may put into the sbatch script of ``feataug study --slurm``: the
``slurm:`` keys and their bounds, the sbatch options the study sets itself, and no control
character anywhere (a newline would end an ``#SBATCH`` line and start a shell command)."""

from __future__ import annotations

import re

from .errors import StudyError, need

__all__ = ["SLURM_KEYS", "STUDY_SBATCH", "check_text", "sbatch_option", "slurm_spec"]

# slurm: the defaults of `feataug study --slurm` (its flags win): key -> (type, least, most);
# time in minutes (at most a year); ``args`` maps any other sbatch option to its value
# (``feataug.study.slurm``).
SLURM_KEYS = {"nodes": (int, 1, 100_000), "gpus_per_node": (int, 0, 256),
              "time": (int, 1, 525_600), "partition": (str, None, None),
              "account": (str, None, None), "args": (dict, None, None)}
# sbatch options the study sets itself: submitit's array, logs and requeue signal, the job name,
# one task per GPU; slurm.args / --slurm-arg may not change them
STUDY_SBATCH = ("array", "output", "error", "open_mode", "signal", "job_name", "ntasks_per_node")


def check_text(value: str, what: str) -> str:
    """``value``; StudyError ``WHAT: contains a control character`` where it has one (in the
    sbatch script a newline would end an ``#SBATCH`` line and start a shell command)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise StudyError(f"{what}: contains a control character")
    return value


def sbatch_option(key, what: str) -> str:
    """``key`` of ``slurm.args`` or ``--slurm-arg`` as submitit spells it (``-`` -> ``_``);
    StudyError ``WHAT: ...`` for a malformed name or an option the study sets, also abbreviated
    (sbatch reads ``--arr`` as ``--array``; ``gpus`` and ``ntasks`` are options of their own)."""
    name = str(key).strip().replace("-", "_")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise StudyError(f"{what}: not an sbatch option name (a letter, then letters, digits, "
                         "- or _)")
    for owner in [k for k in SLURM_KEYS if k != "args"] + list(STUDY_SBATCH):
        if owner.startswith(name.lower()) and name.lower() not in ("gpus", "ntasks"):
            flag = "--" + owner.replace("_", "-")
            raise StudyError(f"{what}: set it as slurm.{owner} or {flag}" if owner in SLURM_KEYS
                             else f"{what}: the study sets {flag} itself")
    return name


def slurm_spec(spec, where: str) -> dict:
    """The checked ``slurm:`` mapping (``SLURM_KEYS``); ``args`` keys are spelt with ``_``, their
    values become strings (``true``: an option without a value). Every string lands in the
    sbatch script: a control character in one is refused."""
    need(spec is None or isinstance(spec, dict), where, f"slurm must be a mapping, got {spec!r}")
    spec = dict(spec or {})
    unknown = set(spec) - set(SLURM_KEYS)
    need(not unknown, where, f"slurm: unknown key(s) {sorted(unknown)}; allowed: "
          f"{sorted(SLURM_KEYS)} (any other sbatch option goes under slurm.args)")
    for key, value in spec.items():
        kind, least, most = SLURM_KEYS[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        ok = ok and (least is None or least <= value <= most) and (
            kind is not str or bool(value.strip()))
        what = {int: f"an integer from {least} to {most}", str: "a non-empty string",
                dict: "a mapping"}[kind]
        need(ok, where, f"slurm.{key} must be {what}, got {value!r}")
        if kind is str:
            check_text(value, f"{where}: slurm.{key}")
    args = {}
    for key, value in spec.get("args", {}).items():
        # the key as it reads, or its repr where that would not be one plain line
        label = f"slurm.args.{key}" if str(key).isprintable() else f"slurm.args[{key!r}]"
        check_text(str(key), f"{where}: {label}")
        name = sbatch_option(key, f"{where}: {label}")
        ok = value is True or (isinstance(value, (str, int, float)) and not isinstance(value, bool)
                               and str(value).strip() != "")
        need(ok, where, f"{label} must be a number, a non-empty string or true (an "
              f"option without a value), got {value!r}")
        args[name] = True if value is True else check_text(str(value), f"{where}: {label}")
    return {**spec, "args": args} if "args" in spec else spec
