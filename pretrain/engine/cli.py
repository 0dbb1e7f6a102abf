"""``feataug pretrain --config-file F [--resume] [KEY VALUE ...]`` (also under ``torchrun``)."""

from __future__ import annotations

import argparse
import sys

from ..config import load_cfg
from ..errors import FeatAugError, TrainingError
from .train_loop import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", default="", metavar="FILE", help="YAML config")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/last.pth when it exists")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. SOLVER.MAX_ITER 100 DATA.ROOT imgs/")


def main(args: argparse.Namespace) -> int:
    try:
        train(load_cfg(args.config_file or None, args.opts), resume=args.resume)
    except FeatAugError as e:
        print(f"feataug pretrain: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2
    return 0
