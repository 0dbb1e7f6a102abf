"""The pretraining engine: ``train(cfg)`` and the ``feataug pretrain`` command.

- ``train_loop``: the loop itself (one screen: data -> step -> hooks).
- ``launch``: device, process group, DDP wrapping.
- ``hooks``: what watches a run: logged metrics, TensorBoard, the kNN monitor, the loss plot.
- ``cli``: the command line.

Checkpointing lives in ``pretrain.checkpoint``, the optimizer and lr schedule in
``pretrain.solver``.
"""

from .cli import add_arguments, main
from .train_loop import train

__all__ = ["add_arguments", "main", "train"]
