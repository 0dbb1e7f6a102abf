#!/usr/bin/env python
"""Time the kNN monitor (``pretrain.evaluation.evaluate_knn``) in one process and shared by two
gloo processes, on the same bank, queries and trunk.

python tools/bench_knn_dist.py [--bank 4096] [--queries 1024] [--size 32] [--batch 256]
                               [--threads 2] [--arch resnet18] [--data DIR] [--repeat 1]

Bank: the first ``--bank`` training images of Fashion-MNIST (``DIR``/train-images-idx3-ubyte.gz,
default datasets/fashion-mnist), queries: the first ``--queries`` test images; random images
with random labels when those files are absent. Trunk: an untrained ``--arch`` (seed 0, ImageNet
stem), the evaluation view at ``--size`` px. Each setting runs in freshly spawned processes: one
process with ``--threads`` threads, then 2 gloo processes with ``--threads`` // 2 each. Printed:
rank 0's wall seconds of ``evaluate_knn`` (the best of ``--repeat``; the trunk, warmed up by one
forward, and the data are ready before the clock starts) and the top-1 of each setting, which
must be the same: the exit status is 1 when they differ. Not a test: run it on an idle machine.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _split(data: Path, name: str, n: int, size: int, seed: int):
    """The first ``n`` images of Fashion-MNIST's ``name`` split (random ones without the file)
    in the evaluation view."""
    from pretrain.data import ArrayImages, ImageDataset, load_source
    from pretrain.transforms import build_eval_transform

    path = data / f"{name}-images-idx3-ubyte.gz"
    if path.is_file():
        source = load_source(str(path), "idx", n)
    else:
        rng = np.random.default_rng(seed)
        source = ArrayImages(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                             rng.integers(0, 10, n), f"random{seed}")
    return ImageDataset(source, build_eval_transform(size))


def _worker(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    from pretrain.backbone import build_backbone
    from pretrain.evaluation import evaluate_knn

    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init{world}", rank=rank,
                                world_size=world)
    sets = [_split(Path(args.data), name, n, args.size, seed)
            for name, n, seed in (("train", args.bank, 1), ("t10k", args.queries, 2))]
    torch.manual_seed(0)
    trunk = build_backbone(args.arch, "imagenet").eval()
    with torch.no_grad():  # warm-up: the kernels' first-call set-up stays off the clock
        trunk(torch.zeros(2, 3, args.size, args.size))
    best, acc = float("inf"), None
    for _ in range(args.repeat):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        acc = evaluate_knn(trunk, *sets, torch.device("cpu"), batch_size=args.batch)
        best = min(best, time.perf_counter() - t0)
    if rank == 0:
        Path(tmp, f"world{world}.json").write_text(json.dumps(dict(seconds=best, top1=acc)))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", type=int, default=4096)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="in all, split among the processes")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--data", default=str(ROOT / "datasets" / "fashion-mnist"))
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    found = Path(args.data, "train-images-idx3-ubyte.gz").is_file()
    print(f"bank {args.bank}, queries {args.queries} ({'Fashion-MNIST' if found else 'random'}), "
          f"{args.arch} at {args.size} px, batch {args.batch}, {args.threads} threads in all")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            os.environ["OMP_NUM_THREADS"] = str(max(1, args.threads // world))
            mp.start_processes(_worker, args=(world, args, tmp), nprocs=world,
                               start_method="spawn")
            results[world] = json.loads(Path(tmp, f"world{world}.json").read_text())
            print(f"{world} process(es): {results[world]['seconds']:.2f} s, "
                  f"kNN top-1 {results[world]['top1']:.2f}%")
    same = results[1]["top1"] == results[2]["top1"]
    print("same top-1" if same else "top-1 DIFFERS")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
