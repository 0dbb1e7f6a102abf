"""FeatAug: self-supervised pretraining with feature augmentation, proven on detection.

The application layer: the ``feataug`` command, the demo, the study runner, the benchmarks and
data preparation, over the ``pretrain`` and ``transfer`` libraries.
"""

from pathlib import Path

__version__ = "0.1.0"

# The checkout the packages run from; config files ship beside them in configs/.
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
