"""``feataug lincls``: linear evaluation of a pretrained trunk (frozen backbone, top-1).

The trunk of a pretraining checkpoint (its ``backbone`` entry and ``arch``) is frozen in eval
mode; only a linear layer on its pooled features is trained, with SGD on the labelled split
``LINCLS.TRAIN_ROOT`` and scored (top-1) on ``LINCLS.VAL_ROOT`` (defaults: the kNN splits).
``--random-init`` evaluates the same architecture untrained, the baseline any pretraining must
beat; ``--knn`` adds the weighted-kNN top-1 of the same features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.checkpoint import load_checkpoint
from pretrain.data import ResumableSampler, build_eval_dataset, collate, worker_init
from pretrain.errors import CheckpointError, ConfigError
from pretrain.evaluation import eval_loader, evaluate_knn, extract_features, labelled
from pretrain.transforms import build_eval_transform, build_train_transform, normalize
from pretrain.utils.amp import amp_dtype
from pretrain.utils.env import seed_all
from pretrain.utils.io import atomic_write_text, check_output


def load_backbone(ckpt: dict, path: str = "checkpoint") -> nn.Module:
    """The trunk of a loaded pretraining checkpoint."""
    from pretrain.backbone import build_backbone

    arch = ckpt["arch"]  # the backbone spec
    net = build_backbone(arch["name"], arch.get("stem", "imagenet"))
    try:
        net.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: backbone does not match {arch} "
                              f"({str(e).strip().splitlines()[0]})") from None
    return net


def _splits(cfg):
    train_root = cfg.LINCLS.TRAIN_ROOT or cfg.DATA.KNN_TRAIN_ROOT
    val_root = cfg.LINCLS.VAL_ROOT or cfg.DATA.KNN_VAL_ROOT
    if not train_root or not val_root:
        raise ConfigError("linear evaluation needs labelled splits: set LINCLS.TRAIN_ROOT and "
                          "LINCLS.VAL_ROOT (or DATA.KNN_TRAIN_ROOT and DATA.KNN_VAL_ROOT)")
    return train_root, val_root


@torch.no_grad()
def _features(backbone, x, device, dtype):
    x = normalize(x.to(device, non_blocking=True))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return backbone(x).float()


def linear_eval(cfg, backbone: nn.Module, device: torch.device, progress: bool = True) -> dict:
    """Train a linear classifier on the frozen ``backbone``; returns top-1 (%) and sizes."""
    from tqdm import tqdm

    seed_all(cfg.SEED)
    train_root, val_root = _splits(cfg)
    size, lc = cfg.DATA.IMAGE_SIZE, cfg.LINCLS
    eval_tf = build_eval_transform(size)
    train_set = build_eval_dataset(cfg, train_root,
                                   build_train_transform(size) if lc.AUGMENT else eval_tf)
    val_set = build_eval_dataset(cfg, val_root, eval_tf)
    num_classes = max(labelled(train_set, train_root), labelled(val_set, val_root))
    dtype = amp_dtype(cfg.SOLVER.AMP, device.type)
    workers, pin = cfg.DATALOADER.NUM_WORKERS, device.type == "cuda"
    backbone = backbone.to(device).eval().requires_grad_(False)

    head = nn.Linear(backbone.feat_dim, num_classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    bs = min(lc.BATCH_SIZE, len(train_set))
    optimizer = torch.optim.SGD(head.parameters(), lr=lc.BASE_LR * bs / 256,
                                momentum=lc.MOMENTUM, weight_decay=lc.WEIGHT_DECAY)
    iters = lc.EPOCHS * (len(train_set) // bs)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(iters, 1))

    if lc.AUGMENT:  # a new augmented view of every image each epoch
        sampler = ResumableSampler(len(train_set), seed=cfg.SEED)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=bs, sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=pin, drop_last=True, worker_init_fn=worker_init, generator=torch.Generator())
    else:  # center-crop features once
        feats, labels = extract_features(backbone, eval_loader(train_set, bs, workers, pin), device,
                                         l2=False, dtype=dtype)
    bar = tqdm(total=iters, desc="lincls", dynamic_ncols=True, mininterval=1.0, disable=not progress)
    for epoch in range(lc.EPOCHS):
        if lc.AUGMENT:
            sampler.set_epoch(epoch)
            batches = ((_features(backbone, x, device, dtype), y.to(device)) for x, y, _ in loader)
        else:
            g = torch.Generator().manual_seed(cfg.SEED + epoch)
            order = torch.randperm(len(feats), generator=g)[: len(feats) // bs * bs].view(-1, bs)
            batches = ((feats[i].to(device), labels[i].to(device)) for i in order)
        for f, y in batches:
            loss = F.cross_entropy(head(f), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()

    correct = 0
    with torch.no_grad():
        for x, y, _ in eval_loader(val_set, bs, workers, pin):
            correct += (head(_features(backbone, x, device, dtype)).argmax(1).cpu() == y).sum().item()
    return dict(top1=100.0 * correct / len(val_set), train_images=len(train_set),
                val_images=len(val_set), classes=num_classes, epochs=lc.EPOCHS)


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="", metavar="C", help="pretraining checkpoint")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="config for the data / LINCLS keys (default: the checkpoint's own)")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the config's trunk untrained (the baseline)")
    parser.add_argument("--knn", action="store_true", help="also report weighted-kNN top-1")
    parser.add_argument("--output", default="", metavar="JSON",
                        help="where to write the result (default: lincls.json beside the "
                        "checkpoint, or OUTPUT_DIR/lincls_random_init.json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file (never the checkpoint or config)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. LINCLS.EPOCHS 10")


def run(args: argparse.Namespace) -> dict:
    from pretrain.config import load_cfg

    if not args.checkpoint and not args.random_init:
        raise ConfigError("give --checkpoint C (or --random-init for the untrained baseline)")
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    if args.config_file or ckpt is None:
        cfg = load_cfg(args.config_file or None, args.opts)
    else:  # the checkpoint's own config, with the command-line overrides
        cfg = load_cfg(text=ckpt["config"], opts=args.opts,
                       source=f"{args.checkpoint} (its stored config)")
    out = args.output or (Path(args.checkpoint).with_name("lincls.json") if args.checkpoint
                          else Path(cfg.OUTPUT_DIR) / "lincls_random_init.json")
    check_output(out, inputs={"--checkpoint": args.checkpoint, "--config-file": args.config_file},
                 overwrite=args.overwrite, flag="--output" if args.output else "")  # before the work
    device = torch.device("cuda" if cfg.DEVICE != "cpu" and torch.cuda.is_available() else "cpu")
    if args.random_init:
        from pretrain.backbone import build_backbone

        seed_all(cfg.SEED)
        backbone = build_backbone(cfg.MODEL.BACKBONE, cfg.MODEL.STEM)
        source = f"random init ({cfg.MODEL.BACKBONE}, seed {cfg.SEED})"
    else:
        backbone = load_backbone(ckpt, args.checkpoint)
        source = f"{args.checkpoint} (iteration {ckpt['iter']})"
    result = {"source": source, **linear_eval(cfg, backbone, device)}
    if args.knn:
        tf = build_eval_transform(cfg.DATA.IMAGE_SIZE)
        train_root, val_root = _splits(cfg)
        result["knn_top1"] = evaluate_knn(
            backbone, build_eval_dataset(cfg, train_root, tf), build_eval_dataset(cfg, val_root, tf),
            device, cfg.KNN.K, cfg.KNN.T,
            num_workers=cfg.DATALOADER.NUM_WORKERS)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    line = f"lincls: top-1 {result['top1']:.2f}%"
    if "knn_top1" in result:
        line += f", kNN top-1 {result['knn_top1']:.2f}%"
    print(f"{line} ({result['val_images']} val images, {result['classes']} classes, "
          f"{result['epochs']} epochs; {source}) -> {out}")
    return result


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0
