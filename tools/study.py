#!/usr/bin/env python
"""Run a study grid of FA pretraining experiments; the same as `feataug study`.

    python tools/study.py --grid configs/study/quick.yaml --seeds 2 --out output/study/quick
"""

import sys
from pathlib import Path

# This file's folder would shadow the `pretrain` package: import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from feataug.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
