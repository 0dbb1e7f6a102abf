"""``feataug lincls``: linear evaluation of any checkpoint ``feataug convert`` reads, or of the
untrained trunk.

The checkpoint is read by ``transfer``'s readers (:func:`transfer.formats.read_checkpoint`:
nothing in the file runs; a FeatAug checkpoint also passes its schema,
:func:`pretrain.checkpoint.load_checkpoint`, which admits plain data only). Its trunk is found
and checked exactly as for conversion (:func:`transfer.convert.trunk_of`: every tensor of the
torchvision ResNet its keys imply, with its shape, nothing else, all finite), loaded into that
torchvision ResNet, and handed to :func:`pretrain.lincls.linear_eval`, which trains and scores
the linear layer (the protocols, DDP and resume are documented there).

The evaluation's folder (``--output-dir``; default ``<checkpoint name>_lincls`` beside the
checkpoint, ``OUTPUT_DIR/lincls_random_init`` for ``--random-init``) holds ``lincls.json`` (the
result; ``--output`` puts it elsewhere), ``lincls_last.pth`` (``--resume`` continues from it),
``config.yaml`` and ``provenance.json`` (the checkpoint's path, sha256 and format). The folder
must be new, empty or an evaluation's own (its ``provenance.json`` says so), and neither it nor
the result may lie inside the data. Every refusal is one line, before anything is written;
nothing is replaced without ``--overwrite``, and nothing lincls did not write even with it.
Under ``torchrun`` every rank runs this; rank 0 writes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch.nn as nn

from pretrain.errors import ConfigError

__all__ = ["add_arguments", "build_trunk", "main", "read_source", "run"]

# a pretraining run's own files: an --output-dir holding them is refused (provenance.json and
# config.yaml would be replaced)
RUN_FILES = ("last.pth", "checkpoint_*.pth", "metrics.jsonl")
# what the evaluation itself writes in its folder, besides the result (and the folder's lock)
OWN_FILES = ("lincls_last.pth", "provenance.json", "config.yaml")
SUFFIXES = (".pth.tar", ".pth", ".pt", ".ckpt", ".torch", ".tar", ".pkl")


def read_source(path: str, fmt: str = "auto"):
    """``(trunk, stored config text or None)`` of checkpoint ``path``: a
    :class:`transfer.convert.Trunk` (FeatAug's CIFAR stem allowed). One line for every fault."""
    from pretrain.checkpoint import REQUIRED_KEYS, load_checkpoint
    from transfer.convert import read_checkpoint, trunk_of

    notes: list[str] = []
    ckpt = read_checkpoint(path, notes)
    config = None
    if fmt == "feataug" or (fmt == "auto" and set(REQUIRED_KEYS) <= set(ckpt)):
        ckpt = load_checkpoint(path)  # FeatAug's schema: plain data only, typed fields
        config = ckpt["config"]
    return trunk_of(ckpt, fmt, path, notes, cifar=True), config


def build_trunk(trunk) -> nn.Module:
    """The torchvision ResNet of ``trunk`` (:class:`transfer.convert.Trunk`) with its weights,
    ``fc`` replaced by the identity (pooled features [N, C]; ``feat_dim`` = C)."""
    import torchvision

    from pretrain.backbone import BACKBONES, build_backbone
    from transfer.formats import ConvertError

    name = trunk.arch.torchvision_name
    if name in BACKBONES:
        net = build_backbone(name, trunk.stem)
    elif name is not None and hasattr(torchvision.models, name) and trunk.stem == "imagenet":
        net = getattr(torchvision.models, name)(weights=None)
        net.feat_dim, net.fc = net.fc.in_features, nn.Identity()
    else:
        raise ConvertError(f"{trunk.source}: {trunk.arch.title} is no torchvision ResNet; linear "
                           "evaluation builds torchvision's ResNets only")
    missing, unexpected = net.load_state_dict({**trunk.state, **trunk.counters}, strict=False)
    left = [k for k in missing if not k.endswith("num_batches_tracked")]
    if left or unexpected:  # trunk_of checked the keys: only a mismatch of the two code paths
        raise ConvertError(f"{trunk.source}: the trunk does not load into {name} "
                           f"(missing {left[:3]}, unexpected {unexpected[:3]})")
    return net


def _default_dir(args, cfg) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    if args.random_init:
        return Path(cfg.OUTPUT_DIR) / "lincls_random_init"
    ckpt = Path(args.checkpoint)
    stem = next((ckpt.name[: -len(s)] for s in SUFFIXES if ckpt.name.endswith(s)), ckpt.name)
    return ckpt.with_name(f"{stem}_lincls")


def _check_outputs(args, cfg, out_dir: Path, result: Path) -> None:
    """Refuse, before any work, a folder or result file that would lose data or could not be
    written: a folder that is not empty and not an evaluation's own
    (:func:`pretrain.lincls_folder.evaluation_folder`), a result that is one of the
    evaluation's files, and anything that is an input or lies inside the data."""
    from pretrain.lincls import RESULT_NAME, STATE_NAME, split_roots
    from pretrain.lincls_folder import evaluation_folder
    from pretrain.utils.io import check_output, check_output_folder
    from pretrain.utils.lock import LOCK_NAME

    train, val = split_roots(cfg)
    data = {"LINCLS.TRAIN_ROOT" if cfg.LINCLS.TRAIN_ROOT else "DATA.KNN_TRAIN_ROOT": train,
            "LINCLS.VAL_ROOT" if cfg.LINCLS.VAL_ROOT else "DATA.KNN_VAL_ROOT": val}
    check_output_folder(out_dir, ConfigError, flag="--output-dir", inputs=data)
    # the lock and the temporaries of killed writes are no one's data
    spare = [LOCK_NAME, *(f".{n}.*.tmp" for n in (*OWN_FILES, RESULT_NAME))]
    try:
        held = sorted(p.name for p in out_dir.iterdir()
                      if not any(fnmatch.fnmatch(p.name, s) for s in spare)) \
            if out_dir.is_dir() else []
    except OSError as e:
        raise ConfigError(f"--output-dir {out_dir}: cannot list it ({e.strerror or e})") from None
    run = [n for n in held if any(fnmatch.fnmatch(n, r) for r in RUN_FILES)]
    if run:
        raise ConfigError(f"--output-dir {out_dir}: holds a pretraining run ({run[0]}); give "
                          "another folder")
    if held and not evaluation_folder(out_dir):
        more = ", ..." if len(held) > 3 else ""
        raise ConfigError(f"--output-dir {out_dir}: holds files feataug lincls did not write "
                          f"({', '.join(held[:3])}{more}); give a new or empty folder")
    if args.resume:
        if not (out_dir / STATE_NAME).is_file():
            raise ConfigError(f"--resume: {out_dir / STATE_NAME}: no such file (nothing to "
                              "continue; drop --resume to start)")
    elif not args.overwrite:
        found = [n for n in (STATE_NAME, RESULT_NAME) if (out_dir / n).exists()]
        if found:
            raise ConfigError(f"--output-dir {out_dir}: holds an evaluation ({found[0]}); "
                              "--resume continues it, --overwrite replaces it")
    # links and ".." resolved: ev/../ev/lincls_last.pth is the state file
    inside = result.parent.resolve() == out_dir.resolve()
    if inside and result.name in (*OWN_FILES, LOCK_NAME):
        raise ConfigError(f"--output {result}: the evaluation writes its {result.name} there; "
                          "give another name")
    inputs = {"--checkpoint": args.checkpoint, "--config-file": args.config_file, **data}
    own = inside and result.name == RESULT_NAME  # --resume rewrites its own result
    check_output(result, inputs=inputs, overwrite=args.overwrite or (args.resume and own),
                 flag="--output" if args.output else "")


def _source_record(args, trunk, cfg) -> tuple[dict, dict | str]:
    """(the provenance's ``checkpoint`` entry, the trunk's identity for resume)."""
    if trunk is None:
        desc = f"random init ({cfg.MODEL.BACKBONE}, {cfg.MODEL.STEM} stem, seed {cfg.SEED})"
        return {"path": None, "random_init": desc}, desc
    from pretrain.utils.provenance import file_sha256

    sha = file_sha256(args.checkpoint)
    entry = {"path": args.checkpoint, "resolved": os.path.realpath(args.checkpoint),
             "sha256": sha, "format": trunk.format.name, "format_title": trunk.format.title,
             "arch": trunk.arch.title, "stem": trunk.stem, "prefix": trunk.prefix,
             "container": list(trunk.container), "notes": trunk.notes}
    return entry, {"sha256": sha, "format": trunk.format.name}


def _config(args, stored: str | None):
    from pretrain.config import load_cfg
    from pretrain.lincls import protocol_overrides

    opts = (protocol_overrides(args.protocol) if args.protocol else []) + list(args.opts)
    if args.config_file or stored is None:
        return load_cfg(args.config_file or None, opts)
    return load_cfg(text=stored, opts=opts, source=f"{args.checkpoint} (its stored config)")


def run(args: argparse.Namespace, on_epoch: Callable[[int], None] | None = None) -> dict:
    """``feataug lincls``; ``on_epoch``: :func:`pretrain.lincls.linear_eval`'s."""
    from pretrain import lincls
    from pretrain.engine.launch import init_distributed
    from pretrain.utils.dist import barrier, is_main_process
    from pretrain.utils.env import seed_all
    from pretrain.utils.io import atomic_write_text

    if not args.checkpoint and not args.random_init:
        raise ConfigError("give --checkpoint C (or --random-init for the untrained baseline)")
    if args.checkpoint and args.random_init:
        raise ConfigError("--checkpoint and --random-init exclude each other")
    trunk, stored = read_source(args.checkpoint, args.format) if args.checkpoint else (None, None)
    cfg = _config(args, stored)
    lincls.settings(cfg)  # a bad LINCLS key: refused before the outputs are looked at
    out_dir = _default_dir(args, cfg)
    result_path = Path(args.output) if args.output else out_dir / lincls.RESULT_NAME
    _check_outputs(args, cfg, out_dir, result_path)
    device, created = init_distributed(cfg)
    try:
        barrier()  # every rank has checked its outputs before rank 0 writes
        if trunk is None:
            seed_all(cfg.SEED)
            from pretrain.backbone import build_backbone

            backbone = build_backbone(cfg.MODEL.BACKBONE, cfg.MODEL.STEM)
        else:
            backbone = build_trunk(trunk)
        entry, ident = _source_record(args, trunk, cfg)
        result = lincls.linear_eval(cfg, backbone, device, out_dir=out_dir, resume=args.resume,
                                    replace=args.overwrite, trunk=ident,
                                    record={"checkpoint": entry}, on_epoch=on_epoch)
        result = {"source": entry.get("random_init") or args.checkpoint,
                  "format": entry.get("format"), **result}
        if args.knn:
            result["knn_top1"] = _knn(cfg, backbone, device)
        if is_main_process():
            atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
            _report(result, result_path)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    return result


def _knn(cfg, backbone, device) -> float:
    from pretrain.data import build_eval_dataset
    from pretrain.evaluation import evaluate_knn
    from pretrain.lincls import split_roots
    from pretrain.transforms import build_eval_transform

    tf = build_eval_transform(cfg.DATA.IMAGE_SIZE)
    train_root, val_root = split_roots(cfg)
    return evaluate_knn(backbone, build_eval_dataset(cfg, train_root, tf),
                        build_eval_dataset(cfg, val_root, tf), device, cfg.KNN.K, cfg.KNN.T,
                        num_workers=cfg.DATALOADER.NUM_WORKERS)


def _report(result: Mapping, path: Path) -> None:
    line = f"lincls: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%"
    if "knn_top1" in result:
        line += f", kNN top-1 {result['knn_top1']:.2f}%"
    s, fmt = result["settings"], f" ({result['format']} format)" if result["format"] else ""
    print(f"{line} ({result['val_images']} val images, {result['classes']} classes, "
          f"{result['epochs']} epochs of the {s['LINCLS.PROTOCOL']} protocol; "
          f"{result['source']}{fmt}) -> {path}")


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transfer.formats import FORMAT_NAMES

    parser.add_argument("--checkpoint", default="", metavar="C",
                        help="pretraining checkpoint: FeatAug's, or any format `feataug convert` "
                        "reads (MoCo, SimSiam, solo-learn, ...)")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMAT_NAMES),
                        help="the checkpoint's format (default: auto-detect)")
    parser.add_argument("--config-file", default="", metavar="FILE",
                        help="config for the data / LINCLS keys (default: a FeatAug "
                        "checkpoint's own, else the defaults)")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the config's trunk untrained (the baseline)")
    parser.add_argument("--protocol", choices=("moco", "simsiam"), default="",
                        help="set LINCLS.PROTOCOL and every key it governs to its published "
                        "values (KEY VALUE overrides still apply after it)")
    parser.add_argument("--knn", action="store_true", help="also report weighted-kNN top-1")
    parser.add_argument("--output-dir", default="", metavar="DIR",
                        help="the evaluation's folder (default: <checkpoint name>_lincls beside "
                        "the checkpoint, or OUTPUT_DIR/lincls_random_init)")
    parser.add_argument("--output", default="", metavar="JSON",
                        help="where to write the result (default: DIR/lincls.json)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the evaluation in DIR from its lincls_last.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier evaluation in DIR, or an existing --output file "
                        "(never the checkpoint or config)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. LINCLS.EPOCHS 10")


def main(args: argparse.Namespace) -> int:
    run(args)
    return 0
