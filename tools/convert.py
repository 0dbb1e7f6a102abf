#!/usr/bin/env python
"""Convert a pretraining checkpoint into Detectron2 weights; the same as ``feataug convert``.

Usage: ``python tools/convert.py IN OUT.pkl [--format auto|feataug|moco|simsiam|...]``
"""

from __future__ import annotations

import sys

from feataug.cli import main as feataug_main


def main(argv: list[str] | None = None) -> int:
    return feataug_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
