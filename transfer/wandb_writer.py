"""``feataug detect`` to Weights & Biases (``LOGGER.WANDB``): :class:`WandbWriter`, a Detectron2
``EventWriter`` beside its JSON and TensorBoard writers.

Like Detectron2's ``TensorboardXWriter`` it reads the event storage (``get_event_storage``) at
every ``write``: the latest value of each scalar (smoothed over ``window_size`` iterations where
the storage says so) that is newer than the last write, each at its iteration as the W&B step;
the evaluation's scalars (``bbox/AP``, ...) come the same way, from ``EvalHook``. The results of
every evaluation also go to the run's summary (:meth:`WandbWriter.log_results`). The run is the
one of ``OUTPUT_DIR`` (``pretrain.utils.tracking``): with ``resume`` it goes on under the id kept
there. Detectron2 builds its writers on the main process only.
"""

from __future__ import annotations

from collections import defaultdict

from detectron2.utils.events import EventWriter, get_event_storage

from pretrain.utils.tracking import open_run

__all__ = ["WandbWriter"]


class WandbWriter(EventWriter):
    """Scalars of Detectron2's event storage, and evaluation results, to the W&B run of
    ``cfg.OUTPUT_DIR`` (opened at the first write; ``resume`` may be set until then)."""

    def __init__(self, cfg, resume: bool = False, window_size: int = 20) -> None:
        self.cfg, self.resume, self.window_size = cfg, resume, window_size
        self.run = None
        self._last_write = -1  # the last iteration written

    def _open(self):
        if self.run is None:
            self.run = open_run(self.cfg, self.cfg.OUTPUT_DIR, self.resume, job_type="detect")
        return self.run

    def write(self) -> None:
        storage = get_event_storage()
        rows: dict[int, dict] = defaultdict(dict)
        for key, (value, it) in storage.latest_with_smoothing_hint(self.window_size).items():
            if it > self._last_write:
                rows[it][key] = value
        if not rows:
            return
        run = self._open()
        for it in sorted(rows):  # W&B steps only go up
            run.log(rows[it], step=it)
        self._last_write = max(rows)

    def log_results(self, results: dict) -> None:
        """An evaluation's results (the evaluators' nested dict) in the run's summary, flat
        (``bbox/AP``, ...); the last evaluation's values stay."""
        from detectron2.evaluation.testing import flatten_results_dict

        flat = flatten_results_dict(results or {})
        self._open().summary.update({k: float(v) for k, v in flat.items()})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
