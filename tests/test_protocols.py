"""Detection transfer as the papers run it: schedules rescaled for fewer GPUs, the named norm
protocols (each config as its source ships it, one CPU training step each), the C4 head's extra
norm from public Detectron2 parts, and what every output folder records."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2")
pytestmark = pytest.mark.detectron2

from detectron2.engine import DefaultTrainer  # noqa: E402
from detectron2.layers import NaiveSyncBatchNorm  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from detect_data import make_voc  # noqa: E402

from feataug import cli  # noqa: E402
from transfer import datasets, provenance, schedule, trials  # noqa: E402
from transfer.config import get_detection_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"

# Published schedules (8 GPUs x 2 images) and their 1-GPU and 4-GPU forms, computed by hand:
# batch and lr x N/8; iterations, steps, warmup and checkpoint period x 8/N (WARMUP_ITERS 1000
# and CHECKPOINT_PERIOD 5000 are Detectron2's defaults where a config does not set them).
VOC = dict(ims=16, lr=0.02, max_iter=24000, steps=(18000, 22000), warmup=100, ckpt=5000)
COCO_1X = dict(ims=16, lr=0.02, max_iter=90000, steps=(60000, 80000), warmup=1000, ckpt=5000)
COCO_2X = dict(ims=16, lr=0.02, max_iter=180000, steps=(120000, 160000), warmup=1000, ckpt=5000)
VOC_1 = dict(ims=2, lr=0.0025, max_iter=192000, steps=(144000, 176000), warmup=800, ckpt=40000)
COCO_1X_1 = dict(ims=2, lr=0.0025, max_iter=720000, steps=(480000, 640000), warmup=8000,
                 ckpt=40000)  # fmt: skip
COCO_2X_1 = dict(ims=2, lr=0.0025, max_iter=1440000, steps=(960000, 1280000), warmup=8000,
                 ckpt=40000)  # fmt: skip
PAPER = {
    "pascal_voc_R_50_C4_24k": (VOC, {
        1: VOC_1,
        4: dict(ims=8, lr=0.01, max_iter=48000, steps=(36000, 44000), warmup=200, ckpt=10000)}),
    "pascal_voc_R_50_C4_24k_moco": (VOC, {1: VOC_1}),
    "coco_R_50_C4_1x": (COCO_1X, {
        1: COCO_1X_1,
        4: dict(ims=8, lr=0.01, max_iter=180000, steps=(120000, 160000), warmup=2000, ckpt=10000)}),
    "coco_R_50_C4_1x_moco": (COCO_1X, {1: COCO_1X_1}),
    "coco_R_50_C4_2x": (COCO_2X, {1: COCO_2X_1}),
    "coco_R_50_C4_2x_moco": (COCO_2X, {1: COCO_2X_1}),
    "coco_R_50_FPN_1x": (COCO_1X, {1: COCO_1X_1}),
    "coco_R_50_FPN_1x_mmselfsup": (COCO_1X, {1: COCO_1X_1}),
}  # fmt: skip


def _schedule(cfg) -> dict:
    s = cfg.SOLVER
    return dict(ims=s.IMS_PER_BATCH, lr=round(s.BASE_LR, 12), max_iter=s.MAX_ITER,
                steps=tuple(s.STEPS),
                warmup=s.WARMUP_ITERS, ckpt=s.CHECKPOINT_PERIOD)  # fmt: skip


@pytest.mark.parametrize("name", PAPER)
def test_paper_schedules_rescale_for_fewer_gpus(name):
    cfg = get_detection_cfg(CONFIGS / f"{name}.yaml")
    written, scaled = PAPER[name]
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 8
    assert _schedule(cfg) == written
    assert _schedule(schedule.rescale_for_world_size(cfg, 8)[0]) == written
    for n, want in scaled.items():
        ours, lines = schedule.rescale_for_world_size(cfg, n)
        assert _schedule(ours) == want
        assert _schedule(DefaultTrainer.auto_scale_workers(cfg, n)) == want
        assert ours.SOLVER.REFERENCE_WORLD_SIZE == n and cfg.SOLVER.REFERENCE_WORLD_SIZE == 8
        assert len(lines) == 1  # 2 images per GPU: no warning
        line = lines[0]
        assert line.startswith(f"Schedule rescaled from 8 to {n} process(es)")
        assert "2 image(s) per process" in line
        for key, k in (("IMS_PER_BATCH", "ims"), ("MAX_ITER", "max_iter"),
                       ("STEPS", "steps"), ("WARMUP_ITERS", "warmup")):  # fmt: skip
            assert f"{key} {written[k]} -> {want[k]}" in line, key
        assert f"BASE_LR 0.02 -> {ours.SOLVER.BASE_LR}" in line


def test_other_images_per_gpu_warns():
    cfg = get_detection_cfg(CONFIGS / "pascal_voc_R_50_C4_24k.yaml", ["SOLVER.IMS_PER_BATCH", "8"])
    scaled, lines = schedule.rescale_for_world_size(cfg, 2)
    assert (scaled.SOLVER.IMS_PER_BATCH, scaled.SOLVER.MAX_ITER) == (2, 96000)  # 1 per GPU
    assert len(lines) == 2 and lines[1].startswith("1 image(s) per process, but the protocol")
    tiny = get_detection_cfg(CONFIGS / "tiny_faster_R18_FPN.yaml")
    same, lines = schedule.rescale_for_world_size(tiny, 1)
    assert _schedule(same) == _schedule(tiny) and len(lines) == 1
    assert lines[0].startswith("Schedule as written (SOLVER.REFERENCE_WORLD_SIZE 0)")


def test_schedules_that_cannot_run_are_refused(tmp_path, capsys):
    voc = ["detect", "--config-file", str(CONFIGS / "pascal_voc_R_50_C4_24k.yaml")]
    assert cli.main([*voc, "SOLVER.IMS_PER_BATCH", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("feataug detect: error: SOLVER.IMS_PER_BATCH 12 does not split over "
                   "SOLVER.REFERENCE_WORLD_SIZE 8 processes (set REFERENCE_WORLD_SIZE 0 to use "
                   "the batch as written)")  # fmt: skip
    assert cli.main([*voc, "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(5, 10)"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("feataug detect: error: SOLVER.STEPS (5, 10) has a step at SOLVER.MAX_ITER 10 "
                   "(80 once rescaled for 1 process(es)); every step must be below it")  # fmt: skip


def test_trainer_applies_the_rescaling(tmp_path, catalog):
    """Our Trainer (Detectron2's DefaultTrainer underneath) trains the rescaled schedule: a
    config for 2 processes x 2 images runs on this one process with batches of 2, twice the
    iterations and half the learning rate."""
    from transfer.trainer import Trainer

    make_voc(tmp_path / "voc")
    datasets.register_voc("proto_train", tmp_path / "voc", "trainval")
    cfg = get_detection_cfg(CONFIGS / "tiny_faster_R18_FPN.yaml", [
        "DATASETS.TRAIN", "('proto_train',)", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path),
        "SOLVER.REFERENCE_WORLD_SIZE", "2", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.01",
        "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(6, 8)", "SOLVER.WARMUP_ITERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128"])  # fmt: skip
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    trainer = Trainer(cfg)
    assert _schedule(trainer.cfg) == dict(ims=2, lr=0.005, max_iter=20, steps=(12, 16), warmup=4,
                                          ckpt=200000)  # fmt: skip
    assert trainer.max_iter == 20
    assert all(g["initial_lr"] == pytest.approx(0.005) for g in trainer.optimizer.param_groups)
    assert len(next(iter(trainer.data_loader))) == 2


# ------------------------------------------------------------------------- norm protocols

# Each config's norms as its source ships them (read from the sources' configs):
# MoCo (facebookresearch/moco detection/configs): RESNETS.NORM naiveSyncBN (also the res5 norm);
# PixPro / DenseCL / mmselfsup C4: SyncBN; PixPro / DenseCL FPN: SyncBN in backbone, FPN,
# 4conv1fc box head and mask head; mmselfsup's Detectron2 FPN: SyncBN backbone and FPN, 2fc box
# head and mask head without norm.
PROTOCOLS = {
    "pascal_voc_R_50_C4_24k": dict(norm="SyncBN", mask=False),
    "pascal_voc_R_50_C4_24k_moco": dict(norm="naiveSyncBN", mask=False),
    "coco_R_50_C4_1x_moco": dict(norm="naiveSyncBN", mask=True),
    "coco_R_50_C4_2x_moco": dict(norm="naiveSyncBN", mask=True),
    "coco_R_50_FPN_1x": dict(norm="SyncBN", mask=True, fpn="SyncBN", conv=4, fc=1,
                             box="SyncBN", mask_norm="SyncBN"),
    "coco_R_50_FPN_1x_mmselfsup": dict(norm="SyncBN", mask=True, fpn="SyncBN", conv=0, fc=2,
                                       box="", mask_norm=""),
}  # fmt: skip
NORM_CLASS = {"SyncBN": torch.nn.SyncBatchNorm, "naiveSyncBN": NaiveSyncBatchNorm}
# one CPU step: small images, few proposals and ROIs
STEP = ["MODEL.DEVICE", "cpu", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "64",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "16", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3"]  # fmt: skip


def _batch(mask: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=g)
        inst = Instances((96, 96))
        boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]])
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, 2])
        if mask:
            masks = torch.zeros(2, 96, 96, dtype=torch.bool)
            for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
                m[y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "height": 96, "width": 96, "instances": inst})
    return batch


@pytest.mark.parametrize("name", PROTOCOLS)
def test_named_protocol_builds_and_trains_one_cpu_step(name, one_thread):
    want = PROTOCOLS[name]
    cfg = get_detection_cfg(CONFIGS / f"{name}.yaml", STEP)
    header = (CONFIGS / f"{name}.yaml").read_text().split("\n_BASE_")[0]
    assert header.startswith("#") and re.search(r"MoCo|PixPro|DenseCL|mmselfsup", header)
    assert cfg.MODEL.RESNETS.NORM == want["norm"] and cfg.MODEL.MASK_ON == want["mask"]
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.TEST.PRECISE_BN.ENABLED
    torch.manual_seed(0)
    model = build_model(cfg).train()
    norm = NORM_CLASS[want["norm"]]
    # Detectron2's get_norm: "SyncBN" is torch's SyncBatchNorm, "naiveSyncBN" its own class
    assert isinstance(model.backbone.bottom_up.stem.conv1.norm if "fpn" in want
                      else model.backbone.stem.conv1.norm, norm)  # fmt: skip
    if "fpn" not in want:  # C4: the extra norm after res5, of the backbone's kind
        assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"
        watched = model.roi_heads.res5.norm
        assert type(watched) is norm and watched.num_features == 2048
    else:
        head = model.roi_heads.box_head
        assert (len(head.conv_norm_relus), len(head.fcs)) == (want["conv"], want["fc"])
        assert isinstance(model.backbone.fpn_lateral2.norm, NORM_CLASS[want["fpn"]])
        for conv in head.conv_norm_relus:
            assert isinstance(conv.norm, NORM_CLASS[want["box"]])
        mask_convs = [m for n, m in model.roi_heads.mask_head.named_children()
                      if n.startswith("mask_fcn")]  # fmt: skip
        assert len(mask_convs) == 4
        assert all((c.norm is None) == (want["mask_norm"] == "") for c in mask_convs)
        watched = model.backbone.bottom_up.res5[0].conv1.norm
    before = watched.running_mean.clone()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    with EventStorage(0):  # the heads log training statistics there
        losses = model(_batch(want["mask"]))
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert ("loss_mask" in losses) == want["mask"]
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert not torch.equal(before, watched.running_mean)  # the norm ran in training mode
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), params[n])]
    assert any(n.startswith("backbone.") for n in moved)
    assert any("box_predictor" in n for n in moved)


def test_extra_norm_is_built_from_public_parts(caplog):
    """res5 is Detectron2's three blocks followed by the norm; its forward is blocks then norm;
    no warning about private methods."""
    import logging

    caplog.set_level(logging.WARNING)
    cfg = get_detection_cfg(CONFIGS / "pascal_voc_R_50_C4_24k_moco.yaml", STEP)
    model = build_model(cfg).eval()
    res5 = model.roi_heads.res5
    names = [n for n, _ in res5.named_children()]
    assert names == ["0", "1", "2", "norm"]
    assert "private" not in caplog.text
    with torch.no_grad():
        torch.nn.init.normal_(res5.norm.weight)
        res5.norm.running_mean.uniform_(-1, 1)
        x = torch.randn(2, 1024, 8, 8)
        y = x
        for block in list(res5.children())[:3]:
            y = block(y)
        want = torch.nn.functional.batch_norm(y, res5.norm.running_mean, res5.norm.running_var,
                                              res5.norm.weight, res5.norm.bias, False, 0.0,
                                              res5.norm.eps)  # fmt: skip
        torch.testing.assert_close(res5(x), want)
    keys = [k for k in model.state_dict() if k.startswith("roi_heads.res5.norm.")]
    assert sorted(keys) == sorted(f"roi_heads.res5.norm.{p}" for p in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"))


# ------------------------------------------------------------------------------ provenance


def test_provenance_record(tmp_path):
    weights = tmp_path / "w.pkl"
    weights.write_bytes(bytes(range(256)) * 4097)
    cfg = get_detection_cfg(CONFIGS / "tiny_faster_R18_FPN.yaml", ["MODEL.WEIGHTS", str(weights)])
    argv = ["feataug", "detect", "--config-file", "x y.yaml", "MODEL.WEIGHTS", str(weights)]
    record = provenance.collect(cfg, argv, world_size=1)
    assert record["command"] == argv and record["command_line"].count("'x y.yaml'") == 1
    assert record["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["weights"]["path"] == str(weights)
    from importlib import metadata

    import detectron2
    import faster_coco_eval
    import numpy
    import torchvision

    assert record["versions"] == {
        "feataug": metadata.version("feataug"), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "detectron2": detectron2.__version__, "faster-coco-eval": faster_coco_eval.__version__,
        "numpy": numpy.__version__}  # fmt: skip
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    assert record["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert "PyTorch" in record["env"] and "detectron2" in record["env"]
    provenance.write(tmp_path / "out", record)
    assert json.loads((tmp_path / "out" / "provenance.json").read_text()) == record
    log = (tmp_path / "out" / "log.txt").read_text()
    assert log.startswith("provenance: feataug detect --config-file 'x y.yaml'")
    assert f"sha256 {record['weights']['sha256']}" in log.splitlines()[2]
    empty = provenance.collect(get_detection_cfg(CONFIGS / "tiny_faster_R18_FPN.yaml"), argv)
    assert empty["weights"] == {"path": "", "file": None, "sha256": None}


# ---------------------------------------------------------------------------------- trials


def test_trials_table_and_plot(tmp_path):
    from PIL import Image

    runs = [{"trial": k, "seed": 7 + k, "output_dir": "x",
             "results": {"bbox": {"AP": ap, "AP50": ap + 20, "AP75": None, "AP-cat": 1.0}}}
            for k, ap in enumerate([40.0, 44.0])]  # fmt: skip
    summary = trials.write_trials(tmp_path, runs, {"command": ["feataug"]})
    rows = {}
    for line in (tmp_path / "trials.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")] if line.startswith("|") else []
        if cells and not set(cells[0]) <= {"-", ":"}:
            rows[cells[0]] = cells[1:]
    assert rows["metric"] == ["mean ± std", "seed 7", "seed 8"]
    assert rows["bbox/AP"] == ["42.00 ± 2.83", "40.00", "44.00"]  # sd = sqrt(8) = 2.83
    assert rows["bbox/AP75"] == ["n/a", "n/a", "n/a"]
    doc = json.loads((tmp_path / "trials.json").read_text())
    assert doc["provenance"] == {"command": ["feataug"]} and summary["bbox/AP"]["std"] == 8**0.5
    assert trials.plot_trials(tmp_path / "p.png", summary, [7, 8]) == ["bbox/AP", "bbox/AP50"]
    with Image.open(tmp_path / "trials.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    one = trials.summarize_trials([{"bbox/AP": 40.0}])
    assert one["bbox/AP"]["std"] is None
    assert "40.00 ± n/a" in trials.format_trials_markdown(one, [0])
    assert trials.plot_trials(tmp_path / "one.png", one, [0]) == ["bbox/AP"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.png", "p.png", "trials.json", "trials.md", "trials.png"]  # no temporary leftovers
