#!/usr/bin/env python
"""Linear evaluation of a pretrained trunk; the same as `feataug lincls`.

    python tools/lincls.py --checkpoint output/moco_v2/last.pth LINCLS.TRAIN_ROOT ... LINCLS.VAL_ROOT ...
"""

import sys

from feataug.cli import main

if __name__ == "__main__":
    sys.exit(main(["lincls", *sys.argv[1:]]))
