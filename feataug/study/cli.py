"""``feataug study --grid F.yaml [--seeds N] [--out DIR] [--jobs J] [--dry-run]
[--slurm [--collect] [--nodes N] [--gpus-per-node G] [--partition P] [--time MIN] [--account A]
[--slurm-arg KEY=VALUE ...]]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from feataug import CONFIGS_ENV, configs_dir, find_config
from pretrain.errors import FeatAugError

from . import slurm
from .disk import estimate, format_disk
from .grid import MAX_COUNT, Grid, StudyError, _fmt, load_grid
from .jobs import run_study
from .sbatch import check_text


def _add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster", "submit the jobs to Slurm instead of running them here (submitit: "
        f"{slurm.INSTALL})")
    group.add_argument("--slurm", action="store_true",
                       help="submit every unfinished job as one task of a Slurm job array and "
                       "return; a rerun skips finished and queued jobs, resubmits the missing "
                       "and failed ones, and writes the reports once all have finished (with "
                       "--jobs J: at most J tasks at once)")
    group.add_argument("--collect", action="store_true",
                       help="with --slurm: write the reports from the jobs finished so far; "
                       "submit nothing")
    group.add_argument("--nodes", type=int, metavar="N",
                       help=f"nodes per job (default: the grid's slurm.nodes, else "
                       f"{slurm.DEFAULTS['nodes']})")
    group.add_argument("--gpus-per-node", type=int, metavar="G",
                       help="GPUs per node, one task each; 0: a CPU job (default: the grid's "
                       f"slurm.gpus_per_node, else {slurm.DEFAULTS['gpus_per_node']})")
    group.add_argument("--partition", metavar="P", help="Slurm partition")
    group.add_argument("--time", type=int, metavar="MIN",
                       help="time limit per job in minutes (default: the grid's slurm.time, "
                       f"else {slurm.DEFAULTS['time']}); a job past it is requeued (3 times at "
                       "most) and resumes from its last.pth")
    group.add_argument("--account", metavar="A", help="Slurm account to charge")
    group.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE",
                       help="any other sbatch option (repeatable): --slurm-arg qos=high, "
                       "--slurm-arg mem=64G, --slurm-arg exclusive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", required=True, metavar="F.yaml",
                        help="study grid file; a relative path that does not exist here is "
                        "looked up in FeatAug's configs (those installed with the package, or "
                        f"${CONFIGS_ENV}), a leading configs/ dropped: configs/study/cpu.yaml "
                        "works from any folder")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds 0..N-1 for every run (default: the grid's `seeds`, else 3)")
    parser.add_argument("--out", default="", metavar="DIR",
                        help="output folder (default: output/study/<grid name>)")
    parser.add_argument("--jobs", type=int, default=None, metavar="J",
                        help="jobs run side by side in worker processes, each with "
                        "cores/J threads (default: the grid's `jobs`, else 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs, their baselines, the study axes and the "
                        "estimated disk use; run nothing")
    parser.add_argument("--no-plots", action="store_true", help="skip the bar charts")
    _add_slurm_arguments(parser)


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--seeds", args.seeds), ("--jobs", args.jobs)):
        if value is not None and not 1 <= value <= MAX_COUNT:
            raise StudyError(f"{flag} must be from 1 to {MAX_COUNT}, got {value}")
    cluster_only = [flag for flag, value in (
        ("--collect", args.collect), ("--nodes", args.nodes is not None),
        ("--gpus-per-node", args.gpus_per_node is not None),
        ("--partition", args.partition is not None), ("--time", args.time is not None),
        ("--account", args.account is not None), ("--slurm-arg", bool(args.slurm_arg))) if value]
    if cluster_only and not args.slurm:
        raise StudyError(f"{', '.join(cluster_only)}: only with --slurm")
    if args.collect and args.dry_run:
        raise StudyError("--collect and --dry-run: choose one")
    if args.slurm:
        slurm.require_submitit()


def format_plan(grid: Grid, seeds: Sequence[int]) -> str:
    lines = [f"{len(grid.runs)} runs x {len(seeds)} seeds ({list(seeds)}); "
             f"study axes: {', '.join(grid.axes) or '(none)'}"]
    shared = {kv for kv in grid.runs[0].overrides if all(kv in r.overrides for r in grid.runs)}
    if shared:
        lines.append("  all runs: " + " ".join(f"{k}={_fmt(v)}" for k, v in grid.runs[0].overrides
                                             if (k, v) in shared))
    for run in grid.runs:
        ref = ("reference" if run.random_init else "baseline" if run.baseline is None
               else f"vs {run.baseline}" + (f", {run.control}" if run.control else ""))
        over = " ".join(f"{k}={_fmt(v)}" for k, v in run.overrides if (k, v) not in shared)
        lines.append(f"  {run.name:<40} {ref:<28} {over}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        _check_flags(args)
        grid_file = find_config(args.grid)
        if not grid_file.exists() and not grid_file.is_absolute():
            raise StudyError(f"{args.grid}: no such grid file, here or in FeatAug's configs "
                             f"({configs_dir()})")
        grid = load_grid(grid_file)
        seeds = list(range(args.seeds or grid.seeds))
        out = Path(args.out or Path("output") / "study" / Path(args.grid).stem)
        jobs = args.jobs or grid.jobs
        print(format_plan(grid, seeds))
        res = slurm.resources(grid.slurm, args) if args.slurm else None
        if args.slurm:  # the job name and the log folder land in the sbatch script too
            check_text(_job_name(args.grid), f"--grid {args.grid!r}: the job name")
            check_text(str(out.absolute()), f"--out {str(out.absolute())!r}")
        if args.dry_run:
            text, warning = format_disk(estimate(grid, out, seeds), out, jobs)
            print(text)
            if warning:
                print(warning, file=sys.stderr)
            if args.slurm:
                print(slurm.dry_run(grid, out, seeds, res, _job_name(args.grid), args.jobs))
            return 0
        if not args.collect:
            _prepare(grid, args.grid)
            _, warning = format_disk(estimate(grid, out, seeds, pending_only=True), out, jobs)
            if warning:  # a warning only: the estimate may be off, the disk may be freed meanwhile
                print(warning, file=sys.stderr)
        if args.slurm:
            done = slurm.launch(grid, out, seeds, res, _job_name(args.grid), collect=args.collect,
                                parallel=args.jobs, plots=not args.no_plots)
            return 0 if done is None else _finish(out, args, t0, *done)
        records = run_study(grid, out, seeds, jobs=jobs, plots=not args.no_plots)
    except StudyError:
        raise
    except FeatAugError as e:  # refused by the pretraining code while expanding the grid
        raise StudyError(f"{args.grid}: {e}") from None
    return _finish(out, args, t0, records)


def _prepare(grid: Grid, name: str) -> None:
    """``feataug prepare-data`` the grid's ``prepare`` datasets (on the submitting host too)."""
    if grid.prepare:
        from feataug.data import PREPARERS, default_root

        for dataset in grid.prepare:
            try:
                PREPARERS[dataset](default_root())
            except FeatAugError as e:
                raise StudyError(f"{name}: prepare {dataset}: {e}") from None


def _job_name(grid: str) -> str:
    return f"feataug-study-{Path(grid).stem}"


def _finish(out: Path, args: argparse.Namespace, t0: float, records: list[dict],
            unfinished: int = 0) -> int:
    """Print results.md and the files written; exit status 1 when a job failed or, with
    ``--slurm --collect``, ``unfinished`` jobs have no record yet."""
    print()
    print((out / "results.md").read_text())
    plots = "" if args.no_plots or not (out / "plots").is_dir() else f", {out / 'plots'}/"
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}{plots} "
          f"in {(time.perf_counter() - t0) / 60:.1f} min")
    failed = [r for r in records if r["status"] != "ok"]
    if failed or unfinished:
        what = [f"{len(failed)} job(s) failed (see results.md and each job's error.txt)"] * \
            bool(failed) + [f"{unfinished} job(s) have not finished"] * bool(unfinished)
        again = ("; rerun without --collect to resubmit the failed and missing ones"
                 if args.collect else "; rerun to retry them")
        print(f"feataug study: error: {'; '.join(what)}{again}", file=sys.stderr)
        return 1
    return 0
