#!/usr/bin/env python
"""Benchmarks against peer implementations: the same as ``feataug bench``.

python tools/bench.py [--quick] [--out F.json] [--only pretrain,aug,coco_eval,detect] [--images DIR]
"""

import sys

from feataug.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
