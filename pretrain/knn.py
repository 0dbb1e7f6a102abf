"""Weighted kNN classification of frozen features (the InstDisc / MoCo monitor).

A query q votes with its k most similar training features f_i (cosine similarity s_i):
class score  S_c = sum_{i in top-k} exp(s_i / tau) * [y_i = c],  prediction argmax_c S_c.
Defaults k = 200, tau = 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pretrain.data import ImageDataset, collate
from pretrain.transforms import normalize


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader: DataLoader, device: torch.device,
                     channels_last: bool = False, progress: bool = False, l2: bool = True,
                     dtype: torch.dtype | None = None):
    """Pooled features [N, C] (float32, on the CPU; L2-normalized when ``l2``) and labels [N].

    The backbone runs in eval mode (under autocast to ``dtype`` if given) and is put back in
    its previous mode afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="features", leave=False, dynamic_ncols=True)
    for images, y, _ in batches:
        x = normalize(images.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            f = backbone(x).float()
        feats.append((F.normalize(f, dim=1) if l2 else f).cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N, num_classes] of normalized queries [N, D] against a bank [M, D]."""
    k = min(k, bank.shape[0])
    out = []
    for q in query.split(chunk):
        sim = torch.einsum("nd,md->nm", q, bank)  # [n, M] cosine similarities
        s, idx = sim.topk(k, dim=1)  # [n, k]
        w = (s / t).exp()  # [n, k] vote weights exp(s_i / tau)
        onehot = F.one_hot(bank_labels[idx], num_classes).to(w.dtype)  # [n, k, C]
        out.append(torch.einsum("nk,nkc->nc", w, onehot))  # [n, C]
    return torch.cat(out)


def knn_top1(train_feats, train_labels, val_feats, val_labels, num_classes: int,
             k: int = 200, t: float = 0.1) -> float:
    """Top-1 accuracy (%) of weighted kNN."""
    pred = knn_scores(val_feats, train_feats, train_labels, num_classes, k, t).argmax(1)
    return 100.0 * (pred == val_labels).float().mean().item()


def eval_loader(dataset: ImageDataset, batch_size: int, num_workers: int,
                pin_memory: bool = False) -> DataLoader:
    """In-order loader over a labelled evaluation split."""
    from pretrain.data import worker_init

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, worker_init_fn=worker_init,
                      generator=torch.Generator())


def labelled(dataset: ImageDataset, what: str) -> int:
    """Number of classes of a labelled split; raises ``DataError`` for an unlabelled one."""
    from pretrain.data import DataError

    if not dataset.classes or min(dataset.labels) < 0:
        raise DataError(f"{what}: needs class labels (class sub-folders, list labels or an "
                        "IDX labels file)")
    return len(dataset.classes)


def evaluate_knn(backbone: torch.nn.Module, train_set: ImageDataset, val_set: ImageDataset,
                 device: torch.device, k: int = 200, t: float = 0.1, batch_size: int = 256,
                 num_workers: int = 0, channels_last: bool = False,
                 progress: bool = False) -> float:
    """Weighted-kNN top-1 (%) of ``backbone`` features: bank = train split, queries = val split."""
    num_classes = max(labelled(train_set, "kNN train split"), labelled(val_set, "kNN val split"))
    pin = device.type == "cuda"
    ftr, ytr = extract_features(backbone, eval_loader(train_set, batch_size, num_workers, pin),
                                device, channels_last, progress)
    fva, yva = extract_features(backbone, eval_loader(val_set, batch_size, num_workers, pin),
                                device, channels_last, progress)
    return knn_top1(ftr, ytr, fva, yva, num_classes, k, t)


def build_knn_sets(cfg) -> tuple[ImageDataset, ImageDataset] | None:
    """Evaluation-transform datasets of ``DATA.KNN_TRAIN_ROOT`` / ``KNN_VAL_ROOT``, or None."""
    from pretrain.data import build_eval_dataset
    from pretrain.transforms import build_eval_transform

    if not (cfg.DATA.KNN_TRAIN_ROOT and cfg.DATA.KNN_VAL_ROOT):
        return None
    tf = build_eval_transform(cfg.DATA.IMAGE_SIZE)
    return (build_eval_dataset(cfg, cfg.DATA.KNN_TRAIN_ROOT, tf),
            build_eval_dataset(cfg, cfg.DATA.KNN_VAL_ROOT, tf))
