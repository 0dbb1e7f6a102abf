"""Self-supervised pretraining with feature augmentation (MoCo v2, SimSiam, BYOL).

Importing the package registers the methods in ``pretrain.build.METHOD_REGISTRY``.
"""

from . import byol, moco, simsiam  # noqa: F401  (importing registers them)
