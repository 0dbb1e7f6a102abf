"""Evaluation of a frozen trunk on labelled splits: features, weighted kNN, a linear probe.

Weighted kNN (the InstDisc / MoCo monitor): a query q votes with its k most similar training features f_i (cosine similarity s_i):
class score  S_c = sum_{i in top-k} exp(s_i / tau) * [y_i = c],  prediction argmax_c S_c.
Defaults k = 200, tau = 0.1.

With a process group (``torchrun``), ``evaluate_knn`` and ``evaluate_backbone`` are collective:
every rank extracts the features of its share of the loader batches (``extract_sharded``), the
shares are all-gathered back into dataset order, and every rank scores its share of the query
chunks against the whole bank (``knn_predict`` with ``split``); the predictions are all-gathered,
so every rank returns the same top-1, the one a single process gets (same trunk, same batch
size). Every rank then holds the whole bank [M, C] in host memory.

Linear probe (``linear_probe``): multinomial logistic regression on standardised features, fitted
to convergence with L-BFGS (a convex problem, no random start). ``feataug lincls`` trains a
published protocol's linear classifier instead (MoCo's SGD or SimSiam's LARS;
``pretrain/lincls.py``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .data import ImageDataset, collate
from .transforms import normalize
from .utils.dist import all_gather_rows, block_shard, get_rank, get_world_size

CHUNK = 1024  # queries scored at a time by knn_scores


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


def extract_sharded(backbone: torch.nn.Module, dataset, device: torch.device, batch_size: int,
                    num_workers: int = 0, pin_memory: bool = False, channels_last: bool = False,
                    progress: bool = False, l2: bool = True):
    """Features [N, C] and labels [N] of all of ``dataset``, in its order, on every rank (as
    :func:`extract_features`).

    Without a process group: ``extract_features`` over the in-order loader, as one process always
    did. With W processes, rank r extracts only the loader batches r, r + W, r + 2W, ...
    (``block_shard`` with block = ``batch_size``): each of its batches holds the images of one
    batch of the one-process loader, so its features are that batch's. The shares (features
    [n_r, C], labels and dataset indices [n_r, 2]; n_r differ by at most ``batch_size``, an empty
    share is allowed) are all-gathered (``all_gather_rows``: padded to the largest, padding
    dropped) and put back in dataset order. Collective: every rank calls it.
    """
    if get_world_size() == 1:
        loader = eval_loader(dataset, batch_size, num_workers, pin_memory)
        return extract_features(backbone, loader, device, channels_last, progress, l2)
    idx = block_shard(len(dataset), batch_size)  # this rank's dataset indices, ascending
    feats, labels = torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    if idx:
        loader = eval_loader(Subset(dataset, idx), batch_size, num_workers, pin_memory)
        feats, labels = extract_features(backbone, loader, device, channels_last,
                                         progress and get_rank() == 0, l2)
    feats = all_gather_rows(feats)  # [N, C], rank 0's share first
    meta = all_gather_rows(torch.stack([labels, torch.tensor(idx, dtype=torch.long)], 1))  # [N, 2]
    order = meta[:, 1].argsort()  # gathered row of each dataset index
    return feats[order], meta[order, 0]


@torch.no_grad()
def knn_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int = 200, t: float = 0.1, chunk: int = CHUNK) -> torch.Tensor:
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


@torch.no_grad()
def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1, chunk: int = CHUNK,
                split: bool = False) -> torch.Tensor:
    """Predicted classes [N] (argmax_c S_c) of normalized queries [N, D] against a bank [M, D].

    ``split`` with W processes (collective: every rank calls it, with the same tensors): rank r
    scores only the chunks r, r + W, ... of :func:`knn_scores`'s split into ``chunk`` queries
    (the same rows against the same bank: the scores of one process), and the predictions are
    all-gathered back into query order. Every rank returns all N, each having done 1/W of the
    work. Without a process group ``split`` changes nothing.
    """
    w = get_world_size() if split else 1
    if w == 1:
        return knn_scores(query, bank, bank_labels, num_classes, k, t, chunk).argmax(1)
    starts = list(range(0, len(query), chunk))
    mine = [knn_scores(query[s:s + chunk], bank, bank_labels, num_classes, k, t, chunk).argmax(1)
            for s in starts[get_rank()::w]]
    pred = all_gather_rows(torch.cat(mine) if mine else torch.empty(0, dtype=torch.long))
    rows = torch.cat([torch.arange(s, min(s + chunk, len(query)))
                      for r in range(w) for s in starts[r::w]])  # query of each gathered row
    out = torch.empty_like(pred)
    out[rows] = pred
    return out


def knn_top1(train_feats, train_labels, val_feats, val_labels, num_classes: int,
             k: int = 200, t: float = 0.1, split: bool = False) -> float:
    """Top-1 accuracy (%) of weighted kNN; ``split``: the ranks share the scoring
    (:func:`knn_predict`; collective), every rank returns the one-process number."""
    pred = knn_predict(val_feats, train_feats, train_labels, num_classes, k, t, split=split)
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
    from pretrain.errors import DataError

    if not dataset.classes or min(dataset.labels) < 0:
        raise DataError(f"{what}: needs class labels (class sub-folders, list labels or an "
                        "IDX labels file)")
    return len(dataset.classes)


def evaluate_knn(backbone: torch.nn.Module, train_set: ImageDataset, val_set: ImageDataset,
                 device: torch.device, k: int = 200, t: float = 0.1, batch_size: int = 256,
                 num_workers: int = 0, channels_last: bool = False,
                 progress: bool = False) -> float:
    """Weighted-kNN top-1 (%) of ``backbone`` features: bank = train split, queries = val split.

    With a process group (collective: every rank calls it): every rank extracts its share of
    both splits (:func:`extract_sharded`) and scores its share of the queries (``knn_top1`` with
    ``split``); every rank returns the top-1 one process gets with the same ``batch_size``.
    """
    num_classes = max(labelled(train_set, "kNN train split"), labelled(val_set, "kNN val split"))
    pin = device.type == "cuda"
    ftr, ytr = extract_sharded(backbone, train_set, device, batch_size, num_workers, pin,
                               channels_last, progress)
    fva, yva = extract_sharded(backbone, val_set, device, batch_size, num_workers, pin,
                               channels_last, progress)
    return knn_top1(ftr, ytr, fva, yva, num_classes, k, t, split=True)


def build_knn_sets(cfg) -> tuple[ImageDataset, ImageDataset] | None:
    """Evaluation-transform datasets of ``DATA.KNN_TRAIN_ROOT`` / ``KNN_VAL_ROOT``, or None."""
    from pretrain.data import build_eval_dataset
    from pretrain.transforms import build_eval_transform

    if not (cfg.DATA.KNN_TRAIN_ROOT and cfg.DATA.KNN_VAL_ROOT):
        return None
    tf = build_eval_transform(cfg.DATA.IMAGE_SIZE)
    return (build_eval_dataset(cfg, cfg.DATA.KNN_TRAIN_ROOT, tf),
            build_eval_dataset(cfg, cfg.DATA.KNN_VAL_ROOT, tf))


@functools.lru_cache(maxsize=4)
def labelled_subset(root: str, fmt: str, max_images: int, per_class: int):
    """A labelled split: the first ``max_images`` (0: all), then the first ``per_class`` images
    of each class (0: all)."""
    from .data import ArrayImages, ImageFiles, load_source

    source = load_source(root, fmt, max_images)
    if per_class <= 0:
        return source
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(source.labels):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= per_class:
            keep.append(i)
    if isinstance(source, ArrayImages):
        out = ArrayImages(source.images[keep], np.asarray(source.labels)[keep], source.origin)
        out.classes = list(source.classes)
        return out
    return ImageFiles([source.paths[i] for i in keep], [source.labels[i] for i in keep],
                      source.classes)


def linear_probe(train_x, train_y, val_x, val_y, num_classes: int, weight_decay: float = 1e-3,
                 max_iter: int = 200, device=None) -> float:
    """Top-1 (%) of multinomial logistic regression on standardised features.

    Minimises  mean CE(W x + b, y) + (weight_decay / 2) ||W||²  with L-BFGS from W = 0, b = 0
    (a convex problem: the result does not depend on a random start).
    """
    train_x, val_x, train_y, val_y = (t.to(device) for t in (train_x, val_x, train_y, val_y))
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt, xv = (train_x - mu) / sd, (val_x - mu) / sd  # [N, D], [M, D]
    w = torch.zeros(xt.shape[1], num_classes, device=xt.device, requires_grad=True)  # [D, C]
    b = torch.zeros(num_classes, device=xt.device, requires_grad=True)  # [C]
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, train_y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((xv @ w + b).argmax(1) == val_y).float().mean().item()


def evaluate_backbone(backbone, spec: dict, image_size: int, device=None) -> dict:
    """kNN (and linear) top-1 (%) of a frozen trunk on two labelled splits.

    ``spec``: ``train``/``val`` roots in ``format``; ``max_train``/``max_val`` and
    ``train_per_class``/``val_per_class`` limits (0: all); ``knn_k``, ``knn_t``; ``linear`` (fit
    :func:`linear_probe` too) with ``linear_weight_decay``; ``batch_size``, ``num_workers``;
    ``image_size`` (0: the given one). Features are the pooled trunk output of the evaluation
    view (resize + center crop).

    With a process group (collective): features and kNN as in :func:`evaluate_knn`, shared by the
    ranks; every rank then fits the same linear probe on the gathered features.
    """
    from .transforms import build_eval_transform

    device = device or torch.device("cpu")
    tf = build_eval_transform(spec.get("image_size") or image_size)
    sets = [ImageDataset(labelled_subset(spec[s], spec["format"], spec[f"max_{s}"],
                                      spec[f"{s}_per_class"]), tf) for s in ("train", "val")]
    num_classes = max(labelled(sets[0], spec["train"]), labelled(sets[1], spec["val"]))
    backbone = backbone.to(device)
    (ftr, ytr), (fva, yva) = (
        extract_sharded(backbone, s, device, spec["batch_size"], spec["num_workers"], l2=False)
        for s in sets)
    out = dict(knn_top1=knn_top1(F.normalize(ftr, dim=1), ytr, F.normalize(fva, dim=1), yva,
                                 num_classes, spec["knn_k"], spec["knn_t"], split=True))
    if spec["linear"]:
        out["linear_top1"] = linear_probe(ftr, ytr, fva, yva, num_classes,
                                          spec["linear_weight_decay"], device=device)
    return out
