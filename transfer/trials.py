"""K-seed detection trials: per-metric mean and sample standard deviation, ``trials.json`` and
``trials.md``."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pretrain.utils.io import atomic_write_text
from pretrain.utils.stats import mean_std


def _plain(obj):
    """Evaluator output (OrderedDicts, numpy scalars) as JSON-ready values (NaN/inf -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
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
    head = "| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    rule = "|---|---|" + "---|" * len(seeds)
    rows = []
    for m, s in summary.items():
        spread = "n/a" if s["std"] is None else f"{s['std']:.2f}"
        mean_sd = "n/a" if s["mean"] is None else f"{s['mean']:.2f} ± {spread}"
        vals = " | ".join("n/a" if v is None else f"{v:.2f}" for v in s["values"])
        rows.append(f"| {m} | {mean_sd} | {vals} |")
    return (
        f"{len(seeds)} trials (seeds {', '.join(map(str, seeds))}); "
        "std = sample standard deviation (n - 1)\n\n" + "\n".join([head, rule, *rows]) + "\n"
    )


def write_trials(output_dir: str | os.PathLike, trials: Sequence[Mapping]) -> dict:
    """Write ``trials.json`` and ``trials.md`` in ``output_dir``; returns the summary."""
    summary = summarize_trials([flatten_metrics(t["results"]) for t in trials])
    seeds = [t["seed"] for t in trials]
    doc = {"summary": summary, "trials": list(trials), "std": "sample (ddof=1)"}
    atomic_write_text(Path(output_dir, "trials.json"), json.dumps(_plain(doc), indent=2))
    atomic_write_text(Path(output_dir, "trials.md"), format_trials_markdown(summary, seeds))
    logging.getLogger("transfer.detect").info("trials:\n" + format_trials_markdown(summary, seeds))
    return summary
