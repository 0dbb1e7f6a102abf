"""Study jobs: one (run, seed) each, run in order or in worker processes, resumable.

A job folder holds ``job.json`` from its start and ``result.json`` (atomically, last) when it
is done; a rerun skips finished jobs and resumes the others from their ``last.pth``."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import get_cfg
from pretrain.utils.io import atomic_write_text
from pretrain.utils.lock import run_lock
from pretrain.utils.tracking import check_wandb

from .grid import Grid, Run, StudyError, _digest_cfg, _resolve
from .report import METRICS, write_reports

RESULT = "result.json"
JOB = "job.json"
# What a study job sets where the grid's overrides leave the key alone (the base config's value
# is replaced): numbered checkpoints are off, so a job keeps its last.pth alone (a grid of many
# jobs would otherwise fill the disk). Resume-free keys only (``pretrain.config``): they are
# kept out of the job digest, so a finished job stays finished whatever their value.
STUDY_DEFAULTS = (("SOLVER.CHECKPOINT_PERIOD", 0),)


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
        """The frozen pretraining config this job trains: the grid's (``grid_cfg``) with
        ``STUDY_DEFAULTS`` for the keys the grid's overrides do not set. With ``LOGGER.WANDB``
        on, likewise, the job is the W&B run ``<run>/seed<k>`` in a group named after the
        study's folder (``wandb_defaults``)."""
        cfg = self._resolve(dict(STUDY_DEFAULTS))
        if cfg.LOGGER.WANDB:
            cfg = self._resolve({**dict(STUDY_DEFAULTS), **self.wandb_defaults()})
        return cfg

    def wandb_defaults(self) -> dict:
        """W&B name and group of the job: ``<run>/seed<k>``, the study's folder name (the job
        folder is ``STUDY/runs/<run>/seed<k>``)."""
        return {"LOGGER.WANDB_NAME": f"{self.run.name}/seed{self.seed}",
                "LOGGER.WANDB_GROUP": Path(self.output_dir).parent.parent.parent.name}

    def grid_cfg(self):
        """The frozen config as the grid alone resolves it (base config <- overrides), the one
        the job digest is taken of."""
        return self._resolve({})

    def _resolve(self, defaults: dict):
        """base config <- ``defaults`` <- the run's overrides <- OUTPUT_DIR, SEED (the base file
        is read once per process: ``grid._resolve``)."""
        over = {**defaults, **dict(self.run.overrides), "OUTPUT_DIR": self.output_dir,
                "SEED": self.seed}
        return _resolve(self.run.config_file, over, self.label)

    def digest(self) -> str:
        """What a job folder's records must match: the grid's config (not ``STUDY_DEFAULTS``,
        so the folders of studies run before a default changed stay valid; ``LOGGER`` at its
        defaults, so turning W&B on or off keeps finished jobs finished), seed, evaluation."""
        cfg = {**self.grid_cfg(), "LOGGER": get_cfg().LOGGER}
        spec = dict(config=_digest_cfg(cfg), random_init=self.run.random_init,
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
    last); a failure is returned with ``status`` failed and its traceback in ``error.txt``.
    The job's folder is locked for the run: a job that another process runs is refused."""
    with run_lock(job.output_dir, "feataug study", key="study job folder"):
        return _execute(job, runner, digest)


def _execute(job: Job, runner: Callable[[Job], dict], digest: str | None) -> dict:
    folder = Path(job.output_dir)
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


def _worker_init(threads: int, study: int) -> None:
    """A job process: ``threads`` torch threads, and it ends with the study process ``study``
    (pid): a killed study leaves no job running unseen (an interrupted job resumes from its
    ``last.pth`` at the next run)."""
    import torch

    _end_with(study)
    torch.set_num_threads(threads)


def _end_with(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when ``parent`` exits (prctl PR_SET_PDEATHSIG);
    elsewhere nothing. If ``parent`` is already gone, end now."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):  # no prctl: not Linux
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


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
    for job in {j.run.name: j for j in all_jobs}.values():  # before anything is written
        check_wandb(job.cfg(), job.run.name)
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
    write_reports(grid, out, records.values(), seeds, plots=plots,
                  wall_s=time.perf_counter() - t0 if todo else None)
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
                             initargs=(threads, os.getpid())) as pool:
        futures = [pool.submit(_execute_quiet, j, runner, digests[j.output_dir]) for j in todo]
        for f in as_completed(futures):
            yield f.result()


def _last_logged(metrics_path: Path, keys: Sequence[str]) -> dict[str, float | None]:
    """The last value of each of ``keys`` in a run's metrics.jsonl (None where never logged)."""
    last: dict[str, float | None] = dict.fromkeys(keys)
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            last.update({k: record[k] for k in keys if isinstance(record, dict) and k in record})
    return last


def detection_metrics(spec: dict, checkpoint: Path | None, folder: Path, seed: int) -> dict:
    """COCO AP / AP50 (%) of Faster/Mask R-CNN fine-tuned from ``checkpoint`` (converted to
    Detectron2 weights in ``folder``; None: random initialization) on ``spec``'s data, with
    ``feataug detect``'s own training and evaluation; the mean over ``spec["trials"]`` seeds
    ``seed``, ``seed + 1``, ... Detectron2's log goes to ``folder/detect*/log.txt``."""
    from transfer.convert import convert
    from transfer.detect import DetectOptions, run_detection

    weights = ""
    if checkpoint is not None:
        weights = str(folder / "d2_weights.pkl")
        convert(checkpoint, weights, overwrite=True)
    names = (f"study_det_train_{seed}", f"study_det_test_{seed}")
    opts = ["DATASETS.TRAIN", f"('{names[0]}',)", "DATASETS.TEST", f"('{names[1]}',)",
            "DATASETS.AUTO_NUM_CLASSES", "True", "MODEL.WEIGHTS", weights,
            "OUTPUT_DIR", str(folder / "detect"), "SEED", str(seed),
            *[str(x) for kv in spec["overrides"].items() for x in kv]]
    results = run_detection(DetectOptions(
        spec["config"], tuple(opts), trials=spec["trials"], quiet=True,
        from_scratch=checkpoint is None, resume=True,
        register_coco=((names[0], *spec["train"]), (names[1], *spec["test"]))))
    summary = results["summary"]
    return {"det_ap": summary["bbox/AP"]["mean"], "det_ap50": summary["bbox/AP50"]["mean"]}


def pretrain_and_evaluate(job: Job) -> dict:
    """The study's runner: pretrain (resuming from ``last.pth``) and evaluate the trunk of
    ``last.pth``; for ``random_init``, evaluate the untrained trunk of seed ``job.seed``."""
    import torch

    from pretrain.backbone import build_backbone
    from pretrain.checkpoint import load_checkpoint
    from pretrain.engine import train
    from pretrain.evaluation import evaluate_backbone
    from pretrain.lincls import load_backbone
    from pretrain.utils.env import seed_all

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
                    **_last_logged(Path(cfg.OUTPUT_DIR) / "metrics.jsonl", ("loss", "z_std")))
    t1 = time.perf_counter()
    result = evaluate_backbone(backbone, job.eval, cfg.DATA.IMAGE_SIZE, device)
    if job.eval.get("detection"):
        last = None if job.run.random_init else Path(cfg.OUTPUT_DIR) / "last.pth"
        result |= detection_metrics(job.eval["detection"], last, Path(job.output_dir), job.seed)
    t2 = time.perf_counter()
    metrics = {**{k: round(v, 4) for k, v in result.items()}, **info,
               "pretrain_s": round(t1 - t0, 1), "eval_s": round(t2 - t1, 1),
               "cpu_s": round(time.process_time() - cpu0, 1)}
    if cfg.LOGGER.WANDB:
        log_job_metrics(cfg, metrics)
    return metrics


def log_job_metrics(cfg, metrics: dict) -> None:
    """A job's metrics as ``study/KEY`` in the summary of its W&B run: the pretraining run,
    resumed by the id its folder keeps (for an untrained trunk, a new run)."""
    from pretrain.utils.tracking import open_run

    run = open_run(cfg, cfg.OUTPUT_DIR, resume=True, job_type="pretrain")
    run.summary.update({f"study/{k}": v for k, v in metrics.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)})
    run.finish()
