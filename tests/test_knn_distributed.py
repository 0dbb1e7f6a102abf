"""The kNN evaluation shared by the ranks of a process group (``evaluation.extract_sharded``,
``knn_predict(split=True)``, ``KnnMonitor``, ``evaluate_backbone``): two gloo processes on the CPU
give the one-process features and top-1, and each extracts only its share.

One spawn of two ranks runs every scenario (``_scenarios``) and saves what it saw; this process
runs the same scenarios without a process group for the reference. Every process runs one thread,
so the same batch goes through the same kernels everywhere: the shared extraction hands each rank
whole batches of the one-process loader, hence the features must agree exactly (tolerance 0).
"""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks
from torch import nn

from pretrain.data import ArrayImages, ImageDataset
from pretrain.evaluation import (
    evaluate_backbone,
    evaluate_knn,
    extract_features,
    extract_sharded,
    knn_predict,
    knn_scores,
)
from pretrain.transforms import build_eval_transform

WORLD = 2
SIZE = 8  # image side
CLASSES = 3
BATCH = 4  # function-level scenarios: 21 bank and 13 query images, odd counts on purpose
N_BANK, N_VAL = 21, 13
HOOK_BANK, HOOK_VAL = 150, 70  # the monitor's batch is at least 64: both ranks get some


class Counting(ImageDataset):
    """An ``ImageDataset`` that records every index it is asked for."""

    def __init__(self, source, transform) -> None:
        super().__init__(source, transform)
        self.seen: list[int] = []

    def __getitem__(self, key):
        self.seen.append(key)
        return super().__getitem__(key)


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB uint8 [SIZE, SIZE] images, class c tinted in channel c, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 140, (n, SIZE, SIZE, 3), dtype=np.uint8)
    images[np.arange(n), :, :, labels] += 100
    return images, labels


def _dataset(n: int, seed: int) -> Counting:
    return Counting(ArrayImages(*_images(n, seed), f"test{seed}"), build_eval_transform(SIZE))


def _trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())  # [B, 16]


def _write_folder(root, n: int, seed: int) -> str:
    for k, (img, y) in enumerate(zip(*_images(n, seed), strict=True)):
        (root / f"c{y}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / f"c{y}" / f"{k:03d}.png"), img)
    return str(root)


def _scenarios(folder: str) -> dict:
    """Everything one process sees, with or without a process group."""
    cpu, trunk, out = torch.device("cpu"), _trunk(), {}
    bank, val = _dataset(N_BANK, 1), _dataset(N_VAL, 2)
    ftr, ytr = extract_sharded(trunk, bank, cpu, BATCH)
    fva, yva = extract_sharded(trunk, val, cpu, BATCH)
    out["features"] = dict(bank=(ftr, ytr), val=(fva, yva), bank_seen=list(bank.seen),
                           val_seen=list(val.seen))
    out["pred"] = knn_predict(fva, ftr, ytr, CLASSES, k=5, chunk=3, split=True)  # 5 chunks
    bank.seen.clear(), val.seen.clear()
    out["knn"] = dict(top1=evaluate_knn(trunk, bank, val, cpu, k=5, batch_size=BATCH),
                      bank_seen=list(bank.seen), val_seen=list(val.seen))
    few = _dataset(3, 3)  # fewer images than one batch: rank 1's share is empty
    out["few"] = extract_sharded(trunk, few, cpu, BATCH)
    out["hook"] = _through_the_hook(trunk)
    rows = []
    handle = trunk.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    spec = dict(train=f"{folder}/train", val=f"{folder}/val", format="folder", max_train=0,
                max_val=0, train_per_class=0, val_per_class=0, knn_k=5, knn_t=0.1, linear=True,
                linear_weight_decay=1e-3, batch_size=BATCH, num_workers=0, image_size=SIZE)
    out["backbone"] = dict(result=evaluate_backbone(trunk, spec, SIZE), rows=sum(rows))
    handle.remove()
    return out


def _through_the_hook(trunk: nn.Module) -> dict:
    """``KnnMonitor.evaluate`` on a stand-in trainer; what each dataset served, what was written."""
    from pretrain.config import get_cfg
    from pretrain.engine.hooks import KnnMonitor

    cfg = get_cfg()
    cfg.KNN.K, cfg.KNN.T, cfg.SOLVER.BATCH_SIZE, cfg.DATALOADER.NUM_WORKERS = 5, 0.1, 64, 0
    sets = (_dataset(HOOK_BANK, 4), _dataset(HOOK_VAL, 5))
    written = []
    writer = SimpleNamespace(write=lambda record, kind: written.append((kind, record)))
    monitor = KnnMonitor(sets, writer, period=1, at_start=True)
    monitor.trainer = SimpleNamespace(cfg=cfg, model=SimpleNamespace(backbone=trunk),
                                      device=torch.device("cpu"))
    acc = monitor.evaluate(0, 0)
    return dict(top1=acc, bank_seen=len(sets[0].seen), val_seen=len(sets[1].seen),
                written=written)


def _rank(rank: int, init_file: str, out: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=WORLD)
    try:
        from pretrain.utils.dist import all_gather_rows

        res = _scenarios(folder)
        # rank 0: 7 rows in pieces of 3, rank 1: none (and a trailing shape of its own)
        mine = torch.arange(14.0).reshape(7, 2) if rank == 0 else torch.empty(0, 5)
        res["rows"] = all_gather_rows(mine, chunk=3)
        torch.save(res, f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank leaves while the other's gloo pair is still open
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """(the one-process reference, [rank 0's results, rank 1's])."""
    tmp = tmp_path_factory.mktemp("knn_dist")
    _write_folder(tmp / "data" / "train", N_BANK, 6), _write_folder(tmp / "data" / "val", N_VAL, 7)
    spawn_ranks(_rank, (str(tmp / "init"), str(tmp), str(tmp / "data")), WORLD)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return _scenarios(str(tmp / "data")), ranks


def _shares_ok(seen: list[list[int]], n: int, batch: int) -> None:
    """Disjoint shares covering range(n), each within one batch of n / WORLD."""
    assert sorted(i for s in seen for i in s) == list(range(n))
    assert all(abs(len(s) - n / WORLD) <= batch for s in seen), [len(s) for s in seen]


def test_one_process_extracts_and_scores_as_before(one_thread):
    """Without a process group: ``extract_sharded`` is ``extract_features`` over the in-order
    loader, and ``knn_predict(split=True)`` the argmax of ``knn_scores``."""
    from pretrain.evaluation import eval_loader

    trunk, cpu, bank = _trunk(), torch.device("cpu"), _dataset(N_BANK, 1)
    f, y = extract_sharded(trunk, bank, cpu, BATCH)
    f0, y0 = extract_features(trunk, eval_loader(bank, BATCH, 0), cpu)
    assert torch.equal(f, f0) and torch.equal(y, y0)
    assert bank.seen == list(range(N_BANK)) * 2
    pred = knn_predict(f[:7], f, y, CLASSES, k=5, chunk=3, split=True)
    assert torch.equal(pred, knn_scores(f[:7], f, y, CLASSES, k=5).argmax(1))


def test_two_ranks_gather_the_one_process_features_in_order(runs):
    ref, ranks = runs
    for res in ranks:
        for split in ("bank", "val"):
            (f, y), (f0, y0) = res["features"][split], ref["features"][split]
            assert f.shape == f0.shape and torch.equal(f, f0), split  # same batches: exact
            assert torch.equal(y, y0), split
        assert torch.equal(res["pred"], ref["pred"])  # each rank scored 2 or 3 of the 5 chunks
        assert res["knn"]["top1"] == ref["knn"]["top1"]
    assert 100 / CLASSES < ref["knn"]["top1"]  # the tinted classes are told apart


def test_each_rank_extracts_only_its_share(runs):
    ref, ranks = runs
    assert ref["features"]["bank_seen"] == list(range(N_BANK))
    for what, n in (("bank_seen", N_BANK), ("val_seen", N_VAL)):
        for key in ("features", "knn"):
            _shares_ok([r[key][what] for r in ranks], n, BATCH)
    # whole batches: rank 0 the batches 0, 2, 4 of the bank (12 images), rank 1 1, 3, 5 (9)
    assert ranks[0]["features"]["bank_seen"] == [*range(4), *range(8, 12), *range(16, 20)]
    assert len(ranks[1]["features"]["bank_seen"]) == 9


def test_unequal_and_empty_shares_are_gathered_without_padding(runs):
    ref, ranks = runs
    want = torch.arange(14.0).reshape(7, 2)
    for res in ranks:
        assert torch.equal(res["rows"], want)
        f, y = res["few"]  # 3 images, one batch: rank 1 had none
        assert torch.equal(f, ref["few"][0]) and torch.equal(y, ref["few"][1])


def test_knn_monitor_keeps_every_rank_busy(runs):
    ref, ranks = runs
    for key, n in (("bank_seen", HOOK_BANK), ("val_seen", HOOK_VAL)):
        assert all(r["hook"][key] > 0 for r in ranks) and sum(r["hook"][key] for r in ranks) == n
    assert [r["hook"]["top1"] for r in ranks] == [ref["hook"]["top1"]] * WORLD
    assert len(ref["hook"]["written"]) == 1
    assert ranks[0]["hook"]["written"] == ref["hook"]["written"]
    assert ranks[1]["hook"]["written"] == []  # rank 0 writes


def test_evaluate_backbone_shares_the_extraction(runs):
    ref, ranks = runs
    assert ref["backbone"]["rows"] == N_BANK + N_VAL
    assert all(r["backbone"]["rows"] > 0 for r in ranks)
    assert sum(r["backbone"]["rows"] for r in ranks) == N_BANK + N_VAL
    assert all(r["backbone"]["result"] == ref["backbone"]["result"] for r in ranks)
