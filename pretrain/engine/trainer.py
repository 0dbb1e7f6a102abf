"""A training loop with hooks: ``TrainerBase`` runs the iterations, ``HookBase`` subclasses do
everything around them.

A trainer subclass implements ``run_step`` (one iteration: data, forward, backward, optimizer
step) and nothing else that watches or saves the run; that is the hooks' work. ``train`` calls,
for hooks ``h1 ... hn`` in the order they were registered::

    h1.before_train() ... hn.before_train()
    while iter < max_iter:
        h1.before_step() ... hn.before_step()
        run_step()
        iter += 1
        h1.after_step() ... hn.after_step()
    h1.after_train() ... hn.after_train()      # always, also after an exception

``iter`` counts the iterations done: ``before_step`` and ``run_step`` see the iterations before
this step (the 0-based index of the step), ``after_step`` sees this step counted. An exception
in any of these stops the loop; ``after_train`` still runs for every hook (clean-up: close files,
progress bars), with ``completed`` False, so hooks keep their end-of-run work (plots, summaries)
for a run that reached ``max_iter``. The run's own exception is the one that propagates; an
exception in a clean-up after it is logged, not raised.

The same split as Detectron2's ``TrainerBase`` / ``HookBase``, written here so that
``pretrain`` needs neither Detectron2 nor fvcore.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable

logger = logging.getLogger(__name__)


class HookBase:
    """Something called around the iterations of a ``TrainerBase``; override what you need.

    ``self.trainer`` (a weak reference, set by ``register_hooks``) gives the trainer's state:
    ``iter``, ``start_iter``, ``max_iter``, ``completed`` and whatever the subclass adds.
    """

    trainer: TrainerBase

    def before_train(self) -> None:
        """Once, before the first iteration."""

    def after_train(self) -> None:
        """Once, after the last iteration or after an exception (``trainer.completed`` says
        which): release what the hook holds. Also called when this hook's ``before_train`` did
        not run (an earlier hook's raised), so it must cope with nothing to release."""

    def before_step(self) -> None:
        """Before every ``run_step``."""

    def after_step(self) -> None:
        """After every ``run_step``; ``trainer.iter`` counts the step just taken."""


class TrainerBase:
    """Runs ``run_step`` from ``start_iter`` to ``max_iter`` with the registered hooks around it
    (the order in the module docstring)."""

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.iter = self.start_iter = self.max_iter = 0
        self.completed = False  # True once the loop reached max_iter without an exception

    @property
    def hooks(self) -> tuple[HookBase, ...]:
        """The registered hooks, in the order they are called."""
        return tuple(self._hooks)

    def register_hooks(self, hooks: Iterable[HookBase | None]) -> None:
        """Append ``hooks`` (``None`` entries are skipped) after those already registered."""
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"{type(h).__name__} is not a HookBase")
            # a weak reference: the trainer owns its hooks, not the other way round
            h.trainer = weakref.proxy(self)
        self._hooks.extend(hooks)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Iterations ``start_iter + 1 ... max_iter``; see the module docstring for the calls."""
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.completed = False
        try:
            self.before_train()
            while self.iter < self.max_iter:
                self.before_step()
                self.run_step()
                self.iter += 1
                self.after_step()
            self.completed = True
        finally:
            self.after_train()

    def run_step(self) -> None:
        """One iteration; ``self.iter`` is the number of iterations done before it."""
        raise NotImplementedError

    def before_train(self) -> None:
        for h in self._hooks:
            h.before_train()

    def after_train(self) -> None:
        """Every hook's ``after_train``, also when an earlier one raises. After a completed run
        the first such error is raised; after a failed run it is logged, and the run's own
        error (already propagating) is the one the caller sees."""
        first = None
        for h in self._hooks:
            try:
                h.after_train()
            except Exception as e:
                if not self.completed:
                    logger.error(f"{type(h).__name__}.after_train failed after an error: {e!r}")
                first = first or e
        if first is not None and self.completed:
            raise first

    def before_step(self) -> None:
        for h in self._hooks:
            h.before_step()

    def after_step(self) -> None:
        for h in self._hooks:
            h.after_step()
