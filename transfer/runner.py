"""A detection run, once its config is built and checked (:func:`transfer.preflight.setup`):
train and evaluate once, or ``trials`` times with consecutive seeds, in every process.

Each run writes ``eval_results.json``, the config it ran (``config.yaml``, after rescaling for
the processes) and, on the main process, ``provenance.json`` and the head of ``log.txt``. With
``LOGGER.WANDB`` each run is a W&B run (``transfer.wandb_writer``): trial ``k`` is
``<name>/trial<k>`` in group ``<name>`` (``<name>``: ``LOGGER.WANDB_NAME``, else OUTPUT_DIR's
folder name, unless ``LOGGER.WANDB_GROUP`` is set); ``--eval-only`` logs its results.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pretrain.utils.io import atomic_write_text
from pretrain.utils.logger import close_log_files, setup_logging
from transfer import provenance
from transfer.options import DetectOptions
from transfer.preflight import setup
from transfer.schedule import rescale_for_world_size
from transfer.trials import plain, write_trials

__all__ = ["run", "worker"]

logger = logging.getLogger("transfer.detect")
LOGGERS = ("detectron2", "fvcore", "transfer", "d2")  # a detection run's log.txt takes these


def worker(options: DetectOptions) -> None:
    """Entry of every process started by ``launch``."""
    cfg = setup(options, records=False)  # spawned processes do not inherit the registrations
    run(cfg, options)


def run(cfg, options: DetectOptions) -> dict:
    """Train/evaluate once, or ``options.trials`` times; returns the results (rank 0)."""
    from detectron2.utils import comm

    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    # One set of handlers per run (in-process callers run several times): the log file always,
    # the console unless ``options.quiet`` (the demo and the study keep Detectron2 in files).
    record = None
    if comm.is_main_process():  # before logging opens log.txt: the header starts this run's part
        argv = None if options.argv is None else list(options.argv)
        record = provenance.collect(cfg, argv, comm.get_world_size())
        provenance.write(cfg.OUTPUT_DIR, record)
    setup_logging(LOGGERS, Path(cfg.OUTPUT_DIR) / "log.txt",
                  console=not options.quiet, main=comm.is_main_process())
    if record is not None:
        logger.info(f"provenance: {Path(cfg.OUTPUT_DIR, 'provenance.json')}")
    try:
        if not options.eval_only:
            _, lines = rescale_for_world_size(cfg, comm.get_world_size())
            logger.info(lines[0])
            for line in lines[1:]:
                logger.warning(line)
        if options.trials is None:
            return _run_once(cfg, options)
        return _run_trials(cfg, options, record)
    finally:
        close_log_files(LOGGERS)


def _run_trials(cfg, options: DetectOptions, record: dict | None) -> dict:
    """``options.trials`` runs, trial ``k`` with ``SEED`` base + k in ``OUTPUT_DIR/trial<k>``
    (resuming: a trial with results is not run again); their summary in ``trials.*``."""
    from detectron2.utils import comm

    base = cfg.SEED if cfg.SEED >= 0 else 0
    trials = []
    for k in range(options.trials):
        tcfg = cfg.clone()
        tcfg.defrost()
        tcfg.SEED = base + k
        tcfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, f"trial{k}")
        if cfg.LOGGER.WANDB:  # the trials of one command: one W&B group
            name = cfg.LOGGER.WANDB_NAME or Path(cfg.OUTPUT_DIR).resolve().name
            tcfg.LOGGER.WANDB_NAME = f"{name}/trial{k}"
            tcfg.LOGGER.WANDB_GROUP = cfg.LOGGER.WANDB_GROUP or name
        tcfg.freeze()
        if record is not None:
            provenance.write(tcfg.OUTPUT_DIR, record, log=False)
        done = Path(tcfg.OUTPUT_DIR, "eval_results.json")
        if options.resume and done.is_file():
            logger.info(f"trial {k}: results exist in {done}, skipped")
            results = json.loads(done.read_text())
        else:
            logger.info(f"trial {k + 1}/{options.trials}: seed {tcfg.SEED}, "
                        f"output {tcfg.OUTPUT_DIR}")
            results = _run_once(tcfg, options)
        trials.append(
            {"trial": k, "seed": tcfg.SEED, "output_dir": tcfg.OUTPUT_DIR, "results": results}
        )
    summary = write_trials(cfg.OUTPUT_DIR, trials, record) if comm.is_main_process() else None
    return {"trials": trials, "summary": summary}


def _run_once(cfg, options: DetectOptions) -> dict:
    """Train and evaluate (or only evaluate) ``cfg`` once; its results, also in
    ``eval_results.json``."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from transfer.checkpoint import SafeCheckpointer
    from transfer.trainer import Trainer

    rank = comm.get_rank()
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    if comm.is_main_process():  # the config as the trainer runs it (rescaled for the processes)
        ran = cfg if options.eval_only else rescale_for_world_size(cfg, comm.get_world_size())[0]
        atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), ran.dump())
    if options.eval_only:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).load(cfg.MODEL.WEIGHTS)
        results = Trainer.test(cfg, model)
        if cfg.LOGGER.WANDB and comm.is_main_process():
            from transfer.wandb_writer import WandbWriter

            writer = WandbWriter(cfg, resume=options.resume)
            writer.log_results(results)
            writer.close()
    else:
        trainer = Trainer(cfg)  # its checkpointer reads files safely; resuming needs this model
        trainer.resume_or_load(resume=options.resume)
        trainer.train()
        results = trainer.eval_results
    results = plain(results or {})
    if comm.is_main_process():
        atomic_write_text(
            os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), json.dumps(results, indent=2)
        )
    return results
