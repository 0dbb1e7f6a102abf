"""``feataug study --grid F.yaml [--seeds N] [--out DIR] [--jobs J] [--dry-run]``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from feataug import CONFIGS_ENV, configs_dir, find_config
from pretrain.errors import FeatAugError

from .disk import estimate, format_disk
from .grid import Grid, StudyError, _fmt, load_grid
from .jobs import run_study


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
        if args.seeds is not None and args.seeds < 1:
            raise StudyError(f"--seeds must be >= 1, got {args.seeds}")
        if args.jobs is not None and args.jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {args.jobs}")
        grid_file = find_config(args.grid)
        if not grid_file.exists() and not grid_file.is_absolute():
            raise StudyError(f"{args.grid}: no such grid file, here or in FeatAug's configs "
                             f"({configs_dir()})")
        grid = load_grid(grid_file)
        seeds = list(range(args.seeds or grid.seeds))
        out = Path(args.out or Path("output") / "study" / Path(args.grid).stem)
        jobs = args.jobs or grid.jobs
        print(format_plan(grid, seeds))
        if args.dry_run:
            text, warning = format_disk(estimate(grid, out, seeds), out, jobs)
            print(text)
            if warning:
                print(warning, file=sys.stderr)
            return 0
        if grid.prepare:
            from feataug.data import PREPARERS, default_root

            for name in grid.prepare:
                try:
                    PREPARERS[name](default_root())
                except FeatAugError as e:
                    raise StudyError(f"{args.grid}: prepare {name}: {e}") from None
        _, warning = format_disk(estimate(grid, out, seeds, pending_only=True), out, jobs)
        if warning:  # a warning only: the estimate may be off, the disk may be freed meanwhile
            print(warning, file=sys.stderr)
        records = run_study(grid, out, seeds, jobs=jobs, plots=not args.no_plots)
    except StudyError:
        raise
    except FeatAugError as e:  # refused by the pretraining code while expanding the grid
        raise StudyError(f"{args.grid}: {e}") from None
    print()
    print((out / "results.md").read_text())
    plots = "" if args.no_plots or not (out / "plots").is_dir() else f", {out / 'plots'}/"
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}{plots} "
          f"in {(time.perf_counter() - t0) / 60:.1f} min")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        print(f"feataug study: error: {len(failed)} job(s) failed (see results.md and each "
              "job's error.txt); rerun to retry them", file=sys.stderr)
        return 1
    return 0
