#!/usr/bin/env python
"""Run a study grid of FA pretraining experiments; the same as `feataug study`.

    python tools/study.py --grid configs/study/cpu.yaml --out output/study/cpu
"""

import sys

from feataug.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
