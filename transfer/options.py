"""What a detection run is asked to do: :class:`DetectOptions`, the flags of ``feataug detect``
as a frozen dataclass.

The command builds it from its parsed flags (:meth:`DetectOptions.from_args`); library callers
(``transfer.detect.run_detection``, the demo, the study) build it directly.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from transfer.weights import DetectError

__all__ = ["DetectOptions"]


def _strings(values: Sequence) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


@dataclass(frozen=True)
class DetectOptions:
    """The flags of ``feataug detect``, one field each.

    ``config_file``: the detection config (yaml). ``opts``: ``KEY VALUE`` config overrides.
    ``register_voc``: ``(NAME, ROOT, SPLIT)`` triples; ``register_coco``: ``(NAME, JSON,
    IMAGE_ROOT)``. ``num_gpus`` processes on each of ``num_machines`` machines (this one:
    ``machine_rank``), joined at ``dist_url``. ``resume``: continue OUTPUT_DIR's run from its last
    checkpoint. ``eval_only``: evaluate MODEL.WEIGHTS, no training. ``from_scratch``: train from
    random initialization (MODEL.WEIGHTS must be empty). ``trials``: train K times with seeds
    SEED..SEED+K-1. ``quiet``: Detectron2's log goes to ``OUTPUT_DIR/log.txt`` only, not to the
    console. ``argv``: the command line recorded in ``provenance.json`` (None: ``sys.argv``).
    Paths may be given as ``os.PathLike``; every value is kept as a string.
    """

    config_file: str
    opts: tuple[str, ...] = ()
    register_voc: tuple[tuple[str, str, str], ...] = ()
    register_coco: tuple[tuple[str, str, str], ...] = ()
    num_gpus: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    resume: bool = False
    eval_only: bool = False
    from_scratch: bool = False
    trials: int | None = None
    quiet: bool = False
    argv: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # frozen: the normalized values are set the way dataclasses set fields
        set_ = object.__setattr__
        set_(self, "config_file", os.fspath(self.config_file))
        set_(self, "opts", _strings(self.opts))
        set_(self, "register_voc", tuple(_strings(r) for r in self.register_voc))
        set_(self, "register_coco", tuple(_strings(r) for r in self.register_coco))
        if self.argv is not None:
            set_(self, "argv", _strings(self.argv))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DetectOptions:
        """The options of ``feataug detect``'s parsed flags (a leading ``--`` of the overrides
        dropped)."""
        opts = list(args.opts)
        if opts and opts[0] == "--":
            opts = opts[1:]
        return cls(
            config_file=args.config_file, opts=tuple(opts), register_voc=args.register_voc,
            register_coco=args.register_coco, num_gpus=args.num_gpus,
            num_machines=args.num_machines, machine_rank=args.machine_rank,
            dist_url=args.dist_url, resume=args.resume, eval_only=args.eval_only,
            from_scratch=args.from_scratch, trials=args.trials,
        )  # fmt: skip

    @property
    def world_size(self) -> int:
        """The number of processes the run trains in."""
        return self.num_gpus * self.num_machines

    def check(self) -> None:
        """Refuse flags that contradict each other, or processes this machine cannot run."""
        if self.trials is not None and self.trials < 1:
            raise DetectError(f"--trials must be >= 1, got {self.trials}")
        if self.trials is not None and self.eval_only:
            raise DetectError("--trials trains K models; it cannot be combined with --eval-only")
        if self.resume and self.eval_only:
            raise DetectError(
                "--eval-only with --resume would evaluate into the run's own folder, replacing "
                "its record: give MODEL.WEIGHTS DIR/model_final.pth and another OUTPUT_DIR"
            )
        if self.from_scratch and self.eval_only:
            raise DetectError(
                "--eval-only evaluates MODEL.WEIGHTS; it cannot be combined with --from-scratch"
            )
        if self.num_gpus < 1 or self.num_machines < 1 or not (
            0 <= self.machine_rank < self.num_machines
        ):
            raise DetectError(
                "need --num-gpus >= 1, --num-machines >= 1, 0 <= --machine-rank < --num-machines"
            )
        if self.world_size > 1:
            import torch

            if not torch.cuda.is_available():
                raise DetectError(
                    "multi-process training (--num-gpus/--num-machines > 1) needs CUDA GPUs"
                )
            if self.num_gpus > torch.cuda.device_count():
                raise DetectError(
                    f"--num-gpus {self.num_gpus} but {torch.cuda.device_count()} GPU(s) visible"
                )
