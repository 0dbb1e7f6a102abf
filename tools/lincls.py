#!/usr/bin/env python
"""Linear evaluation of a pretrained trunk; the same as `feataug lincls`.

    python tools/lincls.py --checkpoint output/moco_v2/last.pth LINCLS.TRAIN_ROOT ... LINCLS.VAL_ROOT ...
"""

import sys
from pathlib import Path

# This file's folder would shadow the `pretrain` package: import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from feataug.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["lincls", *sys.argv[1:]]))
