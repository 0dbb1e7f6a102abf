"""Study reports: ``results.csv``, ``results.md`` (mean ± std over seeds, paired Δ against
the matching baseline) and one bar chart per study axis."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from pretrain.utils.io import atomic_open, atomic_write_text
from pretrain.utils.stats import claim, format_pm, mean_std

from .grid import Grid, _safe

# metric key -> label, in report order
METRICS = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1", "det_ap": "detection AP",
           "det_ap50": "detection AP50"}
EXTRA_COLUMNS = ("iterations", "loss", "z_std", "pretrain_s", "eval_s", "cpu_s")
MAX_GROUPS = 12  # plots with more contexts than this show the mean over the other settings


def summarize(grid: Grid, records: Iterable[dict], metrics: Sequence[str]) -> list[dict]:
    """Per run: seeds, mean/std of each metric over seeds, and the paired differences against
    the matching baseline (``M_delta``, ``M_claim``), the matching loss-scale control
    (``M_vs_control``, ``M_claim_control``) and the untrained reference row (``M_vs_random``,
    ``M_claim_random``).

    Delta = mean over the seeds both runs finished of (run − reference), same seed; its std is
    the sample std of those paired differences; the claim is ``pretrain.utils.stats.claim``.
    """
    values: dict[str, dict[str, dict[int, float]]] = {}
    for rec in records:
        if rec.get("status") != "ok":
            continue
        for m in metrics:
            v = rec["metrics"].get(m)
            if v is not None:
                values.setdefault(rec["run"], {}).setdefault(m, {})[rec["seed"]] = float(v)
    random = next((r.name for r in grid.runs if r.random_init), None)
    rows = []
    for run in grid.runs:
        mine = values.get(run.name, {})
        row = dict(run=run.name, baseline=run.baseline, control=run.control,
                   random_init=run.random_init,
                   settings=dict(run.settings),
                   seeds=sorted({s for per in mine.values() for s in per}))
        for m in metrics:
            per = mine.get(m, {})
            row[m] = mean_std(list(per.values()))
            vs_random = None if run.random_init else random
            for ref, tag, name in ((run.baseline, "", "_delta"),
                                   (run.control, "_control", "_vs_control"),
                                   (vs_random, "_random", "_vs_random")):
                other = values.get(ref, {}).get(m, {}) if ref else {}
                diffs = [per[s] - other[s] for s in sorted(set(per) & set(other))]
                row[m + name] = mean_std(diffs)
                row[m + "_claim" + tag] = claim(diffs) if ref else ""
        rows.append(row)
    return rows


def _pm(ms: tuple[float, float], signed: bool = False) -> str:
    return format_pm(*ms, 2, signed)


def _verdict(row: dict, m: str, tag: str = "") -> str:
    c = row[m + "_claim" + tag]
    return f" **{c}**" if c in ("helps", "hurts") else (" (no effect shown)" if c else "")


def markdown_table(grid: Grid, rows: list[dict], metric: str) -> str:
    """One table for ``metric``: per run its study-axis values, seeds, mean ± std, and the
    paired Δ with the claim against the matching baseline, the loss-scale control (when the
    grid names one) and the untrained trunk (when the grid has that row)."""
    refs = [("baseline", "_delta", ""), ("scale control", "_vs_control", "_control"),
            ("random init", "_vs_random", "_random")]
    refs = [r for r in refs if any(not math.isnan(row[metric + r[1]][0]) for row in rows)
            or (r[0] == "baseline")]
    head = ["run", *grid.axes, "seeds", METRICS.get(metric, metric),
            *(f"Δ vs {label}" for label, _, _ in refs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["run"], *(row["settings"].get(a, "") for a in grid.axes),
                 str(len(row["seeds"])), _pm(row[metric])]
        for label, key, tag in refs:
            if label == "baseline" and row["random_init"]:
                cells.append("untrained")
            elif label == "baseline" and row["baseline"] is None:
                cells.append("baseline")
            else:
                d = row[metric + key]
                cells.append("" if math.isnan(d[0]) else _pm(d, signed=True)
                             + _verdict(row, metric, tag))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collapse_table(grid: Grid, records: Sequence[dict]) -> str:
    """Per pretrained run: the collapse monitor ``z_std`` at the last logged step (mean ± std
    over seeds), or "" where no job logged it."""
    lines = ["| run | seeds | z_std |", "|---|---:|---:|"]
    for run in grid.runs:
        vals = [r["metrics"]["z_std"] for r in records if r["run"] == run.name
                and r.get("status") == "ok" and r["metrics"].get("z_std") is not None]
        if vals:
            lines.append(f"| {run.name} | {len(vals)} | {format_pm(*mean_std(vals), 4)} |")
    return "\n".join(lines) + "\n"


def _metrics_present(records: Iterable[dict]) -> list[str]:
    seen = {k for r in records if r.get("status") == "ok" for k in r["metrics"]}
    return [m for m in METRICS if m in seen]


def write_reports(grid: Grid, out: Path, records: Iterable[dict], seeds: Sequence[int],
                  plots: bool = True, wall_s: float | None = None) -> None:
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
            + f"; compute time {total_s / 60:.1f} min (sum over jobs)"
            + (f", wall time of this invocation {wall_s / 60:.1f} min" if wall_s else "")
            + ".", "",
            "Top-1 (%) is mean ± sample std over seeds. Δ is the mean over seeds of (run − its "
            "matching FA-off baseline, or its loss-scale control; same seed) ± the std of those "
            "paired differences. A run **helps** / **hurts** only when every paired Δ has the "
            "same sign and |mean Δ| > 2 sd over ≥ 3 seeds; otherwise no effect is shown.", ""]
    for m in metrics:
        text += [f"## {METRICS.get(m, m)} (%)", "", markdown_table(grid, rows, m)]
    if any(r.get("metrics", {}).get("z_std") is not None for r in records):
        text += ["## Collapse monitor", "",
                 "`z_std`: per-dimension std of the ℓ2-normalised projector output at the last "
                 "logged step (MoCo: the query), ≈ 1/√d for d-dimensional features that are "
                 "spread out, → 0 when the output collapses to one direction.", "",
                 collapse_table(grid, records)]
    if not metrics:
        text.append("(no finished jobs yet)\n")
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
