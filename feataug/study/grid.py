"""Study grid files: parse, validate and expand a grid into runs with matching baselines.

The grid format is described in ``feataug/study/__init__.py``."""

from __future__ import annotations

import functools
import itertools
import json
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.errors import ConfigError, reason

from .errors import StudyError, need
from .sbatch import slurm_spec

RANDOM_INIT = "random-init"
EVAL_DEFAULTS = dict(train="", val="", format="folder", max_train=0, max_val=0,
                     train_per_class=0, val_per_class=0, knn_k=200,
                     knn_t=0.1, linear=True, linear_weight_decay=1e-3, batch_size=256,
                     num_workers=0, image_size=0, detection=None)
# eval.detection: fine-tune the converted trunk (random init for the reference row) and report
# COCO AP / AP50 on the test split; ``train`` / ``test`` are [COCO json, image folder].
DETECTION_KEYS = {"config", "train", "test", "overrides", "trials"}
GRID_KEYS = {"base", "seeds", "jobs", "prepare", "random_init", "overrides", "eval", "blocks",
             "description", "slurm"}
# the most seeds, worker processes or detection trials a grid or a flag may ask for (each
# sizes a list or a process pool)
MAX_COUNT = 1000
BLOCK_KEYS = {"name", "base", "overrides", "variants", "axes", "skip_invalid", "control"}


@dataclass(frozen=True)
class Run:
    """One pretraining configuration of the study (repeated over seeds)."""

    name: str
    config_file: str
    overrides: tuple[tuple[str, Any], ...]  # KEY, value pairs applied to config_file
    random_init: bool = False  # evaluate the untrained trunk instead of pretraining
    baseline: str | None = None  # name of the matching FA-off run
    control: str | None = None  # name of the matching loss-scale control run (FA runs only)
    settings: tuple[tuple[str, str], ...] = ()  # study axis -> value shown in tables and plots

    def opts(self) -> list:
        return [x for kv in self.overrides for x in kv]

    @property
    def fa_off(self) -> bool:
        return self.baseline is None and not self.random_init


@dataclass
class Grid:
    path: str
    text: str
    runs: list[Run]
    axes: list[str]  # config keys that vary between runs
    eval: dict
    seeds: int = 3
    prepare: list[str] = field(default_factory=list)
    jobs: int = 1
    slurm: dict = field(default_factory=dict)  # the checked `slurm:` mapping

    def run(self, name: str) -> Run:
        return next(r for r in self.runs if r.name == name)


def _subst(value, data_root: str):
    """``{data}`` -> the dataset root, in strings and inside lists."""
    if isinstance(value, str):
        return value.replace("{data}", data_root)
    if isinstance(value, list):
        return [_subst(v, data_root) for v in value]
    return value


def _count(value, where: str, what: str) -> int:
    """``value`` of the grid's ``what``, checked: an integer from 1 to ``MAX_COUNT``."""
    need(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COUNT,
          where, f"{what} must be an integer from 1 to {MAX_COUNT}, got {value!r}")
    return value


def _mapping(obj, where: str, what: str) -> dict:
    need(obj is None or isinstance(obj, dict), where, f"{what} must be a mapping, got {obj!r}")
    return dict(obj or {})


def _fmt(value) -> str:
    """A config value as shown in names, tables and plots."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", name).strip("-") or "run"


@functools.lru_cache(maxsize=16)
def _base_cfg(config_file: str):
    from pretrain.config import load_cfg

    return load_cfg(config_file)


@functools.lru_cache(maxsize=16)
def _base_cfg_pickle(config_file: str) -> bytes:
    return pickle.dumps(_base_cfg(config_file))


def _resolve(config_file: str, overrides: dict, where: str):
    """Frozen config of ``config_file`` + overrides (what ``load_cfg`` gives; the file is read
    once); raises StudyError for an unknown key or a value of the wrong type."""
    try:
        cfg = pickle.loads(_base_cfg_pickle(config_file))  # a deep copy, 3x faster than clone()
        cfg.defrost()
        cfg.merge_from_list([x for kv in overrides.items() for x in kv])
        cfg.freeze()
        return cfg
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise StudyError(f"{where}: {reason(e)}") from None


def _check_model(cfg) -> None:
    """ConfigError for a combination the pretraining code refuses (checked before any run;
    the solver as a study job runs it, in one process)."""
    from pretrain.build import check_cfg
    from pretrain.solver import check_solver
    from pretrain.transforms import build_pretrain_transform

    check_cfg(cfg)
    check_solver(cfg, world_size=1)
    try:
        build_pretrain_transform(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _digest_cfg(cfg, drop_fa: bool = False) -> str:
    """Canonical text of what a config sets away from FeatAug's defaults, without OUTPUT_DIR and
    SEED (optionally without FA): ``{"KEY.SUB": value}`` of every key whose value differs from
    ``pretrain.config.get_cfg()``'s.

    Keys at their default are left out, so a key added to the defaults later (at a value that
    keeps the old behaviour) leaves every digest, and every finished job folder, valid. A job's
    digest is taken of the config as the grid resolves it, before the study's own defaults
    (``jobs.STUDY_DEFAULTS``) are added: those may change without touching the digests of the
    job folders a study has already finished."""
    from pretrain.config import flat_config, get_cfg

    defaults, given = (
        {k: json.loads(json.dumps(v, default=str)) for k, v in flat_config(c).items()}
        for c in (get_cfg(), cfg))  # values in their JSON form
    c = {k: v for k, v in given.items()
         if k not in ("OUTPUT_DIR", "SEED") and not (drop_fa and k.startswith("FA."))
         and (k not in defaults or v != defaults[k])}
    return json.dumps(c, sort_keys=True)


def _expand_block(block: dict, index: int, grid_dir: Path, top: dict, data_root: str, where: str):
    """(name, config_file, overrides, resolved cfg) of every valid run of one block."""
    block = _mapping(block, where, f"blocks[{index}]")
    unknown = set(block) - BLOCK_KEYS
    need(not unknown, where, f"blocks[{index}]: unknown key(s) {sorted(unknown)}; "
          f"allowed: {sorted(BLOCK_KEYS)}")
    bname = str(block.get("name", ""))
    bwhere = f"{where}: block {bname or index}"
    base = block.get("base", top.get("base"))
    need(isinstance(base, str) and base, bwhere, "no base config (`base:` in the grid or block)")
    config_file = (grid_dir / base) if not Path(base).is_absolute() else Path(base)
    need(config_file.is_file(), bwhere, f"base config {config_file} not found")
    try:  # a fault of the file itself is no combination's: skip_invalid does not apply
        _base_cfg(str(config_file))
    except ConfigError as e:
        raise StudyError(f"{bwhere}: {e}") from None
    common = {**_mapping(top.get("overrides"), where, "overrides"),
              **_mapping(block.get("overrides"), bwhere, "overrides")}
    variants = _mapping(block.get("variants"), bwhere, "variants") or {"": {}}
    for vname in variants:
        need(isinstance(vname, str), bwhere, f"variant name {vname!r} is not a string (YAML "
              "reads off/no/yes/on as booleans: quote it)")
    axes = _mapping(block.get("axes"), bwhere, "axes")
    for key, values in axes.items():
        need(isinstance(values, list) and values, bwhere, f"axis {key} needs a non-empty list")
    skip_invalid = bool(block.get("skip_invalid", False))
    control = block.get("control")
    need(control is None or control in variants, bwhere,
          f"control {control!r} is not one of the block's variants ({', '.join(variants)})")

    out, refused, used = [], {}, set()
    for combo in itertools.product(*axes.values()):
        chosen = dict(zip(axes, combo, strict=True))
        for vname, vover in variants.items():
            vover = _mapping(vover, bwhere, f"variant {vname}")
            over = {k: _subst(v, data_root) for k, v in {**common, **chosen, **vover}.items()}
            rwhere = (bwhere + (f" variant {vname}" if vname else "")
                      + (f" {chosen}" if chosen else ""))
            try:
                cfg = _resolve(str(config_file), over, rwhere)
                _check_model(cfg)
            except ConfigError as e:
                if not skip_invalid:
                    raise StudyError(f"{rwhere}: {e} (set skip_invalid: true to drop such "
                                     "combinations)") from None
                for kv in chosen.items():
                    refused.setdefault(kv, str(e))
                continue
            if not cfg.FA.ENABLED:  # FA keys mean nothing: drop them so equal runs collapse
                over = {k: v for k, v in over.items() if not k.startswith("FA.")}
                over["FA.ENABLED"] = False
                cfg = _resolve(str(config_file), over, rwhere)
            parts = [bname, vname] + [
                f"{k.split('.')[-1].lower()}={_fmt(v)}" for k, v in chosen.items()
                if k in over and over[k] == _subst(v, data_root) and k not in vover
            ]
            used.update((k, _fmt(v)) for k, v in chosen.items())
            name = _safe(".".join(p for p in parts if p))
            out.append((name, str(config_file), over, cfg, vname == control))
    for (key, value), why in refused.items():
        need((key, _fmt(value)) in used, bwhere, f"{key} value {value!r} is never valid: {why}")
    return out


def _study_axes(runs: Sequence[tuple], priority: Sequence[str]) -> list[str]:
    """The config keys that describe how the runs differ.

    Candidates are the overridden keys, in ``priority`` order (axes, then variant keys, then
    block overrides; FA.ENABLED last). A key is kept when its effective value is not determined
    by the keys kept before it (a constant is determined by nothing; a learning rate that follows
    the method, or FA.ROLE that follows FA.OP, by those keys); then kept keys that the others
    determine are dropped. Kept keys are returned in order of first appearance.
    """
    overridden = list(dict.fromkeys(k for _, _, over, *_ in runs for k in over))
    order = [k for k in dict.fromkeys([*priority, *overridden]) if k != "FA.ENABLED"]

    def determined(key: str, by: list[str]) -> bool:  # is key's value a function of by's values?
        pairs = {(tuple(_setting(cfg, k) for k in by), _setting(cfg, key))
                 for _, _, _, cfg, *_ in runs}
        return len(pairs) == len({ctx for ctx, _ in pairs})

    kept: list[str] = []
    for key in [*order, "FA.ENABLED"]:
        if key in overridden and not determined(key, kept):
            kept.append(key)
    for key in reversed(kept[:]):  # then drop keys the later ones made redundant
        if determined(key, [k for k in kept if k != key]):
            kept.remove(key)
    return [k for k in overridden if k in kept]


def _setting(cfg, key: str) -> str:
    if key.startswith("FA.") and key != "FA.ENABLED" and not cfg.FA.ENABLED:
        return "off"
    node = cfg
    for part in key.split("."):
        node = node[part]
    return _fmt(node)


def _scaled(cfg) -> bool:
    """Whether an FA run changes the loss scale (LOSS_MODE add): only then does the loss-scale
    control tell augmentation from scale; a ``mean`` or ``replace`` run keeps the baseline's."""
    return cfg.FA.ENABLED and cfg.FA.LOSS_MODE == "add"


def _detection_spec(spec, grid_dir: Path, data_root: str, where: str) -> dict:
    """The checked ``eval.detection`` mapping, paths made absolute."""
    spec = _mapping(spec, where, "eval.detection")
    unknown = set(spec) - DETECTION_KEYS
    need(not unknown, where, f"eval.detection: unknown key(s) {sorted(unknown)}; "
          f"allowed: {sorted(DETECTION_KEYS)}")
    config = spec.get("config")
    need(isinstance(config, str) and config, where, "eval.detection.config is required")
    config = Path(_subst(config, data_root))
    config = config if config.is_absolute() else grid_dir / config
    need(config.is_file(), where, f"eval.detection.config {config} not found")
    out = {"config": str(config.resolve()),
           "trials": _count(spec.get("trials", 1), where, "eval.detection.trials"),
           "overrides": {k: _subst(v, data_root)
                         for k, v in _mapping(spec.get("overrides"), where,
                                              "eval.detection.overrides").items()}}
    for split in ("train", "test"):
        pair = _subst(spec.get(split), data_root)
        need(isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair),
              where, f"eval.detection.{split} must be [COCO json, image folder], got {pair!r}")
        out[split] = pair
    return out


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` as plain YAML: a tag is refused, never constructed."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        from pretrain.config import yaml_tag_refused

        raise StudyError(yaml_tag_refused(where, e, "grid")) from None
    except yaml.YAMLError as e:
        raise StudyError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_grid(path: str | os.PathLike, data_root: str | None = None) -> Grid:
    """Read, expand and validate a study grid; raises StudyError naming the file and problem."""
    from feataug.data import PREPARERS, default_root

    path = Path(path)
    where = str(path)
    need(path.is_file(), where, "no such grid file")
    text = path.read_text()
    top = _mapping(_parse_yaml(text, where), where, "the grid")
    unknown = set(top) - GRID_KEYS
    need(not unknown, where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    blocks = top.get("blocks")
    need(isinstance(blocks, list) and blocks, where, "`blocks:` must be a non-empty list")
    data_root = str(data_root or default_root())

    expanded, seen = [], {}
    axis_keys, variant_keys, block_keys = [], [], []
    for i, block in enumerate(blocks):
        if isinstance(block, dict):
            axis_keys += list(_mapping(block.get("axes"), where, "axes"))
            for v in _mapping(block.get("variants"), where, "variants").values():
                variant_keys += list(v or {}) if isinstance(v, dict) else []
            block_keys += list(_mapping(block.get("overrides"), where, "overrides"))
        for name, config_file, over, cfg, is_control in _expand_block(block, i, path.parent, top,
                                                                      data_root, where):
            key = (config_file, _digest_cfg(cfg))
            if key in seen:  # the same run reached twice (e.g. FA off under several FA values)
                continue
            need(name not in {n for n, *_ in expanded}, where,
                  f"two different runs are both named {name!r}; give the variants distinct names")
            seen[key] = name
            expanded.append((name, config_file, over, cfg, is_control))

    axes = _study_axes(expanded, [*axis_keys, *variant_keys, *block_keys])
    baselines = {_digest_cfg(cfg, drop_fa=True): name
                 for name, _, _, cfg, _ in expanded if not cfg.FA.ENABLED}
    controls = {_digest_cfg(cfg, drop_fa=True): name
                for name, _, _, cfg, is_control in expanded if is_control and cfg.FA.ENABLED}
    runs = []
    for name, config_file, over, cfg, is_control in expanded:
        same = _digest_cfg(cfg, drop_fa=True)
        runs.append(Run(name, config_file, tuple(over.items()),
                        baseline=baselines.get(same) if cfg.FA.ENABLED else None,
                        control=controls.get(same) if _scaled(cfg) and not is_control else None,
                        settings=tuple((k, _setting(cfg, k)) for k in axes)))
    if top.get("random_init"):
        _, file0, over0, *_ = expanded[0]  # the first run's trunk, untrained
        over = {k: v for k, v in over0.items() if not k.startswith("FA.")}
        runs.insert(0, Run(RANDOM_INIT, file0, tuple(over.items()), random_init=True,
                           settings=tuple((k, "") for k in axes)))

    ev = {**EVAL_DEFAULTS, **_mapping(top.get("eval"), where, "eval")}
    unknown = set(ev) - set(EVAL_DEFAULTS)
    need(not unknown, where, f"eval: unknown key(s) {sorted(unknown)}; "
          f"allowed: {sorted(EVAL_DEFAULTS)}")
    ev = {k: _subst(v, data_root) for k, v in ev.items()}
    if ev["detection"] is None:
        del ev["detection"]  # (so that grids without it keep their job digests)
    else:
        ev["detection"] = _detection_spec(ev["detection"], path.parent, data_root, where)
    need(bool(ev["train"]) and bool(ev["val"]), where,
          "eval.train and eval.val (labelled splits) are required")
    prepare = top.get("prepare") or []
    prepare = [prepare] if isinstance(prepare, str) else list(prepare)
    for name in prepare:
        need(name in PREPARERS, where, f"prepare: unknown dataset {name!r}; "
              f"choose from {', '.join(PREPARERS)}")
    seeds = _count(top.get("seeds", 3), where, "seeds")
    jobs = _count(top.get("jobs", 1), where, "jobs")
    slurm = slurm_spec(top.get("slurm"), where)
    return Grid(str(path), text, runs, axes, ev, seeds, prepare, jobs, slurm)
