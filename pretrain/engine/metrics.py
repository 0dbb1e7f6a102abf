"""What a run records, and where: the step window that keeps the logged values on the device
between log lines (``StepWindow``), ``metrics.jsonl`` and TensorBoard (``Metrics``), the loss
plot (``plot_curves``). The hooks (``hooks``) decide when; rank 0 writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..utils.io import atomic_open, atomic_write_text


class Metrics:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars, rank 0."""

    def __init__(self, output_dir: Path, start_iter: int, enabled: bool,
                 tensorboard: bool) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.file = self.tb = None
        if not enabled:
            return
        kept = []
        if start_iter > 0 and self.path.exists():  # drop what a killed run logged after its checkpoint
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["iter"] <= start_iter:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        atomic_write_text(self.path, "".join(kept))
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tb"), purge_step=start_iter or None)

    def write(self, record: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("iter", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["iter"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        self.file = self.tb = None


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    """Loss (and kNN top-1 when present) against iteration, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    loss = [(r["iter"], r["loss"]) for r in rows if "loss" in r]
    knn = [(r["iter"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    if not loss:
        return
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(10 if knn else 5.5, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*loss, strict=True), lw=1.2)
    ax.set(xlabel="iteration", ylabel="loss", title="pretraining loss")
    ax.grid(alpha=0.3)
    if knn:
        ax = axes[0][1]
        ax.plot(*zip(*knn, strict=True), "o-")
        ax.set(xlabel="iteration", ylabel="top-1 (%)", title="weighted kNN")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


class StepWindow:
    """What the steps between two log lines leave, kept where it was computed: the losses and the
    other 0-dim outputs stay on the device (no step waits for the device), host seconds are
    summed. ``read`` brings the values over in one copy, at a log line or a checkpoint."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.iters: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.sums: dict[str, torch.Tensor | float] = {}
        self.data_time = self.time = 0.0

    def add(self, it: int, outputs: dict, data_time: float, step_time: float) -> None:
        """Iteration ``it`` (1-based) and its outputs: ``loss`` kept per step, the others summed."""
        self.iters.append(it)
        self.losses.append(outputs["loss"].detach())
        self.data_time += data_time
        self.time += step_time
        for k, v in outputs.items():
            if k != "loss" and (not torch.is_tensor(v) or v.numel() == 1):
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                self.sums[k] = self.sums.get(k, 0.0) + v

    def read(self) -> tuple[list[float], dict[str, float]]:
        """(losses, sums) as Python floats. The wait for the device is added to ``time``: with
        asynchronous kernels it is the work of the steps in this window."""
        start = time.perf_counter()
        keys = list(self.sums)
        values = self.losses + [torch.as_tensor(self.sums[k]) for k in keys]
        if values:
            host = torch.stack([v.float().reshape(()).to(values[0].device) for v in values]).tolist()
        else:
            host = []
        self.time += time.perf_counter() - start
        n = len(self.losses)
        return host[:n], dict(zip(keys, host[n:], strict=True))

    def first_non_finite(self, losses: list[float]) -> tuple[int, float] | None:
        """(iteration, value) of the first loss that is NaN or infinite, else None."""
        return next(((i, v) for i, v in zip(self.iters, losses, strict=True)
                     if not math.isfinite(v)), None)

    def summarize(self, losses: list[float], sums: dict[str, float], it: int, epoch: int,
                  optimizer, skipped: int) -> dict:
        """The metrics.jsonl record of the window (means over its steps); clears it."""
        n = len(losses)
        record = {"iter": it, "epoch": epoch,
                  "lr": next(g["lr"] for g in optimizer.param_groups if not g.get("fix_lr")),
                  "loss": round(sum(losses) / n, 8), "data_time": round(self.data_time / n, 6),
                  "time": round(self.time / n, 6)}
        record.update({k: round(v / n, 8) for k, v in sums.items()})
        record["skipped_images"] = skipped
        self.clear()
        return record
