"""K-seed detection trials: per-metric mean and sample standard deviation, ``trials.json``,
``trials.md`` and ``trials.png``."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pretrain.utils.io import atomic_open, atomic_write_text
from pretrain.utils.stats import mean_std


def plain(obj):
    """Evaluator output (OrderedDicts, numpy scalars) as JSON-ready values (NaN/inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (float, np.floating, np.integer)) and not isinstance(obj, bool):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def flatten_metrics(results: Mapping, prefix: str = "") -> dict[str, float]:
    """``{"bbox": {"AP": 1.0}}`` -> ``{"bbox/AP": 1.0}`` (any depth; None kept as NaN)."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "/"))
        elif value is None or isinstance(value, (int, float, np.number)):
            flat[name] = float("nan") if value is None else float(value)
    return flat


def summarize_trials(per_trial: Sequence[Mapping[str, float]]) -> dict[str, dict]:
    """Per metric: ``mean``, ``std`` (sample standard deviation, n − 1 denominator; None for a
    single trial, where it is undefined), ``n`` and ``values``, over the trials that report a
    finite value. Metric order: first appearance."""
    names: list[str] = []
    for metrics in per_trial:
        names += [m for m in metrics if m not in names]
    out = {}
    for m in names:
        values = [float(t[m]) if m in t and math.isfinite(float(t[m])) else None
                  for t in per_trial]
        mean, std = mean_std([v for v in values if v is not None])
        out[m] = {"mean": None if math.isnan(mean) else mean,
                  "std": None if math.isnan(std) else std,
                  "n": sum(v is not None for v in values), "values": values}
    return out


def format_trials_markdown(summary: Mapping[str, Mapping], seeds: Sequence[int]) -> str:
    """A pipe table (``tabulate``): per metric the mean ± sample sd and each seed's value, n/a
    where undefined (a metric a trial did not report, the sd of a single trial)."""
    from tabulate import tabulate

    def num(v):
        return "n/a" if v is None else f"{v:.2f}"

    rows = [[m, "n/a" if s["mean"] is None else f"{s['mean']:.2f} ± {num(s['std'])}",
             *map(num, s["values"])] for m, s in summary.items()]  # fmt: skip
    headers = ["metric", "mean ± std", *(f"seed {s}" for s in seeds)]
    table = tabulate(rows, headers, "pipe", disable_numparse=True,
                     colalign=("left", *("right",) * (len(headers) - 1)))  # fmt: skip
    return (
        f"{len(seeds)} trials (seeds {', '.join(map(str, seeds))}); "
        "std = sample standard deviation (n - 1)\n\n" + table + "\n"
    )


PLOTTED = ("AP", "AP50", "AP75")  # the headline metrics of each task (bbox, segm)


def plot_trials(path: str | os.PathLike, summary: Mapping[str, Mapping], seeds: Sequence[int]):
    """``trials.png``: each trial's AP, AP50, AP75 (one marker per seed) and their mean ± sample
    sd (black bar; the mean alone for a single trial). Written atomically; returns the metrics
    drawn (none: no file)."""
    names = [m for m in summary if m.rsplit("/", 1)[-1] in PLOTTED and summary[m]["n"]]
    if not names:
        return []
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.6 * len(names) + 1.6), 3.2), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    axes = fig.subplots(1, len(names), squeeze=False)[0]  # one panel (own scale) per metric
    spread = np.linspace(-0.2, 0.2, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    for ax, m in zip(axes, names, strict=True):
        s = summary[m]
        for k, seed in enumerate(seeds):
            if s["values"][k] is not None:
                ax.scatter(spread[k], s["values"][k], s=22, color=f"C{k % 10}", zorder=2,
                           label=f"seed {seed}")  # fmt: skip
        ax.errorbar(0.0, s["mean"], yerr=0.0 if s["std"] is None else s["std"], fmt="_",
                    color="black", markersize=20, capsize=6, elinewidth=1.5, zorder=3,
                    label="mean ± sd")  # fmt: skip
        sd = "n/a" if s["std"] is None else f"{s['std']:.2f}"
        ax.set_title(f"{m}\n{s['mean']:.2f} ± {sd}", fontsize=8)
        ax.set_xlim(-0.5, 0.5)
        ax.set_xticks([])
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("value (%)")
    fig.suptitle(f"{len(seeds)} trials; sd = sample standard deviation (n - 1)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right upper")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return names


def write_trials(output_dir: str | os.PathLike, trials: Sequence[Mapping],
                 provenance: Mapping | None = None) -> dict:
    """Write ``trials.json`` (with ``provenance``, the record of what produced the run),
    ``trials.md`` and ``trials.png`` in ``output_dir``; returns the summary."""
    summary = summarize_trials([flatten_metrics(t["results"]) for t in trials])
    seeds = [t["seed"] for t in trials]
    doc = {"summary": summary, "trials": list(trials), "std": "sample (ddof=1)",
           "provenance": provenance}  # fmt: skip
    atomic_write_text(Path(output_dir, "trials.json"), json.dumps(plain(doc), indent=2))
    atomic_write_text(Path(output_dir, "trials.md"), format_trials_markdown(summary, seeds))
    plot_trials(Path(output_dir, "trials.png"), summary, seeds)
    logging.getLogger("transfer.detect").info("trials:\n" + format_trials_markdown(summary, seeds))
    return summary
