#!/usr/bin/env python
"""Self-supervised pretraining; the same as `feataug pretrain` (works under torchrun).

    torchrun --nproc_per_node 8 tools/pretrain.py --config-file configs/pretrain/moco_v2_r50.yaml \\
        DATA.ROOT /data/imagenet/train OUTPUT_DIR output/moco_v2
"""

import sys
from pathlib import Path

# This file's folder would shadow the `pretrain` package: import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from feataug.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
