"""``feataug study``: run a grid of pretraining experiments and compare them.

A study grid (YAML) names a base pretraining config and lists runs as config overrides::

    base: ../pretrain/tiny_moco_fa_r18.yaml   # relative to the grid file
    seeds: 2                                  # default for --seeds
    jobs: 1                                   # default for --jobs
    prepare: [fashion-mnist]                  # `feataug prepare-data` these first
    random_init: true                         # add an untrained-trunk reference row
    overrides: {DATA.ROOT: "{data}/fashion-mnist", DATA.FORMAT: idx, SOLVER.MAX_ITER: 200}
    eval:                                     # labelled splits for kNN / linear top-1
      train: "{data}/fashion-mnist/train-images-idx3-ubyte.gz"
      val: "{data}/fashion-mnist/t10k-images-idx3-ubyte.gz"
      format: idx
      max_train: 5000
      max_val: 5000
    blocks:
      - name: moco
        overrides: {MODEL.METHOD: moco}
        variants:                             # named override sets
          baseline: {FA.ENABLED: false}
          fa: {FA.ENABLED: true}
        axes:                                 # expanded as a product
          FA.OP: [noise, extrapolate]
          DA.STRENGTH: [weak, strong]
        skip_invalid: false                   # true: drop combinations the model refuses

``{data}`` in any string stands for the dataset root (``$FEATAUG_DATA``, else ``datasets``).
Each run of a block is ``base <- grid overrides <- block overrides <- one axes combination <-
one variant`` (a block without variants has one, unnamed). When FA ends up disabled, the FA keys
of the run are dropped (they mean nothing then), so equal runs collapse into one; a run's name is
the block name, the variant name and ``key=value`` for each axis value it really uses.

The *matching baseline* of a run is the run with FA disabled whose resolved config is the same
once the whole ``FA`` node is set aside (same method, backbone, DA, solver, ...).

Every (run, seed k) trains in ``OUT/runs/<name>/seed<k>`` with ``SEED k``. ``job.json`` is written
when a job starts and ``result.json`` (atomically) when its evaluation is done; a rerun skips jobs
with a result and resumes the others from their ``last.pth``; a folder that holds a different
config is refused. After every job ``OUT/results.csv`` (one row per run x seed) and
``OUT/results.md`` (mean ± std over seeds, delta vs. the matching baseline) are rewritten; at the
end ``OUT/plots/<AXIS>.png`` shows one bar chart per study axis (a config key that varies).

Evaluation: the trunk of ``last.pth`` (or an untrained one for ``random_init``) embeds the
labelled splits with the evaluation transform at ``DATA.IMAGE_SIZE``; weighted kNN (k=200,
tau=0.1) on L2-normalised features and, with ``eval.linear``, a linear classifier fitted to
convergence (L-BFGS, multinomial logistic regression on standardised features) give top-1 (%).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feataug.io import atomic_open, atomic_write_text

RESULT = "result.json"
JOB = "job.json"
RANDOM_INIT = "random-init"
# metric key -> label, in report order
METRICS = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1"}
EXTRA_COLUMNS = ("iterations", "loss", "pretrain_s", "eval_s", "cpu_s")
MAX_GROUPS = 12  # plots with more contexts than this show the mean over the other settings

EVAL_DEFAULTS = dict(train="", val="", format="folder", max_train=0, max_val=0,
                     train_per_class=0, val_per_class=0, knn_k=200,
                     knn_t=0.1, linear=True, linear_weight_decay=1e-3, batch_size=256,
                     num_workers=0, image_size=0)
GRID_KEYS = {"base", "seeds", "jobs", "prepare", "random_init", "overrides", "eval", "blocks",
             "description"}
BLOCK_KEYS = {"name", "base", "overrides", "variants", "axes", "skip_invalid"}


class StudyError(Exception):
    """A grid or output folder that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Run:
    """One pretraining configuration of the study (repeated over seeds)."""

    name: str
    config_file: str
    overrides: tuple[tuple[str, Any], ...]  # KEY, value pairs applied to config_file
    random_init: bool = False  # evaluate the untrained trunk instead of pretraining
    baseline: str | None = None  # name of the matching FA-off run
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

    def run(self, name: str) -> Run:
        return next(r for r in self.runs if r.name == name)


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise StudyError(f"{where}: {msg}")


def _subst(value, data_root: str):
    """``{data}`` -> the dataset root, in strings and inside lists."""
    if isinstance(value, str):
        return value.replace("{data}", data_root)
    if isinstance(value, list):
        return [_subst(v, data_root) for v in value]
    return value


def _mapping(obj, where: str, what: str) -> dict:
    _need(obj is None or isinstance(obj, dict), where, f"{what} must be a mapping, got {obj!r}")
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
    from pretrain.config import ConfigError

    try:
        cfg = pickle.loads(_base_cfg_pickle(config_file))  # a deep copy, 3x faster than clone()
        cfg.defrost()
        cfg.merge_from_list([x for kv in overrides.items() for x in kv])
        cfg.freeze()
        return cfg
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise StudyError(f"{where}: {str(msg).splitlines()[0]}") from None


def _check_model(cfg) -> None:
    """ConfigError for a combination the pretraining code refuses (checked before any run)."""
    from pretrain.build import check_cfg
    from pretrain.config import ConfigError
    from pretrain.transforms import build_pretrain_transform

    check_cfg(cfg)
    try:
        build_pretrain_transform(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _digest_cfg(cfg, drop_fa: bool = False) -> str:
    """Canonical text of a config without OUTPUT_DIR and SEED (optionally without FA)."""
    c = {k: v for k, v in cfg.items() if k not in ("OUTPUT_DIR", "SEED")}
    if drop_fa:
        del c["FA"]
    return json.dumps(c, sort_keys=True, default=str)


def _expand_block(block: dict, index: int, grid_dir: Path, top: dict, data_root: str, where: str):
    """(name, config_file, overrides, resolved cfg) of every valid run of one block."""
    from pretrain.config import ConfigError

    block = _mapping(block, where, f"blocks[{index}]")
    unknown = set(block) - BLOCK_KEYS
    _need(not unknown, where, f"blocks[{index}]: unknown key(s) {sorted(unknown)}; "
          f"allowed: {sorted(BLOCK_KEYS)}")
    bname = str(block.get("name", ""))
    bwhere = f"{where}: block {bname or index}"
    base = block.get("base", top.get("base"))
    _need(isinstance(base, str) and base, bwhere, "no base config (`base:` in the grid or block)")
    config_file = (grid_dir / base) if not Path(base).is_absolute() else Path(base)
    _need(config_file.is_file(), bwhere, f"base config {config_file} not found")
    common = {**_mapping(top.get("overrides"), where, "overrides"),
              **_mapping(block.get("overrides"), bwhere, "overrides")}
    variants = _mapping(block.get("variants"), bwhere, "variants") or {"": {}}
    for vname in variants:
        _need(isinstance(vname, str), bwhere, f"variant name {vname!r} is not a string (YAML "
              "reads off/no/yes/on as booleans: quote it)")
    axes = _mapping(block.get("axes"), bwhere, "axes")
    for key, values in axes.items():
        _need(isinstance(values, list) and values, bwhere, f"axis {key} needs a non-empty list")
    skip_invalid = bool(block.get("skip_invalid", False))

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
            out.append((name, str(config_file), over, cfg))
    for (key, value), reason in refused.items():
        _need((key, _fmt(value)) in used, bwhere, f"{key} value {value!r} is never valid: {reason}")
    return out


def _study_axes(runs: Sequence[tuple[str, str, dict, Any]], priority: Sequence[str]) -> list[str]:
    """The config keys that describe how the runs differ.

    Candidates are the overridden keys, in ``priority`` order (axes, then variant keys, then
    block overrides; FA.ENABLED last). A key is kept when its effective value is not determined
    by the keys kept before it (a constant is determined by nothing; a learning rate that follows
    the method, or FA.ROLE that follows FA.OP, by those keys); then kept keys that the others
    determine are dropped. Kept keys are returned in order of first appearance.
    """
    overridden = list(dict.fromkeys(k for _, _, over, _ in runs for k in over))
    order = [k for k in dict.fromkeys([*priority, *overridden]) if k != "FA.ENABLED"]

    def determined(key: str, by: list[str]) -> bool:  # is key's value a function of by's values?
        pairs = {(tuple(_setting(cfg, k) for k in by), _setting(cfg, key)) for *_, cfg in runs}
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


def load_grid(path: str | os.PathLike, data_root: str | None = None) -> Grid:
    """Read, expand and validate a study grid; raises StudyError naming the file and problem."""
    import yaml

    from feataug.data import PREPARERS, default_root

    path = Path(path)
    where = str(path)
    _need(path.is_file(), where, "no such grid file")
    text = path.read_text()
    try:
        top = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StudyError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    top = _mapping(top, where, "the grid")
    unknown = set(top) - GRID_KEYS
    _need(not unknown, where, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    blocks = top.get("blocks")
    _need(isinstance(blocks, list) and blocks, where, "`blocks:` must be a non-empty list")
    data_root = str(data_root or default_root())

    expanded, seen = [], {}
    axis_keys, variant_keys, block_keys = [], [], []
    for i, block in enumerate(blocks):
        if isinstance(block, dict):
            axis_keys += list(_mapping(block.get("axes"), where, "axes"))
            for v in _mapping(block.get("variants"), where, "variants").values():
                variant_keys += list(v or {}) if isinstance(v, dict) else []
            block_keys += list(_mapping(block.get("overrides"), where, "overrides"))
        for name, config_file, over, cfg in _expand_block(block, i, path.parent, top, data_root,
                                                          where):
            key = (config_file, _digest_cfg(cfg))
            if key in seen:  # the same run reached twice (e.g. FA off under several FA values)
                continue
            _need(name not in {n for n, *_ in expanded}, where,
                  f"two different runs are both named {name!r}; give the variants distinct names")
            seen[key] = name
            expanded.append((name, config_file, over, cfg))

    axes = _study_axes(expanded, [*axis_keys, *variant_keys, *block_keys])
    baselines = {_digest_cfg(cfg, drop_fa=True): name
                 for name, _, _, cfg in expanded if not cfg.FA.ENABLED}
    runs = [Run(name, config_file, tuple(over.items()),
                baseline=baselines.get(_digest_cfg(cfg, drop_fa=True)) if cfg.FA.ENABLED else None,
                settings=tuple((k, _setting(cfg, k)) for k in axes))
            for name, config_file, over, cfg in expanded]
    if top.get("random_init"):
        _, file0, over0, _ = expanded[0]  # the first run's trunk, untrained
        over = {k: v for k, v in over0.items() if not k.startswith("FA.")}
        runs.insert(0, Run(RANDOM_INIT, file0, tuple(over.items()), random_init=True,
                           settings=tuple((k, "") for k in axes)))

    ev = {**EVAL_DEFAULTS, **_mapping(top.get("eval"), where, "eval")}
    unknown = set(ev) - set(EVAL_DEFAULTS)
    _need("detection" not in unknown, where,
          "eval.detection is not wired yet (kNN and linear top-1 only); see docs/study.md")
    _need(not unknown, where, f"eval: unknown key(s) {sorted(unknown)}; "
          f"allowed: {sorted(EVAL_DEFAULTS)}")
    ev = {k: _subst(v, data_root) for k, v in ev.items()}
    _need(bool(ev["train"]) and bool(ev["val"]), where,
          "eval.train and eval.val (labelled splits) are required")
    prepare = top.get("prepare") or []
    prepare = [prepare] if isinstance(prepare, str) else list(prepare)
    for name in prepare:
        _need(name in PREPARERS, where, f"prepare: unknown dataset {name!r}; "
              f"choose from {', '.join(PREPARERS)}")
    seeds = top.get("seeds", 3)
    _need(isinstance(seeds, int) and seeds >= 1, where,
          f"seeds must be a positive integer, got {seeds!r}")
    jobs = top.get("jobs", 1)
    _need(isinstance(jobs, int) and jobs >= 1, where,
          f"jobs must be a positive integer, got {jobs!r}")
    return Grid(str(path), text, runs, axes, ev, seeds, prepare, jobs)


# ----------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One (run, seed): the runner's whole input (picklable, for worker processes)."""

    run: Run
    seed: int
    output_dir: str
    eval: dict

    @property
    def label(self) -> str:
        return f"{self.run.name} seed{self.seed}"

    def cfg(self):
        """The frozen pretraining config of this job."""
        from pretrain.config import load_cfg

        return load_cfg(self.run.config_file,
                        self.run.opts() + ["OUTPUT_DIR", self.output_dir, "SEED", self.seed])

    def digest(self) -> str:
        spec = dict(config=_digest_cfg(self.cfg()), random_init=self.run.random_init,
                    seed=self.seed, eval=self.eval)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def make_jobs(grid: Grid, out: Path, seeds: Iterable[int]) -> list[Job]:
    return [Job(run, s, str(out / "runs" / run.name / f"seed{s}"), grid.eval)
            for run in grid.runs for s in seeds]


def finished(job: Job, digest: str) -> dict | None:
    """The stored record of a finished job, None if it has not finished.

    Raises StudyError when the job folder was made for a different config.
    """
    folder = Path(job.output_dir)
    for name in (JOB, RESULT):
        f = folder / name
        if not f.is_file():
            continue
        try:
            stored = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise StudyError(f"{f}: unreadable ({e}); remove the folder to rerun this job") \
                from None
        if stored.get("digest") != digest:
            raise StudyError(f"{f}: made for a different config or evaluation than this grid's "
                             f"{job.label}; use another --out or remove {folder}")
        if name == RESULT:
            return stored
    return None


def execute(job: Job, runner: Callable[[Job], dict], digest: str | None = None) -> dict:
    """Run one job; returns its record. A success is stored in ``result.json`` (atomically,
    last); a failure is returned with ``status`` failed and its traceback in ``error.txt``."""
    folder = Path(job.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    digest = digest or job.digest()
    record = dict(run=job.run.name, seed=job.seed, digest=digest)
    atomic_write_text(folder / JOB, json.dumps(record, indent=2) + "\n")
    t0 = time.perf_counter()
    try:
        metrics = runner(job)
    except Exception as e:  # noqa: BLE001 - one failed run must not stop the study
        atomic_write_text(folder / "error.txt", traceback.format_exc())
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return dict(record, status="failed", error=f"{type(e).__name__}: {msg}",
                    wall_s=round(time.perf_counter() - t0, 1))
    record.update(status="ok", metrics=metrics, wall_s=round(time.perf_counter() - t0, 1))
    atomic_write_text(folder / RESULT, json.dumps(record, indent=2) + "\n")
    (folder / "error.txt").unlink(missing_ok=True)  # from an earlier, failed try
    return record


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _execute_quiet(job: Job, runner: Callable[[Job], dict], digest: str) -> dict:
    """``execute`` in a worker process, its console output sent to the job's ``console.txt``."""
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    saved = sys.stdout, sys.stderr
    with open(Path(job.output_dir) / "console.txt", "a") as log:
        sys.stdout = sys.stderr = log
        try:
            return execute(job, runner, digest)
        finally:
            sys.stdout, sys.stderr = saved


def run_study(grid: Grid, out: str | os.PathLike, seeds: Sequence[int],
              runner: Callable[[Job], dict] | None = None, jobs: int = 1,
              echo: Callable[[str], None] = print, plots: bool = True) -> list[dict]:
    """Run every unfinished (run, seed) of ``grid`` and write the reports; returns all records."""
    out = Path(out)
    runner = runner or pretrain_and_evaluate
    all_jobs = make_jobs(grid, out, seeds)
    digests = {j.output_dir: j.digest() for j in all_jobs}
    records, todo = {}, []
    for j in all_jobs:
        rec = finished(j, digests[j.output_dir])
        if rec is not None:
            records[(j.run.name, j.seed)] = rec
        else:
            todo.append(j)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", grid.text)
    echo(f"study {grid.path}: {len(grid.runs)} runs x {len(seeds)} seeds = {len(all_jobs)} jobs; "
         f"{len(records)} finished earlier (skipped), {len(todo)} to run -> {out}")
    write_reports(grid, out, records.values(), seeds, plots=False)

    t0 = time.perf_counter()
    for n, rec in enumerate(_run_all(todo, runner, jobs, digests), 1):
        records[(rec["run"], rec["seed"])] = rec
        elapsed = time.perf_counter() - t0
        eta = elapsed / n * (len(todo) - n)
        shown = ", ".join(f"{METRICS[k]} {v:.2f}" for k, v in rec.get("metrics", {}).items()
                          if k in METRICS)
        echo(f"[{n}/{len(todo)}] {rec['run']} seed{rec['seed']}: "
             f"{shown if rec['status'] == 'ok' else 'FAILED ' + rec['error']} "
             f"({rec['wall_s']:.0f} s; elapsed {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left)")
        write_reports(grid, out, records.values(), seeds, plots=False)
    write_reports(grid, out, records.values(), seeds, plots=plots)
    return [records[(j.run.name, j.seed)] for j in all_jobs if (j.run.name, j.seed) in records]


def _run_all(todo: list[Job], runner, jobs: int, digests: dict) -> Iterable[dict]:
    if jobs <= 1 or len(todo) <= 1:
        for j in todo:
            yield execute(j, runner, digests[j.output_dir])
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_execute_quiet, j, runner, digests[j.output_dir]) for j in todo]
        for f in as_completed(futures):
            yield f.result()


# ----------------------------------------------------------------------------- aggregation
def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is nan for a single value."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return m, s


def summarize(grid: Grid, records: Iterable[dict], metrics: Sequence[str]) -> list[dict]:
    """Per run: seeds, mean/std of each metric over seeds and the delta vs. the matching baseline.

    Delta = mean over the seeds both runs finished of (run - baseline), same seed; its std is the
    sample std of those paired differences.
    """
    values: dict[str, dict[str, dict[int, float]]] = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        for m in metrics:
            v = rec["metrics"].get(m)
            if v is not None:
                values.setdefault(rec["run"], {}).setdefault(m, {})[rec["seed"]] = float(v)
    rows = []
    for run in grid.runs:
        mine = values.get(run.name, {})
        row = dict(run=run.name, baseline=run.baseline, random_init=run.random_init,
                   settings=dict(run.settings),
                   seeds=sorted({s for per in mine.values() for s in per}))
        for m in metrics:
            per = mine.get(m, {})
            row[m] = mean_std(list(per.values()))
            base = values.get(run.baseline, {}).get(m, {}) if run.baseline else {}
            common = sorted(set(per) & set(base))
            row[m + "_delta"] = mean_std([per[s] - base[s] for s in common])
        rows.append(row)
    return rows


def _pm(ms: tuple[float, float], signed: bool = False) -> str:
    m, s = ms
    if math.isnan(m):
        return ""
    text = f"{m:+.2f}" if signed else f"{m:.2f}"
    return text if math.isnan(s) else f"{text} ± {s:.2f}"


def markdown_table(grid: Grid, rows: list[dict], metrics: Sequence[str]) -> str:
    """One line per run: its study-axis values, seeds, mean ± std and delta of each metric."""
    head = ["run", *grid.axes, "seeds"]
    for m in metrics:
        head += [METRICS.get(m, m), f"Δ {METRICS.get(m, m)}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["run"], *(row["settings"].get(a, "") for a in grid.axes),
                 str(len(row["seeds"]))]
        for m in metrics:
            if row["random_init"]:
                delta = ""
            elif row["baseline"] is None:
                delta = "baseline"
            else:
                delta = _pm(row[m + "_delta"], signed=True)
            cells += [_pm(row[m]), delta]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metrics_present(records: Iterable[dict]) -> list[str]:
    seen = {k for r in records if r.get("status") == "ok" for k in r["metrics"]}
    return [m for m in METRICS if m in seen]


def write_reports(grid: Grid, out: Path, records: Iterable[dict], seeds: Sequence[int],
                  plots: bool = True) -> None:
    """``results.csv``, ``results.md`` and (with ``plots``) ``plots/<AXIS>.png`` in ``out``."""
    order = {run.name: i for i, run in enumerate(grid.runs)}
    records = sorted((r for r in records if r["run"] in order),
                     key=lambda r: (order[r["run"]], r["seed"]))
    metrics = _metrics_present(records)
    extra = [c for c in EXTRA_COLUMNS if any(c in r.get("metrics", {}) for r in records)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "seed", "status", *grid.axes, *metrics, *extra, "wall_s", "error"])
    for r in records:
        settings = dict(grid.run(r["run"]).settings)
        vals = r.get("metrics", {})
        w.writerow([r["run"], r["seed"], r["status"], *(settings.get(a, "") for a in grid.axes),
                    *(vals.get(m, "") for m in metrics + extra), r.get("wall_s", ""),
                    r.get("error", "")])
    atomic_write_text(out / "results.csv", buf.getvalue())

    rows = summarize(grid, records, metrics)
    ok = sum(r.get("status") == "ok" for r in records)
    failed = [f"{r['run']} seed{r['seed']}: {r['error']}" for r in records if r["status"] != "ok"]
    total_s = sum(r.get("wall_s", 0) for r in records)
    text = [f"# Study `{grid.path}`", "",
            f"{len(grid.runs)} runs x seeds {list(seeds)}: {ok} jobs finished"
            + (f", {len(failed)} failed" if failed else "")
            + f"; compute time {total_s / 60:.1f} min (sum over jobs).", "",
            "Top-1 (%) is mean ± sample std over seeds. Δ is the mean over seeds of (run − its "
            "matching FA-off baseline, same seed) ± the std of those differences.", ""]
    text.append(markdown_table(grid, rows, metrics) if metrics else "(no finished jobs yet)\n")
    if failed:
        text += ["", "Failed jobs:", *(f"- {f}" for f in failed)]
    atomic_write_text(out / "results.md", "\n".join(text).rstrip() + "\n")
    if plots and metrics:
        for axis in grid.axes:
            plot_axis(grid, rows, axis, metrics, out / "plots" / f"{_safe(axis)}.png")


def plot_axis(grid: Grid, rows: list[dict], axis: str, metrics: Sequence[str], path: Path) -> None:
    """Grouped bars: one group per setting of the other axes, one bar per value of ``axis``
    (mean ± std over seeds); dashed line: the random-init reference. With more than
    ``MAX_GROUPS`` groups, one bar per value: the mean over all runs that use it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [a for a in grid.axes if a != axis]
    runs = [r for r in rows if not r["random_init"]]
    values = list(dict.fromkeys(r["settings"][axis] for r in runs))
    groups = list(dict.fromkeys(tuple(r["settings"][o] for o in others) for r in runs))
    marginal = len(groups) > MAX_GROUPS
    if marginal:
        groups = [("mean over the other settings",)]
    ref = next((r for r in rows if r["random_init"]), None)
    width_in = max(5.0, 1.2 + 0.35 * len(groups) * len(values))
    fig, axs = plt.subplots(1, len(metrics), figsize=(width_in * len(metrics), 4.2), squeeze=False)
    width = 0.8 / len(values)
    for ax, m in zip(axs[0], metrics, strict=True):
        lows = []
        for j, v in enumerate(values):
            ys, es = [], []
            for g in groups:
                hit = [r[m] for r in runs if r["settings"][axis] == v
                       and (marginal or tuple(r["settings"][o] for o in others) == g)]
                hit = [h for h in hit if not math.isnan(h[0])]
                if marginal:
                    mean, std = mean_std([h[0] for h in hit])
                else:
                    mean, std = hit[0] if hit else (math.nan, math.nan)
                ys.append(mean)
                es.append(0.0 if math.isnan(std) else std)
                if not math.isnan(mean):
                    lows.append(mean - es[-1])
            xs = [i + (j - (len(values) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=v)
        if ref and not math.isnan(ref[m][0]):
            ax.axhline(ref[m][0], ls="--", color="gray", lw=1, label="random init")
            lows.append(ref[m][0])
        if lows:
            ax.set_ylim(bottom=max(0.0, min(lows) - 2.0))
        tilt = len(groups) > 3
        ax.set_xticks(range(len(groups)), [", ".join(g) or "all" for g in groups],
                      rotation=20 if tilt else 0, ha="right" if tilt else "center")
        ax.set(ylabel=f"{METRICS.get(m, m)} (%)", title=f"{METRICS.get(m, m)} by {axis}")
        if others and not marginal:
            ax.set_xlabel(", ".join(others))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, title=axis, title_fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation
@functools.lru_cache(maxsize=4)
def _eval_source(root: str, fmt: str, max_images: int, per_class: int):
    """A labelled split: the first ``max_images`` (0: all), then the first ``per_class`` images
    of each class (0: all)."""
    import numpy as np

    from pretrain.data import ArrayImages, ImageFiles, load_source

    source = load_source(root, fmt, max_images)
    if per_class <= 0:
        return source
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(source.labels):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= per_class:
            keep.append(i)
    if isinstance(source, ArrayImages):
        out = ArrayImages(source.images[keep], np.asarray(source.labels)[keep], source.origin)
        out.classes = list(source.classes)
        return out
    return ImageFiles([source.paths[i] for i in keep], [source.labels[i] for i in keep],
                      source.classes)


def linear_probe(train_x, train_y, val_x, val_y, num_classes: int, weight_decay: float = 1e-3,
                 max_iter: int = 200, device=None) -> float:
    """Top-1 (%) of multinomial logistic regression on standardised features.

    Minimises  mean CE(W x + b, y) + (weight_decay / 2) ||W||²  with L-BFGS from W = 0, b = 0
    (a convex problem: the result does not depend on a random start).
    """
    import torch
    import torch.nn.functional as F

    train_x, val_x, train_y, val_y = (t.to(device) for t in (train_x, val_x, train_y, val_y))
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt, xv = (train_x - mu) / sd, (val_x - mu) / sd  # [N, D], [M, D]
    w = torch.zeros(xt.shape[1], num_classes, device=xt.device, requires_grad=True)  # [D, C]
    b = torch.zeros(num_classes, device=xt.device, requires_grad=True)  # [C]
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, train_y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((xv @ w + b).argmax(1) == val_y).float().mean().item()


def evaluate_backbone(backbone, spec: dict, image_size: int, device=None) -> dict:
    """kNN (and linear) top-1 (%) of a trunk on the labelled splits of an ``eval`` spec."""
    import torch
    import torch.nn.functional as F

    from pretrain.data import ImageDataset
    from pretrain.knn import eval_loader, extract_features, knn_top1, labelled
    from pretrain.transforms import build_eval_transform

    device = device or torch.device("cpu")
    tf = build_eval_transform(spec.get("image_size") or image_size)
    sets = [ImageDataset(_eval_source(spec[s], spec["format"], spec[f"max_{s}"],
                                      spec[f"{s}_per_class"]), tf) for s in ("train", "val")]
    num_classes = max(labelled(sets[0], spec["train"]), labelled(sets[1], spec["val"]))
    backbone = backbone.to(device)
    (ftr, ytr), (fva, yva) = (
        extract_features(backbone, eval_loader(s, spec["batch_size"], spec["num_workers"]), device,
                         l2=False) for s in sets)
    out = dict(knn_top1=knn_top1(F.normalize(ftr, dim=1), ytr, F.normalize(fva, dim=1), yva,
                                 num_classes, spec["knn_k"], spec["knn_t"]))
    if spec["linear"]:
        out["linear_top1"] = linear_probe(ftr, ytr, fva, yva, num_classes,
                                          spec["linear_weight_decay"], device=device)
    return out


def _last_loss(metrics_path: Path) -> float | None:
    loss = None
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                loss = json.loads(line).get("loss", loss)
            except ValueError:
                continue
    return loss


def pretrain_and_evaluate(job: Job) -> dict:
    """The study's runner: pretrain (resuming from ``last.pth``) and evaluate the trunk of
    ``last.pth``; for ``random_init``, evaluate the untrained trunk of seed ``job.seed``."""
    import torch

    from pretrain.backbone import build_backbone
    from pretrain.checkpoint import load_checkpoint
    from pretrain.engine import seed_all, train
    from pretrain.lincls import load_backbone

    cfg = job.cfg()
    cpu0 = time.process_time()
    device = torch.device("cuda" if cfg.DEVICE != "cpu" and torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if job.run.random_init:
        seed_all(cfg.SEED)
        backbone = build_backbone(cfg.MODEL.BACKBONE, cfg.MODEL.STEM)
    else:
        summary = train(cfg, resume=True)
        last = Path(cfg.OUTPUT_DIR) / "last.pth"
        backbone = load_backbone(load_checkpoint(last), str(last))
        info = dict(iterations=summary["iter"],
                    loss=_last_loss(Path(cfg.OUTPUT_DIR) / "metrics.jsonl"))
    t1 = time.perf_counter()
    result = evaluate_backbone(backbone, job.eval, cfg.DATA.IMAGE_SIZE, device)
    t2 = time.perf_counter()
    return {**{k: round(v, 4) for k, v in result.items()}, **info,
            "pretrain_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1),
            "cpu_s": round(time.process_time() - cpu0, 1)}


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, metavar="F.yaml", help="study grid file")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds 0..N-1 for every run (default: the grid's `seeds`, else 3)")
    parser.add_argument("--out", default="", metavar="DIR",
                        help="output folder (default: output/study/<grid name>)")
    parser.add_argument("--jobs", type=int, default=None, metavar="J",
                        help="jobs run side by side in worker processes, each with "
                        "cores/J threads (default: the grid's `jobs`, else 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs, their baselines and the study axes; run nothing")
    parser.add_argument("--no-plots", action="store_true", help="skip the bar charts")


def format_plan(grid: Grid, seeds: Sequence[int]) -> str:
    lines = [f"{len(grid.runs)} runs x {len(seeds)} seeds ({list(seeds)}); "
             f"study axes: {', '.join(grid.axes) or '(none)'}"]
    shared = {kv for kv in grid.runs[0].overrides if all(kv in r.overrides for r in grid.runs)}
    if shared:
        lines.append("  all runs: " + " ".join(f"{k}={_fmt(v)}" for k, v in grid.runs[0].overrides
                                             if (k, v) in shared))
    for run in grid.runs:
        ref = ("reference" if run.random_init else "baseline" if run.baseline is None
               else f"vs {run.baseline}")
        over = " ".join(f"{k}={_fmt(v)}" for k, v in run.overrides if (k, v) not in shared)
        lines.append(f"  {run.name:<40} {ref:<28} {over}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        if args.seeds is not None and args.seeds < 1:
            raise StudyError(f"--seeds must be >= 1, got {args.seeds}")
        if args.jobs is not None and args.jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {args.jobs}")
        grid = load_grid(args.grid)
        seeds = list(range(args.seeds or grid.seeds))
        print(format_plan(grid, seeds))
        if args.dry_run:
            return 0
        if grid.prepare:
            from feataug.data import PREPARERS, DataError, default_root

            for name in grid.prepare:
                try:
                    PREPARERS[name](default_root())
                except DataError as e:
                    raise StudyError(f"{args.grid}: prepare {name}: {e}") from None
        out = Path(args.out or Path("output") / "study" / Path(args.grid).stem)
        records = run_study(grid, out, seeds, jobs=args.jobs or grid.jobs, plots=not args.no_plots)
    except StudyError as e:
        print(f"feataug study: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # config errors raised by the pretraining code while expanding the grid
        from pretrain.config import ConfigError

        if isinstance(e, ConfigError):
            print(f"feataug study: error: {args.grid}: {e}", file=sys.stderr)
            return 2
        raise
    print()
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'plots'}/ "
          f"in {(time.perf_counter() - t0) / 60:.1f} min")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        print(f"feataug study: error: {len(failed)} job(s) failed (see results.md and each "
              "job's error.txt); rerun to retry them", file=sys.stderr)
        return 1
    return 0
