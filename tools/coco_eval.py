#!/usr/bin/env python
"""COCO-evaluate a results file: the same as ``feataug coco-eval``.

python tools/coco_eval.py --gt GT.json --results DT.json [--iou-type bbox|segm] [--json-out F]
"""

import sys

from feataug.cli import main

if __name__ == "__main__":
    sys.exit(main(["coco-eval", *sys.argv[1:]]))
