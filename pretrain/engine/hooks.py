"""What watches a run: ``metrics.jsonl`` and TensorBoard, the step window that averages logged
values, the kNN monitor and the loss plot. Rank 0 writes; the other ranks only take part in the
collective calls."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..utils.dist import barrier, get_world_size, is_main_process, unwrap
from ..utils.io import atomic_open, atomic_write_text


class Metrics:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard scalars, rank 0."""

    def __init__(self, output_dir: Path, start_iter: int, enabled: bool, tensorboard: bool):
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


def accumulate(window: dict, outputs: dict, loss_value: float, data_time: float,
                step_time: float) -> None:
    window["n"] = window.get("n", 0) + 1
    window["loss"] = window.get("loss", 0.0) + loss_value
    window["data_time"] = window.get("data_time", 0.0) + data_time
    window["time"] = window.get("time", 0.0) + step_time
    for k, v in outputs.items():
        if k != "loss" and (not torch.is_tensor(v) or v.numel() == 1):
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            window[k] = window.get(k, 0.0) + v


def summarize(window: dict, it: int, epoch: int, optimizer, skipped: int) -> dict:
    n = window.pop("n")
    record = {"iter": it, "epoch": epoch,
              "lr": next(g["lr"] for g in optimizer.param_groups if not g.get("fix_lr"))}
    for k, v in window.items():
        record[k] = round(float(v) / n, 6 if k in ("time", "data_time") else 8)
    record["skipped_images"] = skipped
    window.clear()
    return record


def knn_hook(cfg, model, knn_sets, device, it: int, epoch: int, metrics: Metrics) -> float | None:
    """kNN top-1 of the trunk on rank 0 (the other ranks wait)."""
    from ..evaluation import evaluate_knn

    acc = None
    if is_main_process():
        acc = evaluate_knn(unwrap(model).backbone, *knn_sets, device, k=cfg.KNN.K, t=cfg.KNN.T,
                           batch_size=max(cfg.SOLVER.BATCH_SIZE // get_world_size(), 64),
                           num_workers=cfg.DATALOADER.NUM_WORKERS,
                           channels_last=cfg.SOLVER.CHANNELS_LAST)
        metrics.write({"iter": it, "epoch": epoch, "knn_top1": round(acc, 4)}, "knn")
        logging.getLogger("pretrain").info(f"iteration {it}: kNN top-1 {acc:.2f}%")
    barrier()
    return acc
