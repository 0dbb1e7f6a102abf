"""``python -m feataug``: the ``feataug`` command, also from a checkout that is not installed."""

import sys

from feataug.cli import main

sys.exit(main())
