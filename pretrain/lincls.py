"""Linear evaluation of a frozen trunk in a published protocol, under DDP, exactly resumable.

The trunk (any module mapping images [N, 3, S, S] to pooled features [N, C], with attribute
``feat_dim`` = C) stays frozen in eval mode, its BN statistics untouched, as in both reference
scripts. Only a linear layer ``logits = f W^T + b`` (W [K, C], b [K], K classes; W ~ N(0, 0.01^2),
b = 0) is trained, with the mean cross-entropy over a batch, on ``LINCLS.TRAIN_ROOT``
(RandomResizedCrop(0.08, 1) + flip; ``LINCLS.AUGMENT False``: the centre crop's features, once),
and scored on ``LINCLS.VAL_ROOT`` (resize to S / 0.875, centre crop S): top-1 and top-5 (%).

Protocols (``LINCLS.PROTOCOL``; a key left at 0 / "" / [] takes the protocol's value):

=============  =================================  ==========================================
key            moco                               simsiam
=============  =================================  ==========================================
OPTIMIZER      sgd (momentum 0.9)                 lars (momentum 0.9, trust eta = 0.001)
BASE_LR        30                                 0.1
BATCH_SIZE     256                                4096
EPOCHS         100                                90
SCHEDULE       steps: x0.1 at epochs 60 and 80    cosine: lr_e = lr_0 (1 + cos(pi e / E)) / 2
WEIGHT_DECAY   0                                  0
=============  =================================  ==========================================

Sources, read in the repositories: facebookresearch/moco ``main_lincls.py`` (``--lr 30``,
``--schedule 60 80`` with ``lr *= 0.1`` per milestone, ``-b 256``, ``--epochs 100``,
``--momentum 0.9``, ``--wd 0``; the README's command); facebookresearch/simsiam
``main_lincls.py`` (``--lr 0.1``, ``init_lr = lr * batch_size / 256``: 1.6 at ``-b 4096``,
``--epochs 90``, ``--wd 0``, ``--lars``: apex ``LARC(trust_coefficient=0.001, clip=False)``
around SGD, ``adjust_learning_rate``: the cosine above, per epoch). Both: the fc layer's
N(0, 0.01^2) / zero init and the crops above at S = 224.

Here lr_0 = BASE_LR x B / 256 for both, B the global batch actually used (``BATCH_SIZE``, cut to
the training images and to a multiple of the process count); at MoCo's B = 256 that is its
unscaled 30. The lr is set at the start of each epoch e (0-based). LARS is
:class:`pretrain.solver.LARS` on both tensors of the layer (apex's LARC skips none): per tensor
d = g + wd w, scaled by eta ||w|| / ||d|| where both norms are > 0; apex divides by
||g|| + wd ||w|| + 1e-8, the same with wd = 0 but for the 1e-8.

Processes (``torchrun``; gloo on the CPU, NCCL on CUDA): the epoch's permutation is dealt by
:class:`pretrain.data.ResumableSampler`, rank r taking B / W consecutive images of its share per
step, so the W per-rank batches of a step are the images of one one-process batch. The layer is
wrapped in DDP, which averages the per-rank gradients: (1/W) sum_r (W/B) sum_{i in r} grad_i =
(1/B) sum_i grad_i, the one-process gradient up to the float summation order. Evaluation: rank r
scores the val batches r, r + W, ... (:func:`pretrain.utils.dist.block_shard`, batch
min(B, 256), the same batches whatever W), and the hit counts are summed across ranks.

Resume: after each epoch rank 0 writes ``lincls_last.pth`` atomically (plain data only,
:mod:`pretrain.lincls_folder`): the layer, optimizer state (momentum buffers), schedule position,
every rank's RNG states, the sampler state, and the settings that define the evaluation
(:func:`identity`). ``resume`` continues after its last epoch (the epoch order and every crop
are functions of SEED, the epoch and the image), so an interrupted and resumed run ends with the
same weights, bit for bit, as an uninterrupted one with the same process count.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from pretrain.config import check_run_keys
from pretrain.data import (
    ImageDataset,
    ResumableSampler,
    build_eval_dataset,
    collate,
    worker_init,
)
from pretrain.errors import CheckpointError, ConfigError, DataError
from pretrain.evaluation import eval_loader, extract_sharded, labelled
from pretrain.lincls_folder import (
    RESULT_NAME,
    STATE_NAME,
    load_state,
    locked,
    save_state,
    start_folder,
)
from pretrain.transforms import build_eval_transform, build_train_transform, normalize
from pretrain.utils.amp import amp_dtype
from pretrain.utils.dist import (
    all_gather_object,
    block_shard,
    get_rank,
    get_world_size,
    is_main_process,
)
from pretrain.utils.env import seed_all

__all__ = ["PROTOCOLS", "RESULT_NAME", "STATE_NAME", "identity", "linear_eval", "load_backbone",
           "lr_factor", "protocol_overrides", "settings", "split_roots"]  # fmt: skip

# the published values of each protocol (module docstring); momentum 0.9 and weight decay 0 are
# the same in both and are plain LINCLS keys
PROTOCOLS = {
    "moco": {"OPTIMIZER": "sgd", "BASE_LR": 30.0, "BATCH_SIZE": 256, "EPOCHS": 100,
             "SCHEDULE": "steps", "STEPS": [60, 80]},
    "simsiam": {"OPTIMIZER": "lars", "BASE_LR": 0.1, "BATCH_SIZE": 4096, "EPOCHS": 90,
                "SCHEDULE": "cosine", "STEPS": []},
}  # fmt: skip
OPTIMIZERS, SCHEDULES = ("sgd", "lars"), ("steps", "cosine")
LARS_TRUST = 0.001  # SimSiam's LARC trust coefficient
EVAL_BATCH = 256  # most images per evaluation batch


def load_backbone(ckpt: dict, path: str = "checkpoint") -> nn.Module:
    """The trunk of a loaded FeatAug pretraining checkpoint (its ``backbone`` and ``arch``)."""
    from pretrain.backbone import build_backbone

    arch = ckpt["arch"]  # the backbone spec
    net = build_backbone(arch["name"], arch.get("stem", "imagenet"))
    try:
        net.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: backbone does not match {arch} "
                              f"({str(e).strip().splitlines()[0]})") from None
    return net


# ----------------------------------------------------------------------------- settings
def protocol_overrides(name: str) -> list[str]:
    """``KEY VALUE`` pairs setting ``LINCLS.PROTOCOL`` to ``name`` and every key it governs back
    to "the protocol's" (``feataug lincls --protocol``: a config that spells out another
    protocol's numbers, such as a checkpoint's stored one, does not keep them)."""
    return ["LINCLS.PROTOCOL", name, "LINCLS.OPTIMIZER", "", "LINCLS.BASE_LR", "0.0",
            "LINCLS.BATCH_SIZE", "0", "LINCLS.EPOCHS", "0", "LINCLS.SCHEDULE", "",
            "LINCLS.STEPS", "[]"]  # fmt: skip


def settings(cfg) -> dict:
    """The linear protocol of ``cfg``, every key resolved (``"LINCLS.KEY": value``); a bad value
    is one :class:`ConfigError` naming its key."""
    lc = cfg.LINCLS
    if lc.PROTOCOL not in PROTOCOLS:
        raise ConfigError(f"LINCLS.PROTOCOL '{lc.PROTOCOL}' is not one of: {', '.join(PROTOCOLS)}")
    s = {"LINCLS.PROTOCOL": lc.PROTOCOL}
    for key, published in PROTOCOLS[lc.PROTOCOL].items():  # 0, "" or []: the published value
        given = list(lc[key]) if key == "STEPS" else lc[key]
        s[f"LINCLS.{key}"] = given or (list(published) if key == "STEPS" else published)
    s |= {"LINCLS.MOMENTUM": float(lc.MOMENTUM), "LINCLS.WEIGHT_DECAY": float(lc.WEIGHT_DECAY),
          "LINCLS.AUGMENT": bool(lc.AUGMENT)}
    for key, allowed in (("LINCLS.OPTIMIZER", OPTIMIZERS), ("LINCLS.SCHEDULE", SCHEDULES)):
        if s[key] not in allowed:
            raise ConfigError(f"{key} '{s[key]}' is not one of: {', '.join(allowed)}")
    for key in ("LINCLS.EPOCHS", "LINCLS.BATCH_SIZE"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise ConfigError(f"{key} {s[key]} must be a positive integer")
    if not s["LINCLS.BASE_LR"] > 0:
        raise ConfigError(f"LINCLS.BASE_LR {s['LINCLS.BASE_LR']} must be > 0")
    if not 0 <= s["LINCLS.MOMENTUM"] < 1 or s["LINCLS.WEIGHT_DECAY"] < 0:
        raise ConfigError(f"LINCLS.MOMENTUM {lc.MOMENTUM} must be in [0, 1) and "
                          f"LINCLS.WEIGHT_DECAY {lc.WEIGHT_DECAY} >= 0")
    steps = s["LINCLS.STEPS"]
    if any(not isinstance(m, int) or m < 1 for m in steps) or steps != sorted(set(steps)):
        raise ConfigError(f"LINCLS.STEPS {steps}: epochs must be increasing positive integers")
    check_run_keys(cfg)
    return s


def lr_factor(s: dict, epoch: int) -> float:
    """lr / lr_0 in epoch ``epoch`` (0-based): 0.1 ** (milestones passed), or the cosine."""
    if s["LINCLS.SCHEDULE"] == "steps":
        return 0.1 ** sum(epoch >= m for m in s["LINCLS.STEPS"])
    return 0.5 * (1.0 + math.cos(math.pi * epoch / s["LINCLS.EPOCHS"]))


def identity(cfg, s: dict, trunk, sizes: dict, batch: int, device: torch.device) -> dict:
    """What defines an evaluation, compared on ``resume``: the resolved protocol, SEED, the
    image size, the autocast dtype, the trunk (``trunk``: plain data, e.g. the checkpoint's
    sha256), the split sizes and the global batch."""
    dtype = amp_dtype(cfg.SOLVER.AMP, device.type)
    return {**s, "SEED": int(cfg.SEED), "DATA.IMAGE_SIZE": int(cfg.DATA.IMAGE_SIZE),
            "SOLVER.AMP": str(dtype).replace("torch.", "") if dtype else "off",
            "trunk": trunk, **sizes, "global batch": batch}


# ----------------------------------------------------------------------------- data
def split_roots(cfg) -> tuple[str, str]:
    """(train root, val root) of the linear evaluation; refused where either is not set."""
    train_root = cfg.LINCLS.TRAIN_ROOT or cfg.DATA.KNN_TRAIN_ROOT
    val_root = cfg.LINCLS.VAL_ROOT or cfg.DATA.KNN_VAL_ROOT
    if not train_root or not val_root:
        raise ConfigError("linear evaluation needs labelled splits: set LINCLS.TRAIN_ROOT and "
                          "LINCLS.VAL_ROOT (or DATA.KNN_TRAIN_ROOT and DATA.KNN_VAL_ROOT)")
    return train_root, val_root


class _Counted(ImageDataset):
    """An :class:`ImageDataset` that marks every unreadable image it replaced (by the next
    readable one) in a shared-memory mask, which loader workers write into too."""

    def __init__(self, dataset: ImageDataset):
        super().__init__(dataset.source, dataset.transform, dataset.max_tries)
        self.unreadable = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()  # [N]

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if out[2]:
            self.unreadable[out[2]] = True
        return out

    def found(self) -> list[str]:
        """The names of the unreadable images any rank met. Collective."""
        mine = self.unreadable.nonzero().flatten().tolist()
        return [self.source.name(i) for i in sorted(set().union(*all_gather_object(mine)))]


def _datasets(cfg, augment: bool):
    """(train set, val set, classes); every fault (no split, no labels, other classes in the
    two folders) is one line."""
    train_root, val_root = split_roots(cfg)
    size = cfg.DATA.IMAGE_SIZE
    eval_tf = build_eval_transform(size)
    train_set = _Counted(build_eval_dataset(cfg, train_root,
                                            build_train_transform(size) if augment else eval_tf))
    val_set = _Counted(build_eval_dataset(cfg, val_root, eval_tf))
    classes = max(labelled(train_set, train_root), labelled(val_set, val_root))
    # a folder numbers its own class sub-folders by sorted name: with other names a label means
    # another class in each split, so both must hold the same classes, as ImageNet's train and
    # val do in both published protocols (list and IDX labels are the numbers written there)
    train, val = train_set.classes, val_set.classes
    if (cfg.DATA.KNN_FORMAT or cfg.DATA.FORMAT) == "folder" and train != val:
        only = [sorted(set(a) - set(b)) for a, b in ((val, train), (train, val))]
        names = [", ".join(o[:3]) + (" ..." if len(o) > 3 else "") or "none" for o in only]
        raise DataError(f"{val_root} and {train_root}: the val and train splits have other "
                        f"classes (only in val: {names[0]}; only in train: {names[1]}); "
                        "labels are numbered by class folder name, so give both the same ones")
    return train_set, val_set, classes


def _global_batch(batch: int, images: int, world: int) -> int:
    """B: ``batch`` cut to the training images and down to a multiple of the process count."""
    b = min(batch, images)
    b -= b % world
    if b < 1:
        raise ConfigError(f"linear evaluation: {images} training images cannot make a batch "
                          f"for {world} processes")
    return b


@torch.no_grad()
def _features(backbone, x, device, dtype):
    x = normalize(x.to(device, non_blocking=True))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return backbone(x).float()


# ----------------------------------------------------------------------------- the run
def linear_eval(cfg, backbone: nn.Module, device: torch.device, progress: bool = True, *,
                out_dir: str | Path | None = None, resume: bool = False, replace: bool = False,
                trunk=None, record: dict | None = None,
                on_epoch: Callable[[int], None] | None = None) -> dict:
    """Train the linear layer on the frozen ``backbone`` and score it (module docstring).

    ``out_dir``: where ``lincls_last.pth`` goes after every epoch, and ``provenance.json`` and
    ``config.yaml`` before the first (``record``: extra provenance fields, plain data); none
    without it. Rank 0 holds the folder's lock (:func:`pretrain.utils.lock.run_lock`) while it
    writes there; a fresh run refuses a folder holding an evaluation unless ``replace``.
    ``resume``: continue from ``out_dir``'s ``lincls_last.pth``, refused (one line naming the
    key) where :func:`identity` differs; ``trunk``: the trunk's part of it.
    ``on_epoch(k)``: called on every rank after epoch k (1-based) is saved. Everything is checked
    before anything is written. Collective under a process group: every rank calls it and gets
    the same result. Returns top-1 / top-5 (%), the split sizes and the resolved settings.
    """
    s = settings(cfg)
    train_set, val_set, classes = _datasets(cfg, s["LINCLS.AUGMENT"])
    world = get_world_size()
    batch = _global_batch(s["LINCLS.BATCH_SIZE"], len(train_set), world)
    sizes = dict(train_images=len(train_set), val_images=len(val_set), classes=classes)
    ident = identity(cfg, s, trunk, sizes, batch, device)
    seed_all(cfg.SEED)
    head = nn.Linear(backbone.feat_dim, classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    lr0 = s["LINCLS.BASE_LR"] * batch / 256
    optimizer = _optimizer(s, head, lr0)
    out = Path(out_dir) if out_dir is not None else None
    start, history = 0, []
    if resume:
        if out is None:
            raise ConfigError("resume needs the folder of the evaluation to continue")
        start, history = load_state(out / STATE_NAME, ident, head, optimizer)
    with locked(out, device, fresh=not resume and not replace):
        if out is not None:
            start_folder(out, cfg, split_roots(cfg), record, start, sizes)
        run = dict(cfg=cfg, s=s, ident=ident, head=head, optimizer=optimizer, lr0=lr0,
                   backbone=backbone.to(device).eval().requires_grad_(False), device=device,
                   out=out, train_set=train_set, batch=batch, history=history,
                   dtype=amp_dtype(cfg.SOLVER.AMP, device.type))
        _train(run, start, progress, on_epoch)
        top1, top5 = _evaluate(head, run["backbone"], val_set, device, run["dtype"],
                               min(batch, EVAL_BATCH), cfg.DATALOADER.NUM_WORKERS)
    found = {"train": train_set.found(), "val": val_set.found()}
    bad = found["train"] + found["val"]
    if bad and is_main_process():  # each was replaced by the next readable image, as in pretraining
        print(f"warning: {len(bad)} unreadable image(s) were replaced by the next readable one: "
              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}", file=sys.stderr)
    return dict(top1=top1, top5=top5, **sizes, epochs=s["LINCLS.EPOCHS"], global_batch=batch,
                lr=lr0, resumed_at=start, settings=s, history=history,
                unreadable_images={k: len(v) for k, v in found.items()})


def _optimizer(s: dict, head: nn.Linear, lr: float) -> torch.optim.Optimizer:
    kw = dict(lr=lr, momentum=s["LINCLS.MOMENTUM"], weight_decay=s["LINCLS.WEIGHT_DECAY"])
    if s["LINCLS.OPTIMIZER"] == "lars":
        from pretrain.solver import LARS

        return LARS(head.parameters(), eta=LARS_TRUST, **kw)
    return torch.optim.SGD(head.parameters(), **kw)


def _batches(run: dict, sampler: ResumableSampler, loader, feats, per_rank: int, iters: int):
    """This rank's (features [b, C], labels [b]) of the epoch ``sampler`` is set to."""
    device, backbone, dtype = run["device"], run["backbone"], run["dtype"]
    if loader is not None:  # a fresh augmented view of every image
        for x, y, _ in loader:
            yield _features(backbone, x, device, dtype), y.to(device)
        return
    idx = torch.tensor([i for i, _ in sampler.keys()], dtype=torch.long)  # [share]
    for rows in idx[: iters * per_rank].view(iters, per_rank):
        yield feats[0][rows].to(device), feats[1][rows].to(device)


def _train(run: dict, start: int, progress: bool, on_epoch) -> None:
    """Epochs ``start`` .. EPOCHS - 1, saving the state after each."""
    from tqdm import tqdm

    cfg, s, head, optimizer = run["cfg"], run["s"], run["head"], run["optimizer"]
    world, rank, device = get_world_size(), get_rank(), run["device"]
    epochs, per_rank = s["LINCLS.EPOCHS"], run["batch"] // world
    sampler = ResumableSampler(len(run["train_set"]), seed=cfg.SEED, rank=rank, world_size=world)
    iters = sampler.shard_size() // per_rank  # = floor(N / B) steps per epoch, on every rank
    workers, pin = cfg.DATALOADER.NUM_WORKERS, device.type == "cuda"
    loader = feats = None
    if s["LINCLS.AUGMENT"]:
        loader = DataLoader(run["train_set"], batch_size=per_rank, sampler=sampler,
                            num_workers=workers, collate_fn=collate, pin_memory=pin,
                            drop_last=True, worker_init_fn=worker_init,
                            generator=torch.Generator())
    elif start < epochs:  # the centre crops' features, once, shared by the ranks
        feats = extract_sharded(run["backbone"], run["train_set"], device,
                                min(run["batch"], EVAL_BATCH), workers, pin, l2=False)
    if world > 1:
        from pretrain.engine.launch import wrap_ddp

        model = wrap_ddp(head, device)
    else:
        model = head
    bar = tqdm(total=epochs * iters, initial=start * iters, desc="lincls", dynamic_ncols=True,
               mininterval=1.0, disable=not (progress and is_main_process()))
    done = start
    try:
        for epoch in range(start, epochs):
            sampler.set_epoch(epoch)
            lr = run["lr0"] * lr_factor(s, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = torch.zeros((), device=device)
            for f, y in _batches(run, sampler, loader, feats, per_rank, iters):
                loss = F.cross_entropy(model(f), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                bar.update(1)
            run["history"].append(dict(epoch=epoch + 1, lr=lr, loss=total.item() / max(iters, 1)))
            bar.set_postfix(loss=f"{run['history'][-1]['loss']:.4f}")
            if run["out"] is not None:
                _save(run, epoch + 1, sampler, iters)
            done = epoch + 1
            if on_epoch is not None:
                on_epoch(done)
    except KeyboardInterrupt:
        saved = f"{run['out'] / STATE_NAME} holds epoch {done}: --resume continues" \
            if run["out"] is not None and done else "nothing was saved"
        raise KeyboardInterrupt(f"interrupted after {done} of {epochs} epochs; {saved}") from None
    finally:
        bar.close()


def _save(run: dict, epoch: int, sampler: ResumableSampler, iters: int) -> None:
    """:func:`pretrain.lincls_folder.save_state` after ``epoch`` epochs."""
    save_state(run["out"] / STATE_NAME, epoch=epoch, identity=run["ident"],
               config=run["cfg"].dump(), head=run["head"], optimizer=run["optimizer"],
               schedule={"name": run["s"]["LINCLS.SCHEDULE"], "epoch": epoch,
                         "lr_next": run["lr0"] * lr_factor(run["s"], epoch)},
               sampler={"seed": sampler.seed, "epoch": epoch, "start": 0, "size": sampler.size,
                        "world_size": sampler.world_size,
                        "per_rank_batch": run["batch"] // sampler.world_size,
                        "iters_per_epoch": iters},
               history=run["history"])


@torch.no_grad()
def _evaluate(head, backbone, val_set, device, dtype, batch: int, workers: int):
    """(top-1, top-5) in % over ``val_set``: this rank's :func:`block_shard` of the batches,
    hit counts summed across ranks (every image counted once; top-5 is top-K for K < 5)."""
    idx = block_shard(len(val_set), batch)
    hits = [0, 0, len(idx)]
    if idx:
        for x, y, _ in eval_loader(Subset(val_set, idx), batch, workers, device.type == "cuda"):
            logits = head(_features(backbone, x, device, dtype))  # [n, K]
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()  # [n, k]
            hit = top == y[:, None]
            hits[0] += int(hit[:, 0].sum())
            hits[1] += int(hit.any(1).sum())
    c1, c5, n = (sum(h) for h in zip(*all_gather_object(hits), strict=True))
    assert n == len(val_set), (n, len(val_set))
    return 100.0 * c1 / n, 100.0 * c5 / n
