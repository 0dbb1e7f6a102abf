#!/usr/bin/env python
"""Fine-tune and evaluate Faster/Mask R-CNN with Detectron2; the same as ``feataug detect``.

    python tools/train_net.py --config-file configs/detection/pascal_voc_R_50_C4_24k.yaml \\
        --num-gpus 8 MODEL.WEIGHTS r50.pkl OUTPUT_DIR out/voc
"""

import argparse
import sys

from transfer import detect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    detect.add_arguments(parser)
    return detect.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
