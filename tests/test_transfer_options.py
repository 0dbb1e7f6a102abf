"""``transfer.options``: the flags of ``feataug detect`` as a frozen dataclass."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from transfer import detect
from transfer.options import DetectOptions
from transfer.weights import DetectError


def _from_argv(argv: list[str]) -> DetectOptions:
    parser = argparse.ArgumentParser()
    detect.add_arguments(parser)
    return DetectOptions.from_args(parser.parse_args(argv))


def test_the_flags_become_the_fields():
    options = _from_argv(["--config-file", "c.yaml", "--register-voc", "n", "root", "trainval",
                          "--register-coco", "m", "a.json", "img", "--trials", "3", "--resume",
                          "--", "SOLVER.MAX_ITER", "2"])
    assert options == DetectOptions(
        "c.yaml", ("SOLVER.MAX_ITER", "2"), register_voc=(("n", "root", "trainval"),),
        register_coco=(("m", "a.json", "img"),), trials=3, resume=True)
    assert (options.world_size, options.quiet, options.argv, options.dist_url) == (1, False, None,
                                                                                   "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.trials = 4  # type: ignore[misc]


def test_paths_and_lists_are_kept_as_strings_and_tuples():
    options = DetectOptions(Path("c.yaml"), ["OUTPUT_DIR", Path("out")],
                            register_coco=[["x", Path("a.json"), Path("img")]], argv=["prog", 1])
    assert options.config_file == "c.yaml" and options.opts == ("OUTPUT_DIR", "out")
    assert options.register_coco == (("x", "a.json", "img"),) and options.argv == ("prog", "1")
    assert hash(options) == hash(DetectOptions("c.yaml", ("OUTPUT_DIR", "out"),
                                               register_coco=(("x", "a.json", "img"),),
                                               argv=("prog", "1")))


@pytest.mark.parametrize("fields, message", [
    ({"trials": 0}, "--trials must be >= 1, got 0"),
    ({"trials": 2, "eval_only": True}, "cannot be combined with --eval-only"),
    ({"resume": True, "eval_only": True}, "--eval-only with --resume would evaluate into"),
    ({"from_scratch": True, "eval_only": True}, "cannot be combined with --from-scratch"),
    ({"machine_rank": 1}, "0 <= --machine-rank < --num-machines"),
    ({"num_gpus": 0}, "need --num-gpus >= 1"),
])
def test_contradicting_flags_are_refused(fields, message):
    with pytest.raises(DetectError, match=message.replace("-", r"\-")):
        DetectOptions("c.yaml", **fields).check()
    DetectOptions("c.yaml").check()  # positive control


def test_run_detection_takes_options_or_their_short_form():
    with pytest.raises(TypeError, match="give a DetectOptions, or a config file"):
        detect.run_detection(DetectOptions("c.yaml"), ["SEED", "1"])
    with pytest.raises(DetectError, match="runs in this process; 2 processes"):
        detect.run_detection(DetectOptions("c.yaml", num_machines=2))
    with pytest.raises(DetectError, match="--trials must be >= 1"):  # the short form: the same
        detect.run_detection("c.yaml", (), trials=0)
