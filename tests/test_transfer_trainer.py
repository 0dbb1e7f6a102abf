"""``transfer.trainer``: the run's own checkpoint resumes through the safe checkpointer, and the
last evaluation's results are public."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.detectron2, pytest.mark.usefixtures("one_thread")]

sys.path.insert(0, str(Path(__file__).parent))
from detect_data import make_voc  # noqa: E402

from transfer import datasets  # noqa: E402
from transfer.checkpoint import SafeCheckpointer  # noqa: E402
from transfer.config import get_detection_cfg  # noqa: E402
from transfer.detect import DetectOptions, run_detection  # noqa: E402
from transfer.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detection" / "tiny_faster_R18_FPN.yaml"
TINY = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1,)",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "128", "TEST.PRECISE_BN.ENABLED", "False",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "16", "TEST.DETECTIONS_PER_IMAGE", "5",
        "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('tr',)", "DATASETS.TEST", "('tr',)",
        "DATASETS.AUTO_NUM_CLASSES", "True"]  # fmt: skip


def test_the_trainer_loads_safely_and_keeps_its_results(tmp_path, catalog):
    make_voc(tmp_path / "voc", n_train=2, n_test=1)
    datasets.register_voc("tr", tmp_path / "voc", "trainval")
    cfg = get_detection_cfg(CONFIG, [*TINY, "MODEL.ROI_HEADS.NUM_CLASSES", "2",
                                     "OUTPUT_DIR", str(tmp_path / "t")])
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, SafeCheckpointer) and trainer.step_loop is None
    assert trainer.eval_results == {}
    assert trainer.evaluate() is trainer.eval_results and set(trainer.eval_results) == {"bbox"}


def test_a_run_resumes_from_its_own_checkpoint(tmp_path, catalog):
    """Two iterations, then --resume with three: the third starts from the saved state."""
    make_voc(tmp_path / "voc", n_train=2, n_test=1)
    out = tmp_path / "out"

    def run(max_iter: int, resume: bool) -> dict:
        return run_detection(DetectOptions(
            CONFIG, (*TINY, "SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", str(out)),
            register_voc=(("tr", tmp_path / "voc", "trainval"),), from_scratch=True,
            resume=resume, quiet=True))

    first = run(2, resume=False)
    assert set(first["bbox"]) == {"AP", "AP50", "AP75"}
    saved = torch.load(out / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 1
    second = run(3, resume=True)
    assert second == json.loads((out / "eval_results.json").read_text())
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 2" in log
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 2
    # the file it resumed from was rewritten (model_final, iteration 2): the resumed state did
    # not keep reading it
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 2
