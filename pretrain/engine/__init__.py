"""The pretraining engine: ``train(cfg)`` and the ``feataug pretrain`` command.

- ``trainer``: ``TrainerBase`` / ``HookBase``, a loop of ``run_step`` with hooks around it
  (the calling order is in its docstring).
- ``train_loop``: ``train(cfg)`` and ``PretrainTrainer``, whose ``run_step`` is one iteration.
- ``hooks``: the run's hooks: lr schedule, non-finite-loss guard, metrics, checkpoints, the kNN
  monitor, the progress bar.
- ``metrics``: the step window, ``metrics.jsonl`` / TensorBoard, the loss plot.
- ``launch``: device, process group, DDP wrapping.
- ``cli``: the command line.

Checkpointing lives in ``pretrain.checkpoint``, the optimizer and lr schedule in
``pretrain.solver``.
"""

from .cli import add_arguments, main
from .train_loop import PretrainTrainer, train
from .trainer import HookBase, TrainerBase

__all__ = ["HookBase", "PretrainTrainer", "TrainerBase", "add_arguments", "main", "train"]
