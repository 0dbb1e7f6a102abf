#!/usr/bin/env python
"""Self-supervised pretraining; the same as `feataug pretrain` (works under torchrun).

    torchrun --nproc_per_node 8 tools/pretrain_net.py --config-file configs/pretrain/moco_v2_r50.yaml \\
        DATA.ROOT /data/imagenet/train OUTPUT_DIR output/moco_v2
"""

import sys

from feataug.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
