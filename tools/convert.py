#!/usr/bin/env python
"""Convert a pretraining checkpoint into Detectron2 weights; the same as ``feataug convert``.

Usage: ``python tools/convert.py IN OUT.pkl [--format auto|feataug|moco|simsiam|...]``
"""

from __future__ import annotations

import argparse
import sys

from transfer import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.splitlines()[0])
    convert.add_arguments(parser)
    return convert.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
