#!/usr/bin/env python
"""Fine-tune and evaluate Faster/Mask R-CNN with Detectron2; the same as ``feataug detect``.

    python tools/train_net.py --config-file configs/detection/pascal_voc_R_50_C4_24k.yaml \\
        --num-gpus 8 MODEL.WEIGHTS r50.pkl OUTPUT_DIR out/voc
"""

import sys

from feataug.cli import main as feataug_main


def main(argv=None) -> int:
    return feataug_main(["detect", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
