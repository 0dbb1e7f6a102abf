"""``feataug study --slurm``: a study's unfinished jobs as the tasks of one Slurm job array.

Each (run, seed) job that has no ``result.json`` and is not in the queue already becomes one
array task (submitit, ``pip install 'feataug[cluster]'``), run in its own ``OUTPUT_DIR`` with the
same ``job.json`` / ``result.json`` bookkeeping as a local study (``jobs.execute``). The command
submits and returns; ``OUT/slurm/submitted.json`` records which Slurm job holds which job
folder, and submitit keeps its pickles and logs in ``OUT/slurm/<job id>/``. A rerun of the same
command skips finished jobs and the ones still queued or running (``sacct``), resubmits only
what is missing or failed, and, once nothing is left, writes ``results.csv`` / ``results.md``
as a local study does; ``--collect`` writes them from whatever has finished, submitting nothing.

Resources: ``DEFAULTS`` <- the grid's ``slurm:`` mapping <- the flags (``--nodes``,
``--gpus-per-node``, ``--partition``, ``--time`` in minutes, ``--account``, repeated
``--slurm-arg KEY=VALUE`` for any other sbatch option). A job of several GPUs runs one task per
GPU: every task pretrains in one process group (``pretrain.engine.launch.dist_env`` reads
``srun``'s ``SLURM_*`` variables), and task 0 alone evaluates and keeps the records.

Preemption and timeouts: ``StudyTask`` follows submitit's checkpoint protocol, so Slurm's
warning signal requeues the same call, which resumes from ``last.pth`` as any rerun of a job does.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pretrain.engine.launch import dist_env
from pretrain.utils.io import atomic_write_text

from .grid import Grid, StudyError
from .jobs import Job, execute, finished, make_jobs, pretrain_and_evaluate
from .report import write_reports
from .sbatch import SLURM_KEYS, check_text, sbatch_option

INSTALL = "pip install 'feataug[cluster]'"
# submitit's executor for the tasks: "slurm", or "local" (each task a local process: the tests)
CLUSTER = "slurm"
SUBMITTED = "submitted.json"
DEFAULTS = {"nodes": 1, "gpus_per_node": 1, "time": 240}
FLAGS = {"nodes": "--nodes", "gpus_per_node": "--gpus-per-node", "time": "--time",
         "partition": "--partition", "account": "--account"}
# sbatch parameter (submitit's SlurmExecutor spelling) -> the executor-independent name that
# submitit's AutoExecutor also gives the local executor
GENERIC = {"job_name": "name", "time": "timeout_min", "nodes": "nodes",
           "ntasks_per_node": "tasks_per_node", "gpus_per_node": "gpus_per_node"}
# sacct states of a job that is still to run, running, or coming back
QUEUED = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
          "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


def require_submitit():
    """The ``submitit`` module; StudyError saying how to install it where it is missing."""
    try:
        import submitit
    except ImportError:
        raise StudyError(f"--slurm needs submitit: {INSTALL}") from None
    return submitit


def resources(grid_spec: dict, args) -> dict:
    """``DEFAULTS`` <- the grid's checked ``slurm:`` mapping <- the flags given in ``args``."""
    res = {**DEFAULTS, **grid_spec, "args": dict(grid_spec.get("args", {}))}
    for key, flag in FLAGS.items():
        value = getattr(args, key)
        if value is None:
            continue
        kind, least, most = SLURM_KEYS[key]
        if (least is not None and not least <= value <= most) or (
                kind is str and not value.strip()):
            raise StudyError(f"{flag} must be " + (f"from {least} to {most}" if least is not None
                                                   else "a non-empty string") + f", got {value!r}")
        if kind is str:
            check_text(value, flag)
        res[key] = value
    for item in args.slurm_arg or []:
        what = f"--slurm-arg {item!r}"
        key, eq, value = check_text(item, what).partition("=")
        if not key.strip() or (eq and not value.strip()):
            raise StudyError(f"{what}: expected KEY=VALUE (or KEY alone for an sbatch option "
                             "without a value)")
        res["args"][sbatch_option(key, what)] = value.strip() if eq else True
    return res


def sbatch_parameters(res: dict, name: str, parallel: int | None = None) -> dict:
    """The parameters of submitit's SlurmExecutor for ``res``: one task per GPU (one task on a
    CPU-only job), at most ``parallel`` array tasks at once (None: submitit's default)."""
    gpus = res["gpus_per_node"]
    params = dict(job_name=name, time=res["time"], nodes=res["nodes"],
                  ntasks_per_node=max(1, gpus), gpus_per_node=gpus or None,
                  partition=res.get("partition"), account=res.get("account"),
                  additional_parameters=dict(res["args"]) or None, array_parallelism=parallel)
    return {k: v for k, v in params.items() if v is not None}


def executor_parameters(params: dict) -> dict:
    """``params`` for ``submitit.AutoExecutor.update_parameters``: generic names where submitit
    has them (so the local executor gets its share), ``slurm_`` + name for the rest."""
    return {GENERIC.get(k, f"slurm_{k}"): v for k, v in params.items()}


def sbatch_script(params: dict, folder: str | Path, count: int) -> str:
    """The sbatch script submitit writes for an array of ``count`` tasks with ``params``, its
    logs and pickles in ``folder`` (absolute, ``%j`` for the job id)."""
    require_submitit()
    # submitit renders the script in SlurmExecutor only, which refuses to start without srun
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=count if count > 1 else None, **params)


class StudyTask:
    """One study job as a submitit task: ``task(job, digest)`` runs it as ``jobs.execute`` does,
    with ``runner`` (default ``pretrain_and_evaluate``); a job finished meanwhile (submitted
    twice) is not run again. In a job of several processes the other ranks only pretrain, in
    the process group of rank 0's runner, which then evaluates alone.

    ``checkpoint`` is submitit's protocol: on preemption or timeout it returns the same call,
    which submitit requeues; the rerun resumes from ``last.pth``."""

    def __init__(self, runner: Callable[[Job], dict] | None = None) -> None:
        self.runner = runner

    def __call__(self, job: Job, digest: str) -> dict | None:
        done = finished(job, digest)
        if done is not None:
            return done
        if dist_env().rank > 0:
            if not job.run.random_init:
                from pretrain.engine import train

                train(job.cfg(), resume=True)
            return None
        return execute(job, self.runner or pretrain_and_evaluate, digest)

    def checkpoint(self, job: Job, digest: str):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, job, digest)


def _key(job: Job, out: Path) -> str:
    return str(Path(job.output_dir).relative_to(out))


def _submitted(out: Path) -> dict[str, dict]:
    """job folder (relative to ``out``) -> {"id": Slurm job id, "cluster": executor}."""
    path = out / "slurm" / SUBMITTED
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: unreadable ({e}); remove it to resubmit every unfinished "
                         "job") from None


def _in_queue(ids: set[str]) -> set[str]:
    """The Slurm job ids of ``ids`` that are queued, running or requeued (one ``sacct`` call);
    an id sacct does not know (purged, or no sacct) counts as not in the queue."""
    if not ids:
        return set()
    from submitit import SlurmJob

    watcher = SlurmJob.watcher
    for job_id in ids:
        watcher.register_job(job_id)
    watcher.update()
    return {i for i in ids
            if (watcher.get_state(i, mode="cache").split() or ["UNKNOWN"])[0].upper() in QUEUED}


def _failed(job: Job, digest: str) -> dict | None:
    """The record of a job whose last try failed (its ``error.txt``), None if there is none."""
    error = Path(job.output_dir) / "error.txt"
    if not error.is_file():
        return None
    lines = [line for line in error.read_text(errors="replace").splitlines() if line.strip()]
    return dict(run=job.run.name, seed=job.seed, digest=digest, status="failed",
                error=lines[-1].strip() if lines else "failed")


def survey(jobs: Sequence[Job], digests: dict, out: Path) -> dict[str, list]:
    """The jobs by state: ``ok`` and ``failed`` (records), ``queued`` ((job, Slurm id)),
    ``missing`` (never submitted, or gone from the queue unfinished: jobs)."""
    submitted = _submitted(out)
    state: dict[str, list] = {"ok": [], "failed": [], "queued": [], "missing": []}
    unfinished = []
    for job in jobs:
        rec = finished(job, digests[job.output_dir])
        if rec is not None:
            state["ok"].append(rec)
        else:
            unfinished.append((job, submitted.get(_key(job, out), {})))
    queued = _in_queue({e["id"] for _, e in unfinished if e.get("cluster") == "slurm"})
    for job, entry in unfinished:
        if entry.get("cluster") == "slurm" and entry["id"] in queued:
            state["queued"].append((job, entry["id"]))
        elif (rec := _failed(job, digests[job.output_dir])) is not None:
            state["failed"].append(rec)
        else:
            state["missing"].append(job)
    return state


def make_executor(params: dict, out: Path):
    """submitit's executor (``CLUSTER``) with ``params``, its files in ``OUT/slurm/<job id>/``;
    StudyError where there is no Slurm (no ``srun``)."""
    submitit = require_submitit()
    try:
        executor = submitit.AutoExecutor(folder=out.absolute() / "slurm" / "%j", cluster=CLUSTER)
    except RuntimeError as e:  # SlurmExecutor without srun
        raise StudyError(f"--slurm: {e} (--dry-run shows what would be submitted)") from None
    executor.update_parameters(**executor_parameters(params))
    return executor


def submit(todo: Sequence[Job], digests: dict, executor, out: Path,
           runner: Callable[[Job], dict] | None = None) -> list:
    """Submit ``todo`` as one array with ``executor``, record the ids in
    ``OUT/slurm/submitted.json``; returns submitit's jobs, in the order of ``todo``."""
    jobs = executor.map_array(StudyTask(runner), list(todo), [digests[j.output_dir] for j in todo])
    record = _submitted(out)
    record.update({_key(j, out): {"id": s.job_id, "cluster": CLUSTER}
                   for j, s in zip(todo, jobs, strict=True)})
    atomic_write_text(out / "slurm" / SUBMITTED, json.dumps(record, indent=2) + "\n")
    return jobs


def _summary(grid: Grid, seeds: Sequence[int], n_jobs: int, state: dict, out: Path) -> str:
    todo = len(state["failed"]) + len(state["missing"])
    return (f"study {grid.path}: {len(grid.runs)} runs x {len(seeds)} seeds = {n_jobs} jobs; "
            f"{len(state['ok'])} finished, {len(state['queued'])} in the queue, "
            f"{len(state['failed'])} failed, {todo - len(state['failed'])} not run -> {out}")


def dry_run(grid: Grid, out: Path, seeds: Sequence[int], res: dict, name: str,
            parallel: int | None = None) -> str:
    """What ``--slurm`` would submit: the sbatch script of the array and the job list."""
    jobs = make_jobs(grid, out, seeds)
    digests = {j.output_dir: j.digest() for j in jobs}
    state = survey(jobs, digests, out)
    todo = _todo(jobs, state)
    lines = [_summary(grid, seeds, len(jobs), state, out)]
    if not todo:
        return "\n".join([*lines, "slurm: nothing to submit"])
    params = sbatch_parameters(res, name, parallel)
    folder = out.absolute() / "slurm" / "%j"
    lines += [f"slurm: {len(todo)} job(s) to submit, one array task each; the sbatch script:",
              sbatch_script(params, folder, len(todo)).rstrip(), "jobs (array task, job, folder):"]
    lines += [f"  {i:>4}  {j.label:<40} {j.output_dir}" for i, j in enumerate(todo)]
    return "\n".join(lines)


def _todo(jobs: Sequence[Job], state: dict) -> list[Job]:
    """The failed and missing jobs, in study order."""
    again = {(r["run"], r["seed"]) for r in state["failed"]}
    missing = {j.output_dir for j in state["missing"]}
    return [j for j in jobs if j.output_dir in missing or (j.run.name, j.seed) in again]


def launch(grid: Grid, out: Path, seeds: Sequence[int], res: dict, name: str, *,
           collect: bool = False, parallel: int | None = None, plots: bool = True,
           echo: Callable[[str], None] = print) -> tuple[list[dict], int] | None:
    """Submit what is missing or failed and return None; with ``collect``, or when every job
    has finished, write the reports and return (the records, the number of jobs without one)."""
    jobs = make_jobs(grid, out, seeds)
    digests = {j.output_dir: j.digest() for j in jobs}
    state = survey(jobs, digests, out)
    todo = _todo(jobs, state)
    echo(_summary(grid, seeds, len(jobs), state, out))
    executor = None if collect or not todo else make_executor(
        sbatch_parameters(res, name, parallel), out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", grid.text)
    records = state["ok"] + state["failed"]
    if collect or (not todo and not state["queued"]):
        write_reports(grid, out, records, seeds, plots=plots)
        return records, len(jobs) - len(records)
    write_reports(grid, out, state["ok"], seeds, plots=False)
    if todo:
        submitted = submit(todo, digests, executor, out)
        echo(f"submitted {len(todo)} job(s); submitit's logs: {out / 'slurm'}/<job id>/")
        for job, sub in zip(todo, submitted, strict=True):
            echo(f"  {sub.job_id:<14} {job.label}")
    for job, job_id in state["queued"]:
        echo(f"  {job_id:<14} {job.label} (in the queue already)")
    echo("rerun the same command to collect the results once the jobs are done (add --collect "
         "to write them from what has finished so far)")
    return None

