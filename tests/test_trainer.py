"""The trainer and its hooks (pretrain/engine/trainer.py, hooks.py).

Truths: the calling order documented in ``pretrain.engine.trainer`` (recorded by toy hooks
around a toy ``run_step``); for a real tiny run, what is on disk (metrics.jsonl, last.pth, the
folder's lock) at the moment a user's hook is called, and after a hook raised.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from test_engine import SMALL, TINY, _images, _metrics

from pretrain.checkpoint import load_checkpoint
from pretrain.config import load_cfg
from pretrain.engine import HookBase, TrainerBase, train
from pretrain.utils.lock import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the mechanism
class Recorder(HookBase):
    """Appends ``(name, event, trainer.iter)`` to a shared list at every call."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def before_train(self) -> None:
        self.calls.append((self.name, "before_train", self.trainer.iter))

    def after_train(self) -> None:
        self.calls.append((self.name, "after_train", self.trainer.iter, self.trainer.completed))

    def before_step(self) -> None:
        self.calls.append((self.name, "before_step", self.trainer.iter))

    def after_step(self) -> None:
        self.calls.append((self.name, "after_step", self.trainer.iter))


class ToyTrainer(TrainerBase):
    """``run_step`` records itself, and raises at iteration ``fail_at``."""

    def __init__(self, calls: list, fail_at: int | None = None) -> None:
        super().__init__()
        self.calls, self.fail_at = calls, fail_at

    def run_step(self) -> None:
        if self.iter == self.fail_at:
            raise ValueError(f"step {self.iter} failed")
        self.calls.append(("trainer", "run_step", self.iter))


def test_hooks_are_called_in_the_documented_order():
    calls = []
    trainer = ToyTrainer(calls)
    trainer.register_hooks([Recorder("a", calls), None, Recorder("b", calls)])
    trainer.train(3, 5)  # iterations 4 and 5 of a resumed run
    step = [("a", "before_step", 3), ("b", "before_step", 3), ("trainer", "run_step", 3),
            ("a", "after_step", 4), ("b", "after_step", 4),
            ("a", "before_step", 4), ("b", "before_step", 4), ("trainer", "run_step", 4),
            ("a", "after_step", 5), ("b", "after_step", 5)]
    assert calls == [("a", "before_train", 3), ("b", "before_train", 3), *step,
                     ("a", "after_train", 5, True), ("b", "after_train", 5, True)]
    assert [h.name for h in trainer.hooks] == ["a", "b"]  # None skipped
    assert trainer.iter == 5 and trainer.completed


def test_a_run_with_nothing_left_still_calls_before_and_after_train():
    calls = []
    trainer = ToyTrainer(calls)
    trainer.register_hooks([Recorder("a", calls)])
    trainer.train(4, 4)
    assert calls == [("a", "before_train", 4), ("a", "after_train", 4, True)]


def test_an_exception_in_run_step_propagates_after_every_hooks_clean_up():
    calls = []
    trainer = ToyTrainer(calls, fail_at=1)
    trainer.register_hooks([Recorder("a", calls), Recorder("b", calls)])
    with pytest.raises(ValueError, match="step 1 failed"):
        trainer.train(0, 3)
    assert calls[-4:] == [("a", "before_step", 1), ("b", "before_step", 1),
                          ("a", "after_train", 1, False), ("b", "after_train", 1, False)]
    assert not trainer.completed and ("a", "after_step", 2) not in calls


class FailingCleanUp(HookBase):
    def after_train(self) -> None:
        raise OSError("cannot close")


def test_a_failing_clean_up_neither_hides_the_runs_error_nor_skips_the_others(caplog,
                                                                             monkeypatch):
    # a run's setup_logging stops "pretrain" records at its own handlers; let caplog see them
    monkeypatch.setattr(logging.getLogger("pretrain"), "propagate", True)
    calls = []
    trainer = ToyTrainer(calls, fail_at=0)
    trainer.register_hooks([FailingCleanUp(), Recorder("b", calls)])
    with pytest.raises(ValueError, match="step 0 failed"):  # the run's error, not OSError
        trainer.train(0, 2)
    assert calls[-1] == ("b", "after_train", 0, False)
    assert "FailingCleanUp.after_train failed after an error: OSError('cannot close')" \
        in caplog.text

    calls.clear()
    trainer = ToyTrainer(calls)  # a completed run: the clean-up error is the error
    trainer.register_hooks([FailingCleanUp(), Recorder("b", calls)])
    with pytest.raises(OSError, match="cannot close"):
        trainer.train(0, 1)
    assert calls[-1] == ("b", "after_train", 1, True)


def test_register_hooks_refuses_what_is_not_a_hook_and_holds_the_trainer_weakly():
    trainer = ToyTrainer([])
    with pytest.raises(TypeError, match="list is not a HookBase"):
        trainer.register_hooks([[]])
    hook = Recorder("a", [])
    trainer.register_hooks([hook])
    assert hook.trainer.iter == 0
    gone = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert gone() is None  # the hook did not keep its trainer alive
    with pytest.raises(ReferenceError):
        hook.trainer.iter  # noqa: B018


def test_the_base_trainer_has_no_step_of_its_own():
    with pytest.raises(NotImplementedError):
        TrainerBase().train(0, 1)


# ----------------------------------------------------------------------------- a real run
class Watcher(HookBase):
    """A user's hook after the run's own: what the trainer and the folder show when it runs."""

    def __init__(self, raise_at: int | None = None) -> None:
        self.raise_at = raise_at
        self.steps, self.seen, self.names, self.hooks = [], [], [], []

    def before_train(self) -> None:
        self.hooks = list(self.trainer.hooks)
        self.names = [type(h).__name__ for h in self.hooks]

    def before_step(self) -> None:
        self.steps.append(self.trainer.iter)

    def after_step(self) -> None:
        t = self.trainer
        saved = load_checkpoint(t.out / "last.pth")["iter"] if t.save_due() else None
        self.seen.append(dict(iter=t.iter, epoch=t.epoch, lr=_lr(t.optimizer),
                              logged=_metrics(t.out)[-1]["iter"], saved=saved,
                              record=t.last_record["iter"]))
        if t.iter == self.raise_at:
            raise RuntimeError(f"user hook stops at {t.iter}")

    def after_train(self) -> None:
        self.completed = self.trainer.completed


def _lr(optimizer) -> float:
    """The scheduled lr, as metrics.jsonl logs it (groups marked fix_lr keep the base lr)."""
    return next(g["lr"] for g in optimizer.param_groups if not g.get("fix_lr"))


def _cfg(data, out, *opts):
    return load_cfg(TINY, ["DATA.ROOT", str(data), "OUTPUT_DIR", str(out), *SMALL, *opts])


def test_a_users_hook_runs_after_the_runs_own_and_sees_their_results(tmp_path):
    """8 images, batch 4: 2 iterations an epoch; checkpoints every 3 and at epoch ends."""
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"
    watcher = Watcher()
    result = train(_cfg(data, out, "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_ITERS", "3"),
                   extra_hooks=[watcher])
    assert watcher.names == ["LRScheduler", "NonFiniteLossGuard", "MetricsWriter",
                             "Checkpointer", "ProgressBar", "Watcher"]
    assert watcher.steps == [0, 1, 2, 3, 4] and watcher.completed
    assert [s["iter"] for s in watcher.seen] == [1, 2, 3, 4, 5]
    assert [s["epoch"] for s in watcher.seen] == [0, 0, 1, 1, 2]
    # when the user's hook runs, this step's log line and checkpoint are on disk already
    assert all(s["logged"] == s["record"] == s["iter"] for s in watcher.seen)  # LOG_PERIOD 1
    assert [s["saved"] for s in watcher.seen] == [None, 2, 3, 4, 5]
    # the lr it sees is the one the step ran with, as logged
    assert [s["lr"] for s in watcher.seen] == [r["lr"] for r in _metrics(out)]
    assert result["iter"] == 5 and result["loss"] == _metrics(out)[-1]["loss"]
    assert (out / "curves.png").is_file() and not (out / LOCK_NAME).exists()


def test_a_hook_that_raises_stops_the_run_and_every_hook_cleans_up(tmp_path):
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"
    watcher = Watcher(raise_at=3)
    opts = ["SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_ITERS", "1"]
    with pytest.raises(RuntimeError, match="user hook stops at 3"):
        train(_cfg(data, out, *opts), extra_hooks=[watcher])
    assert watcher.completed is False
    writer = next(h for h in watcher.hooks if type(h).__name__ == "MetricsWriter")
    bar = next(h for h in watcher.hooks if type(h).__name__ == "ProgressBar")
    assert writer.metrics.file is None and bar.bar is None  # closed
    assert [r["iter"] for r in _metrics(out)] == [1, 2, 3]
    assert load_checkpoint(out / "last.pth")["iter"] == 3
    assert not (out / "curves.png").exists()  # the end-of-run work is for completed runs
    assert not (out / LOCK_NAME).exists()  # the folder is free: resume it to the end
    result = train(_cfg(data, out, *opts), resume=True)
    assert result["iter"] == 5 and [r["iter"] for r in _metrics(out)] == [1, 2, 3, 4, 5]
    assert torch.isfinite(torch.tensor(result["loss"]))
