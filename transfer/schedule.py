"""Paper schedules on fewer GPUs: Detectron2's reference-world-size rescaling, checked before a
run starts and reported in one line when it runs.

The paper configs set ``SOLVER.REFERENCE_WORLD_SIZE 8`` (8 GPUs x 2 images); with N processes
Detectron2's ``DefaultTrainer.auto_scale_workers`` keeps 2 images per process and scales batch and
lr by N/8, the schedule by 8/N.
"""

from __future__ import annotations

from transfer.weights import DetectError

SCALED_KEYS = ("SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.MAX_ITER", "SOLVER.STEPS",
               "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD")  # fmt: skip


PROTOCOL_IMAGES_PER_GPU = 2  # the paper configs: 16 images on 8 GPUs


def check_schedule(cfg, world_size: int) -> None:
    """``IMS_PER_BATCH`` splits evenly over ``REFERENCE_WORLD_SIZE`` (when set) and over the
    processes that run it, and no lr step falls on the last iteration once rescaled (Detectron2's
    scheduler needs every step below ``MAX_ITER``)."""
    batch, reference = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE
    if reference < 0 or (reference and batch % reference):
        raise DetectError(
            f"SOLVER.IMS_PER_BATCH {batch} does not split over SOLVER.REFERENCE_WORLD_SIZE "
            f"{reference} processes (set REFERENCE_WORLD_SIZE 0 to use the batch as written)"
        )
    if not reference and batch % world_size:
        raise DetectError(
            f"SOLVER.IMS_PER_BATCH {batch} does not split over {world_size} processes"
        )
    scaled = rescale_for_world_size(cfg, world_size)[0].SOLVER
    if scaled.MAX_ITER in scaled.STEPS:
        rescaled = scaled.MAX_ITER != cfg.SOLVER.MAX_ITER
        where = f" ({scaled.MAX_ITER} once rescaled for {world_size} process(es))" * rescaled
        raise DetectError(
            f"SOLVER.STEPS {tuple(cfg.SOLVER.STEPS)} has a step at SOLVER.MAX_ITER "
            f"{cfg.SOLVER.MAX_ITER}{where}; every step must be below it"
        )


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return tuple(node) if isinstance(node, (list, tuple)) else node


def rescale_for_world_size(cfg, world_size: int):
    """``(config, lines)``: ``cfg`` as Detectron2's ``DefaultTrainer`` rescales it for
    ``world_size`` processes (``DefaultTrainer.auto_scale_workers``, the function its
    ``__init__`` applies), one line saying what changed (from -> to), and a warning line when
    a protocol config (``REFERENCE_WORLD_SIZE`` set) runs with other than 2 images per process.
    """
    from detectron2.engine import DefaultTrainer

    from transfer.weights import quiet_loggers

    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
    with quiet_loggers("detectron2"):  # its own "Auto-scaling the config" line; ours says more
        scaled = DefaultTrainer.auto_scale_workers(cfg, world_size)
    per_gpu = scaled.SOLVER.IMS_PER_BATCH / world_size
    per_text = f"{per_gpu:g} image(s) per process"
    changes = [
        f"{key.split('.')[-1]} {_get(cfg, key)} -> {_get(scaled, key)}"
        for key in SCALED_KEYS
        if _get(cfg, key) != _get(scaled, key)
    ]
    if not reference:
        line = (f"Schedule as written (SOLVER.REFERENCE_WORLD_SIZE 0): IMS_PER_BATCH "
                f"{cfg.SOLVER.IMS_PER_BATCH} over {world_size} process(es), {per_text}")
    elif not changes:
        line = (f"Schedule as written for {reference} processes (SOLVER.REFERENCE_WORLD_SIZE), "
                f"{per_text}")
    else:
        line = (f"Schedule rescaled from {reference} to {world_size} process(es) "
                f"(SOLVER.REFERENCE_WORLD_SIZE {reference}, {per_text}): " + ", ".join(changes))
    lines = [line]
    if reference and per_gpu != PROTOCOL_IMAGES_PER_GPU:
        lines.append(
            f"{per_text}, but the protocol trains {PROTOCOL_IMAGES_PER_GPU} per GPU "
            f"(16 on 8): BN statistics per process and the learning-rate scaling differ from "
            f"the published runs (SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} for "
            f"REFERENCE_WORLD_SIZE {reference})"
        )
    return scaled, lines
