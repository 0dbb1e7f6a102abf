"""``feataug pretrain --config-file F [--resume] [KEY VALUE ...]`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse

from ..config import load_cfg
from .train_loop import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default="", metavar="FILE", help="YAML config")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last.pth when it exists")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.MAX_ITER 100 DATA.ROOT imgs/")


def main(args: argparse.Namespace) -> int:
    train(load_cfg(args.config_file or None, args.opts), resume=args.resume)
    return 0
