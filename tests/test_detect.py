"""Detection transfer: configs, datasets, VOC evaluation, trainer, ``feataug detect``."""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")
pytestmark = pytest.mark.detectron2

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from detect_data import CLASSES, make_coco, make_voc  # noqa: E402

from feataug import cli  # noqa: E402
from pretrain.utils.amp import amp_dtype, cpu_has_native_bf16  # noqa: E402
from transfer import datasets, detect, trials  # noqa: E402
from transfer.config import ConfigError, get_detection_cfg  # noqa: E402
from transfer.evaluation import VOCEvaluator, voc_average_precisions  # noqa: E402
from transfer.trainer import CPUAutocastTrainer  # noqa: E402


def voc_average_precision(detections, gt_boxes, gt_difficult, iou_threshold, use_07_metric):
    """``voc_average_precisions`` at one IoU threshold."""
    return voc_average_precisions(detections, gt_boxes, gt_difficult, [iou_threshold],
                                  use_07_metric)[0]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
TINY_CFG = CONFIGS / "tiny_faster_R18_FPN.yaml"
PAPER_CONFIGS = ["pascal_voc_R_50_C4_24k", "coco_R_50_C4_1x", "coco_R_50_C4_2x", "coco_R_50_FPN_1x"]
# Tiny-run overrides: small images, few proposals and detections, 2 iterations.
TINY = [
    "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "(1,)", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "256",
    "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "256", "TEST.PRECISE_BN.NUM_ITER", "1",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "TEST.DETECTIONS_PER_IMAGE", "10",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.DEVICE", "cpu",
]  # fmt: skip


def _parse(argv):
    parser = argparse.ArgumentParser(prog="feataug detect")
    detect.add_arguments(parser)
    return parser.parse_args(argv)


def _options(argv) -> detect.DetectOptions:
    """The options `feataug detect ARGV` runs with."""
    return detect.DetectOptions.from_args(_parse(argv))


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory):
    """A torchvision ResNet-18 (random, with non-trivial BN statistics) and its conversion."""
    convert = pytest.importorskip("transfer.convert")
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folder = tmp_path_factory.mktemp("weights")
    torch.save(net.state_dict(), folder / "r18.pth")
    convert.convert(folder / "r18.pth", folder / "r18.pkl")
    return net.eval(), folder / "r18.pkl"


# --------------------------------------------------------------------------------- configs
def test_tiny_config_reproduces_torchvision_trunk(r18_weights):
    """Converted R18 weights in the tiny config: Detectron2's preprocessing + res5 equals
    torchvision's normalized input + trunk (RGB, torchvision mean/std, STRIDE_IN_1X1 False)."""
    net, pkl = r18_weights
    for name in ("tiny_faster_R18_FPN", "tiny_mask_R18_FPN"):
        cfg = get_detection_cfg(
            CONFIGS / f"{name}.yaml", ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(pkl)]
        )
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(str(pkl))
        model.double()  # the same function both ways: compared in float64, from the config's
        for name in ("pixel_mean", "pixel_std"):  # values (Detectron2 made float32 buffers)
            setattr(model, name, torch.tensor(cfg.MODEL[name.upper()], dtype=torch.float64)[:, None, None])
        image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)  # RGB
        with torch.no_grad():
            ours = model.backbone.bottom_up(model.preprocess_image([{"image": image}]).tensor)[
                "res5"
            ]
            mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
            x = ((image.double() / 255 - mean) / std)[None]
            trunk = copy.deepcopy(torch.nn.Sequential(*list(net.children())[:-2])).double()
            ref = trunk(x)
        assert ours.shape == ref.shape and ours.dtype == torch.float64
        # float64 sums of <= 4608 products, 18 layers: ~4608 * 18 * eps64 ~ 2e-11 of the largest
        # feature; a wrong mean, std, channel order or weight is O(1) off
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))


def test_paper_configs_values():
    voc = get_detection_cfg(CONFIGS / "pascal_voc_R_50_C4_24k.yaml")
    assert voc.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
    assert voc.DATASETS.TEST == ("voc_2007_test",)
    assert (
        tuple(voc.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
        and voc.INPUT.MIN_SIZE_TEST == 800
    )
    assert (voc.SOLVER.MAX_ITER, tuple(voc.SOLVER.STEPS)) == (24000, (18000, 22000))
    assert (voc.SOLVER.IMS_PER_BATCH, voc.SOLVER.BASE_LR, voc.SOLVER.WARMUP_ITERS) == (
        16,
        0.02,
        100,
    )
    for name in PAPER_CONFIGS:
        cfg = get_detection_cfg(CONFIGS / f"{name}.yaml")
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.INPUT.FORMAT == "RGB"
        assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530]
        assert cfg.MODEL.PIXEL_STD == [58.395, 57.120, 57.375]
        assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.MODEL.RESNETS.NORM == "SyncBN"
        assert cfg.TEST.PRECISE_BN.ENABLED and cfg.MODEL.RESNETS.DEPTH == 50
        assert cfg.MODEL.MASK_ON == name.startswith("coco")
    c2 = get_detection_cfg(CONFIGS / "coco_R_50_C4_2x.yaml")
    assert (c2.SOLVER.MAX_ITER, tuple(c2.SOLVER.STEPS)) == (180000, (120000, 160000))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_builds_and_runs(name):
    """Each paper-scale config builds on CPU and runs one inference pass at 128 px."""
    torch.manual_seed(0)
    cfg = get_detection_cfg(
        CONFIGS / f"{name}.yaml",
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.RPN.PRE_NMS_TOPK_TEST",
            "64",
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            "8",
        ],
    )
    model = build_model(cfg).eval()
    calls = []
    if "C4" in name:
        assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"
        norm = model.roi_heads.res5.norm
        assert isinstance(norm, torch.nn.SyncBatchNorm) and norm.num_features == 2048
        norm.register_forward_hook(lambda *a: calls.append(1))
    else:
        head = model.roi_heads.box_head
        assert len(head.conv_norm_relus) == 4 and len(head.fcs) == 1
        assert isinstance(head.conv_norm_relus[0].norm, torch.nn.SyncBatchNorm)
        assert isinstance(model.backbone.fpn_lateral2.norm, torch.nn.SyncBatchNorm)
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 128, "width": 128}])
    fields = set(out["instances"].get_fields())
    assert {"pred_boxes", "scores", "pred_classes"} <= fields
    assert ("pred_masks" in fields) == cfg.MODEL.MASK_ON
    if "C4" in name:
        assert calls, "the extra norm after res5 did not run"


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        get_detection_cfg(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        get_detection_cfg(bad)
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        get_detection_cfg(CONFIGS / "tiny_faster_R18_FPN.yaml", ["SOLVER.MAX_ITER"])
    with pytest.raises(ConfigError, match="SOLVER.AMP.PRECISION"):
        get_detection_cfg(CONFIGS / "tiny_faster_R18_FPN.yaml", ["SOLVER.AMP.PRECISION", "fp8"])


def test_bad_override_is_named_not_the_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        get_detection_cfg(TINY_CFG, ["SOLVER.MAX_ITER", "10", "SOLVER.AMP.PRECISION", "fp8"])
    assert str(e.value).startswith("command-line override SOLVER.AMP.PRECISION fp8: ")
    assert TINY_CFG.name not in str(e.value)
    with pytest.raises(ConfigError, match=r"^command-line override SOLVER.MAX_ITER ten: Type"):
        get_detection_cfg(TINY_CFG, ["SOLVER.MAX_ITER", "ten"])
    yaml = tmp_path / "amp.yaml"
    yaml.write_text(f'_BASE_: "{TINY_CFG}"\nSOLVER:\n  AMP:\n    PRECISION: fp8\n')
    with pytest.raises(ConfigError, match=rf"^{yaml}: SOLVER.AMP.PRECISION must be"):
        get_detection_cfg(yaml)
    assert get_detection_cfg(yaml, ["SOLVER.AMP.PRECISION", "auto"]).SOLVER.AMP.PRECISION == "auto"


# -------------------------------------------------------------------------------- datasets
def test_voc_reader_tolerates_real_exports(tmp_path, catalog):
    truth = make_voc(tmp_path / "voc")
    datasets.register_voc("t_voc_2007_trainval", tmp_path / "voc", "trainval")
    meta = MetadataCatalog.get("t_voc_2007_trainval")
    assert meta.thing_classes == sorted(CLASSES) and meta.year == 2007
    assert meta.evaluator_type == "pascal_voc"
    records = DatasetCatalog.get("t_voc_2007_trainval")
    assert [r["image_id"] for r in records] == ["002000", "002001", "002002", "002003"]
    assert records[1]["file_name"].endswith("002001.png")  # any image extension
    assert (records[0]["width"], records[0]["height"]) == (160, 160)  # no <size>: read from image
    for r in records:
        got = [(meta.thing_classes[a["category_id"]], *a["bbox"]) for a in r["annotations"]]
        assert got == [
            (c, float(x0), float(y0), float(x1), float(y1))
            for c, x0, y0, x1, y1 in truth[r["image_id"]]
        ]
        assert all(a["difficult"] is False for a in r["annotations"])  # empty / missing <difficult>
    datasets.register_voc("t_voc_test", tmp_path / "voc", "test")
    assert MetadataCatalog.get("t_voc_test").year == 2012


def test_voc_reader_errors(tmp_path, catalog):
    make_voc(tmp_path / "voc")
    root = tmp_path / "voc"
    with pytest.raises(datasets.DatasetError, match=r"nosplit.txt: split file not found"):
        datasets.register_voc("a", root, "nosplit")
    with pytest.raises(datasets.DatasetError, match="Annotations: folder not found"):
        datasets.register_voc("a", tmp_path, "trainval")
    names = tmp_path / "names.txt"
    names.write_text("red box\n")
    datasets.register_voc("b", root, "trainval", names)
    with pytest.raises(
        datasets.DatasetError, match=r"\.xml: class 'blue ellipse' is not among the 1 classes"
    ):
        DatasetCatalog.get("b")
    with pytest.raises(datasets.DatasetError, match="already registered"):
        datasets.register_voc("b", root, "trainval")
    xml = root / "Annotations" / "002002.xml"
    text = xml.read_text()
    xml.write_text(text.replace("<xmax>", "<xmax>x", 1))
    with pytest.raises(
        datasets.DatasetError, match=r"002002\.xml: object 0 .* <xmax> is not a number"
    ):
        datasets.voc_class_names_from_data(root)
    for tag, value, words in [("xmin", "nan", "<xmin> is not a finite number: 'nan'"),
                              ("width", "inf", "<size> <width> is not a finite number: 'inf'")]:
        xml.write_text(re.sub(f"<{tag}>[^<]*", f"<{tag}>{value}", text, count=1))
        with pytest.raises(datasets.DatasetError, match=re.escape(words)):
            datasets.load_voc(root, "trainval", CLASSES)
    xml.write_text(re.sub("<difficult>[^<]*", "<difficult>inf", text, count=1))
    with pytest.raises(datasets.DatasetError, match=r"<difficult> is 'inf'"):
        datasets.load_voc(root, "trainval", CLASSES)
    xml.write_text("<annotation><object>")
    with pytest.raises(datasets.DatasetError, match=r"002002\.xml: invalid XML"):
        datasets.load_voc(root, "trainval", CLASSES)
    (root / "Annotations" / "002002.xml").unlink()
    with pytest.raises(datasets.DatasetError, match=r"002002\.xml: annotation file not found"):
        datasets.load_voc(root, "trainval", CLASSES)
    (root / "JPEGImages" / "002003.jpg").unlink()
    (root / "ImageSets" / "Main" / "one.txt").write_text("002003\n")
    with pytest.raises(datasets.DatasetError, match="no image for id '002003'"):
        datasets.load_voc(root, "one", CLASSES)


def test_standard_voc_names(tmp_path, catalog):
    """voc_2007_* / voc_2012_* under DETECTRON2_DATASETS, as the VOC07+12 config names them."""
    voc_names = datasets.VOC_CLASS_NAMES
    make_voc(tmp_path / "VOC2007", classes=("person", "car"))
    make_voc(tmp_path / "VOC2012", classes=("dog", "cat"), seed=1)
    (tmp_path / "VOC2012/ImageSets/Main/test.txt").unlink()
    done = datasets.register_standard_voc(tmp_path)
    assert done == ["voc_2007_trainval", "voc_2007_test", "voc_2012_trainval"]
    cfg = get_detection_cfg(CONFIGS / "pascal_voc_R_50_C4_24k.yaml")
    sizes = {}
    for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(voc_names) and meta.evaluator_type == "pascal_voc"
        assert meta.year == int(name[4:8])
        records = DatasetCatalog.get(name)
        assert all("difficult" in a for r in records for a in r["annotations"])
        sizes[name] = len(records)
    assert sizes == {"voc_2007_trainval": 4, "voc_2012_trainval": 4, "voc_2007_test": 3}


def test_register_coco(tmp_path, catalog):
    gt = make_coco(tmp_path, "val", n_images=2)
    datasets.register_coco("t_coco", gt, tmp_path / "images")
    meta = MetadataCatalog.get("t_coco")
    assert meta.thing_classes == ["red box", "blue ellipse"]  # sorted by category id (3, 7)
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1} and meta.evaluator_type == "coco"
    records = DatasetCatalog.get("t_coco")  # Detectron2's loader agrees with the metadata
    assert len(records) == 2 and {a["category_id"] for r in records for a in r["annotations"]} <= {
        0,
        1,
    }
    with pytest.raises(datasets.DatasetError, match="missing.json: file not found"):
        datasets.register_coco("x", tmp_path / "missing.json", tmp_path / "images")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(datasets.DatasetError, match="bad.json: not valid JSON"):
        datasets.register_coco("x", bad, tmp_path / "images")
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(datasets.DatasetError, match="bad.json: missing or malformed 'categories'"):
        datasets.register_coco("x", bad, tmp_path / "images")
    with pytest.raises(datasets.DatasetError, match="nodir: image folder not found"):
        datasets.register_coco("x", gt, tmp_path / "nodir")


# ------------------------------------------------------------------------------ VOC metric
def test_voc_average_precision_by_hand():
    """Three detections on two boxes: TP, FP, TP -> recall (.5, .5, 1), precision (1, .5, 2/3)."""
    gt = {"a": np.array([[1.0, 1, 10, 10], [21, 21, 30, 30]])}
    difficult = {"a": np.array([False, False])}
    dets = [
        ("a", 0.9, np.array([1.0, 1, 10, 10])),
        ("a", 0.8, np.array([50.0, 50, 60, 60])),
        ("a", 0.7, np.array([21.0, 21, 30, 31])),  # IoU 100/110
    ]
    ap07 = voc_average_precision(dets, gt, difficult, 0.5, use_07_metric=True)
    assert ap07 == pytest.approx((6 * 1.0 + 5 * (2 / 3)) / 11)
    assert voc_average_precision(dets, gt, difficult, 0.5, False) == pytest.approx(
        0.5 + 0.5 * 2 / 3
    )
    # above the third detection's IoU it is a false positive: recall stays at 0.5
    assert voc_average_precision(dets, gt, difficult, 0.95, False) == pytest.approx(0.5)
    # a detection on a difficult box is neither TP nor FP, and the box is not counted in recall
    difficult = {"a": np.array([False, True])}
    assert voc_average_precision(dets, gt, difficult, 0.5, False) == pytest.approx(1.0)
    # a duplicate detection of a taken box is a false positive
    dup = [dets[0], ("a", 0.85, np.array([1.0, 1, 10, 10]))]
    assert voc_average_precision(
        dup, gt, {"a": np.array([False, False])}, 0.5, True
    ) == pytest.approx(6 / 11)
    assert math.isnan(voc_average_precision(dets, gt, {"a": np.array([True, True])}, 0.5, True))


def _predictions(records, rng, jitter):
    """Per record: one noisy detection per ground-truth box plus one random box."""
    outputs = []
    for r in records:
        boxes, classes = [], []
        for a in r["annotations"]:
            boxes.append(np.array(a["bbox"]) + rng.normal(0, jitter, 4))
            classes.append(a["category_id"])
        boxes.append(np.array([5.0, 5.0, 60.0, 70.0]))
        classes.append(int(rng.integers(2)))
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor(np.array(boxes), dtype=torch.float32))
        inst.scores = torch.tensor(rng.uniform(0.1, 1.0, len(boxes)), dtype=torch.float32)
        inst.pred_classes = torch.tensor(classes)
        outputs.append({"instances": inst})
    return [{"image_id": r["image_id"]} for r in records], outputs


@pytest.mark.parametrize("year", [2007, 2012])
def test_voc_evaluator_matches_detectron2(tmp_path, catalog, year):
    """On integer VOC data with difficult objects our evaluator equals Detectron2's own."""
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    make_voc(tmp_path / "voc", n_train=2, n_test=8, clean=True)
    datasets.register_voc("clean", tmp_path / "voc", "test", year=year)
    records = DatasetCatalog.get("clean")
    assert any(a["difficult"] for r in records for a in r["annotations"])
    inputs, outputs = _predictions(records, np.random.default_rng(year), jitter=4.0)
    results = []
    for evaluator in (VOCEvaluator("clean"), PascalVOCDetectionEvaluator("clean")):
        evaluator.reset()
        evaluator.process(inputs, outputs)
        results.append(evaluator.evaluate()["bbox"])
    ours, theirs = results
    assert 5 < ours["AP50"] < 100  # a non-trivial case
    for key in ("AP", "AP50", "AP75"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9)


def test_voc_evaluator_on_float_coordinates(tmp_path, catalog):
    """Float coordinates and empty <difficult/>: perfect detections score 100, none score 0."""
    make_voc(tmp_path / "voc")
    datasets.register_voc("messy_2007", tmp_path / "voc", "test")
    records = DatasetCatalog.get("messy_2007")
    inputs, outputs = _predictions(records, np.random.default_rng(0), jitter=0.0)
    for o in outputs:  # drop the random box
        o["instances"] = o["instances"][:-1]
    ev = VOCEvaluator("messy_2007")
    ev.reset()
    ev.process(inputs, outputs)
    assert ev.evaluate()["bbox"] == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    ev.reset()
    assert ev.evaluate()["bbox"] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


# --------------------------------------------------------------------------------- trainer
def test_cpu_autocast_trainer_step():
    """Forward under bfloat16 autocast; float32 parameters get gradients and an SGD step."""
    seen = {}

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, batch):
            y = self.fc(batch)
            seen["autocast"] = torch.is_autocast_enabled("cpu")
            seen["dtype"] = y.dtype
            return {"loss_a": y.float().pow(2).mean(), "loss_b": y.float().abs().mean()}

    from detectron2.utils.events import EventStorage

    model = Toy()
    ref = Toy()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(8, 4)
    trainer = CPUAutocastTrainer(model, [x] * 2, torch.optim.SGD(model.parameters(), lr=0.1))
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
    assert seen == {"autocast": True, "dtype": torch.bfloat16}
    assert {"loss_a", "loss_b", "total_loss"} <= set(storage.latest())
    assert not torch.is_autocast_enabled("cpu")
    # the same as one SGD step on the float32 gradient of the bfloat16 forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = ref(x)
    sum(losses.values()).backward()
    assert model.fc.weight.dtype == torch.float32
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad)


def test_amp_dtype_policy():
    precision = get_detection_cfg(CONFIGS / "tiny_faster_R18_FPN.yaml").SOLVER.AMP.PRECISION
    assert precision == "auto"
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert amp_dtype(precision, "cuda") == (torch.bfloat16 if cuda_bf16 else torch.float16)
    assert amp_dtype(precision, "cpu") == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert amp_dtype("bfloat16", "cpu") == torch.bfloat16 == amp_dtype("bfloat16", "cuda")
    assert amp_dtype("off", "cuda") is None


def test_cpu_bf16_follows_the_onednn_isa_cap(monkeypatch):
    """``auto`` on the CPU: no bfloat16 under an ONEDNN_MAX_CPU_ISA (or DNNL_) below
    AVX512_CORE_BF16, where oneDNN emulates it, whatever this CPU has; above it the CPU's flags."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    host = bool(flags & {"avx512_bf16", "amx_bf16"})
    cases = [("ONEDNN_MAX_CPU_ISA", "AVX2", False), ("ONEDNN_MAX_CPU_ISA", "sse41", False),
             ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE", False), ("DNNL_MAX_CPU_ISA", "AVX2", False),
             ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", host), ("ONEDNN_MAX_CPU_ISA", "ALL", host)]
    try:
        for name, isa, want in cases:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
            monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
            monkeypatch.setenv(name, isa)
            cpu_has_native_bf16.cache_clear()
            assert cpu_has_native_bf16() is want, isa
            assert amp_dtype("auto", "cpu") == (torch.bfloat16 if want else None), isa
    finally:
        monkeypatch.undo()
        cpu_has_native_bf16.cache_clear()


# ------------------------------------------------------------------------------------ trials
def test_trials_summary_by_hand(tmp_path):
    per_trial = [
        {"bbox": {"AP": 1.0, "AP50": 2.0}},
        {"bbox": {"AP": 3.0, "AP50": 6.0}},
        {"bbox": {"AP": 5.0, "AP50": 7.0}},
    ]
    flat = [trials.flatten_metrics(r) for r in per_trial]
    assert flat[0] == {"bbox/AP": 1.0, "bbox/AP50": 2.0}
    summary = trials.summarize_trials(flat)
    assert summary["bbox/AP"]["mean"] == pytest.approx(3.0)
    assert summary["bbox/AP"]["std"] == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
    assert summary["bbox/AP50"]["mean"] == pytest.approx(5.0)
    assert summary["bbox/AP50"]["std"] == pytest.approx(math.sqrt(7.0))  # (9 + 1 + 4) / 2
    assert trials.summarize_trials([{"m": 4.0}])["m"]["std"] is None  # undefined for one
    nan = trials.summarize_trials([{"m": 1.0}, {"m": float("nan")}, {"m": 3.0}])["m"]
    assert (nan["mean"], nan["n"], nan["values"]) == (2.0, 2, [1.0, None, 3.0])
    runs = [
        {"trial": k, "seed": 10 + k, "output_dir": "x", "results": r}
        for k, r in enumerate(per_trial)
    ]
    trials.write_trials(tmp_path, runs)
    md = (tmp_path / "trials.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in md.splitlines() if line.startswith("|")]  # fmt: skip
    assert ["bbox/AP", "3.00 ± 2.00", "1.00", "3.00", "5.00"] in rows and "seed 12" in md
    doc = json.loads((tmp_path / "trials.json").read_text())
    assert doc["summary"]["bbox/AP50"]["mean"] == 5.0 and len(doc["trials"]) == 3


# ------------------------------------------------------------------------------ command line
def test_detect_cli_errors(tmp_path, catalog, capsys, monkeypatch):
    make_voc(tmp_path / "voc")
    tiny = str(CONFIGS / "tiny_faster_R18_FPN.yaml")
    reg = ["--register-voc", "tr", str(tmp_path / "voc"), "trainval"]
    cases = [
        (["--config-file", str(tmp_path / "no.yaml")], "no.yaml: no such config file"),
        (["--config-file", tiny, "--trials", "0"], "--trials must be >= 1"),
        (["--config-file", tiny, "--trials", "2", "--eval-only"], "cannot be combined with --eval-only"),
        (["--config-file", tiny], "DATASETS.TRAIN is empty"),
        (["--config-file", tiny, "DATASETS.TRAIN", "('nowhere',)"], "dataset 'nowhere' is not registered"),
        (["--config-file", tiny, "--register-voc", "x", str(tmp_path), "trainval"], "Annotations: folder not found"),
        (["--config-file", tiny, *reg, "DATASETS.TRAIN", "('tr',)", "DATASETS.AUTO_NUM_CLASSES", "False"],
         "NUM_CLASSES is 1 but dataset 'tr' has 2 classes"),
        (["--config-file", tiny, *reg, "DATASETS.TRAIN", "('tr',)", "MODEL.WEIGHTS", "nope.pkl"],
         "nope.pkl: MODEL.WEIGHTS file not found"),
    ]  # fmt: skip
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "no_datasets"))
    if not Path(MetadataCatalog.get("voc_2007_trainval").dirname).exists():  # no real VOC here
        cases.append(
            (["--config-file", str(CONFIGS / "pascal_voc_R_50_C4_24k.yaml")],
             "VOC2007: not found (dataset 'voc_2007_trainval'; is DETECTRON2_DATASETS set?)")
        )  # fmt: skip
    for argv, message in cases:
        assert cli.main(["detect", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("feataug detect: error: ") and message in err, (argv, err)
        assert "\n" not in err
    # class names from a file (DATASETS.CLASS_NAMES_FILE) set NUM_CLASSES (AUTO_NUM_CLASSES)
    names = tmp_path / "names.txt"
    names.write_text("# classes\nred box\nblue ellipse\ngreen star\n")
    argv = [
        "--config-file",
        tiny,
        "--from-scratch",
        *reg,
        "DATASETS.TRAIN",
        "('tr',)",
        "DATASETS.CLASS_NAMES_FILE",
        str(names),
    ]
    cfg = detect.setup(_options(argv))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert MetadataCatalog.get("tr").thing_classes == ["red box", "blue ellipse", "green star"]
    # a problem found when the records are read (at setup, before the model): exit 2, one line
    (tmp_path / "voc" / "JPEGImages" / "002003.jpg").unlink()
    argv = [
        "--config-file",
        tiny,
        "--from-scratch",
        *reg,
        "DATASETS.TRAIN",
        "('tr',)",
        *TINY,
        "OUTPUT_DIR",
        str(tmp_path / "o"),
    ]
    capsys.readouterr()
    assert cli.main(["detect", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("feataug detect: error: ")
    assert "no image for id '002003'" in err[0] and not (tmp_path / "o").exists()


def test_detect_voc_trials_and_eval_only(tmp_path, catalog, r18_weights):
    """`feataug detect --trials 2` on VOC-format data from converted R18 weights; --eval-only of
    a trained model reproduces its final evaluation."""
    make_voc(tmp_path / "voc")
    _, pkl = r18_weights
    out = tmp_path / "out"
    common = [
        "--config-file", str(CONFIGS / "tiny_faster_R18_FPN.yaml"),
        "--register-voc", "syn_2007_train", str(tmp_path / "voc"), "trainval",
        "--register-voc", "syn_2007_test", str(tmp_path / "voc"), "test",
    ]  # fmt: skip
    opts = ["DATASETS.TRAIN", "('syn_2007_train',)", "DATASETS.TEST", "('syn_2007_test',)", *TINY]
    args = _parse(
        [*common, "--trials", "2", *opts, "MODEL.WEIGHTS", str(pkl), "OUTPUT_DIR", str(out)]
    )
    assert detect.main(args) == 0
    per_trial = []
    for k in range(2):
        results = json.loads((out / f"trial{k}" / "eval_results.json").read_text())
        assert set(results["bbox"]) == {"AP", "AP50", "AP75"}
        assert all(0.0 <= v <= 100.0 for v in results["bbox"].values())
        assert f"SEED: {k}\n" in (out / f"trial{k}" / "config.yaml").read_text()
        per_trial.append(results["bbox"])
    summary = json.loads((out / "trials.json").read_text())["summary"]
    for key in ("AP", "AP50", "AP75"):
        values = [t[key] for t in per_trial]
        assert summary[f"bbox/{key}"]["mean"] == pytest.approx(statistics.mean(values))
        assert summary[f"bbox/{key}"]["std"] == pytest.approx(statistics.stdev(values))
    assert "bbox/AP50" in (out / "trials.md").read_text()
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "log.txt").read_text()
    assert "Running precise-BN" in log
    # what produced the folder: provenance.json, the head of log.txt, trials.json, each trial
    import hashlib

    record = json.loads((out / "provenance.json").read_text())
    assert record["weights"]["sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert record["command"] == sys.argv and record["versions"]["torch"] == torch.__version__
    assert log.startswith("provenance: ") and record["weights"]["sha256"] in log.split("\n", 3)[2]
    assert "Schedule as written (SOLVER.REFERENCE_WORLD_SIZE 0)" in log
    assert json.loads((out / "trials.json").read_text())["provenance"] == record
    assert json.loads((out / "trial0" / "provenance.json").read_text()) == record
    # --resume skips finished trials (no training) and rebuilds the same summary
    (out / "trials.json").unlink()
    assert (
        detect.main(
            _parse(
                [*common, "--trials", "2", "--resume", *opts]
                + ["MODEL.WEIGHTS", str(pkl), "OUTPUT_DIR", str(out)]
            )
        )
        == 0
    )
    assert json.loads((out / "trials.json").read_text())["summary"] == summary
    assert (out / "log.txt").read_text().count("results exist in") == 2

    trained = out / "trial1" / "model_final.pth"
    args = _parse(
        [
            *common,
            "--eval-only",
            *opts,
            "MODEL.WEIGHTS",
            str(trained),
            "OUTPUT_DIR",
            str(tmp_path / "ev"),
        ]
    )
    assert detect.main(args) == 0
    again = json.loads((tmp_path / "ev" / "eval_results.json").read_text())["bbox"]
    assert again == pytest.approx(per_trial[1], abs=1e-6)


@pytest.mark.parametrize("trials", [None, 2])
def test_fine_tuning_starts_from_model_weights(tmp_path, catalog, r18_weights, monkeypatch,
                                               trials):
    """When training starts, every trunk tensor of the model is the converted file's (its
    arrays, Detectron2 names): the run fine-tunes MODEL.WEIGHTS, not a random start."""
    import pickle

    from transfer.trainer import Trainer

    _, pkl = r18_weights
    with open(pkl, "rb") as f:
        arrays = pickle.load(f)["model"]
    seen = []

    def train(self):  # in place of the training loop: what it would start from
        trunk = {k.removeprefix("backbone.bottom_up."): v.detach().cpu().numpy()
                 for k, v in self.model.state_dict().items()
                 if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")}
        seen.append(trunk)

    monkeypatch.setattr(Trainer, "train", train)
    make_voc(tmp_path / "voc", n_train=2, n_test=1)
    argv = ["detect", "--config-file", str(CONFIGS / "tiny_faster_R18_FPN.yaml"),
            "--register-voc", "tr", str(tmp_path / "voc"), "trainval",
            *(["--trials", str(trials)] if trials else []),
            "DATASETS.TRAIN", "('tr',)", "DATASETS.TEST", "('tr',)", *TINY,
            "MODEL.WEIGHTS", str(pkl), "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0
    assert len(seen) == (trials or 1)
    for trunk in seen:
        assert sorted(trunk) == sorted(arrays)  # every tensor of the file, nothing else
        for k, v in arrays.items():
            np.testing.assert_array_equal(trunk[k], v, err_msg=k)


def test_detect_coco_mask_with_cpu_amp(tmp_path, catalog, r18_weights):
    """Mask R-CNN on COCO-format data with SOLVER.AMP (CPU: bfloat16 autocast where the CPU has
    native bfloat16, else float32): bbox and segm AP, equal to pycocotools on the evaluator's
    own results file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    train = make_coco(tmp_path, "train", n_images=4)
    val = make_coco(tmp_path, "val", n_images=3, seed=1)
    _, pkl = r18_weights
    out = tmp_path / "out"
    returned = detect.run_detection(  # the library form of `feataug detect`
        CONFIGS / "tiny_mask_R18_FPN.yaml",
        ["DATASETS.TRAIN", "('syn_train',)", "DATASETS.TEST", "('syn_val',)", *TINY,
         "SOLVER.AMP.ENABLED", "True", "MODEL.WEIGHTS", pkl, "OUTPUT_DIR", out],
        register_coco=[("syn_train", train, tmp_path / "images"), ("syn_val", val, tmp_path / "images")],
    )  # fmt: skip
    log = (out / "log.txt").read_text()
    if cpu_has_native_bf16():
        assert "Mixed precision: CPUAutocastTrainer with torch.bfloat16" in log
    else:
        assert "Mixed precision: off, this CPU has no native bfloat16" in log
    results = json.loads((out / "eval_results.json").read_text())
    assert returned == results
    dets = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    assert dets, "the model made no detections"
    gt = COCO(str(val))
    for iou_type in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(results[iou_type])
        ev = COCOeval(gt, gt.loadRes(dets), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        for key, stat in zip(("AP", "AP50", "AP75"), ev.stats[:3], strict=True):
            if stat < 0:  # no ground truth or no detections: -1 from pycocotools, NaN -> null here
                assert results[iou_type][key] is None
            else:
                assert results[iou_type][key] == pytest.approx(100 * stat, abs=1e-6)
