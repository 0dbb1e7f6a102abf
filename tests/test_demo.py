"""The demo's pieces; the whole run (minutes) is marked slow."""

from __future__ import annotations

import json

import pytest

from feataug import demo, plots


def test_summary_and_table_by_hand():
    per_start = {"random init": [{"AP": 10.0, "AP50": 20.0}, {"AP": 12.0, "AP50": 22.0},
                                 {"AP": 11.0, "AP50": 21.0}],
                 "MoCo v2": [{"AP": 15.0, "AP50": 21.0}, {"AP": 16.0, "AP50": 25.0},
                             {"AP": 15.5, "AP50": 20.0}]}
    rows = demo.summarize(per_start)
    ap = rows["MoCo v2"]["AP"]
    assert ap["mean"] == pytest.approx(15.5) and ap["sd"] == pytest.approx(0.5)
    # paired differences 5, 4, 4.5: mean 4.5, sd 0.5, same sign, 4.5 > 2 x 0.5
    assert ap["delta"] == pytest.approx(4.5) and ap["claim"] == "helps"
    assert rows["MoCo v2"]["AP50"]["claim"] == "no effect shown"  # +1, +3, -1
    table = demo.format_table(rows).splitlines()
    assert table[0] == "| start point | AP | AP50 | Δ AP vs random init | Δ AP50 vs random init |"
    assert table[2] == "| random init | 11.0 ± 1.0 | 21.0 ± 1.0 |  |  |"
    assert table[3] == ("| MoCo v2 | 15.5 ± 0.5 | 22.0 ± 2.6 | +4.5 ± 0.5 helps "
                        "| +1.0 ± 2.0 no effect shown |")


def test_profiles_are_short_and_full_is_longer():
    q, f, t = demo.PROFILES["quick"], demo.PROFILES["full"], demo.PROFILES["trees"]
    # every profile that pairs start points has the seeds the claim rule needs
    assert q.seeds >= demo.VERDICT_SEEDS and f.seeds >= demo.VERDICT_SEEDS
    assert f.trees and not q.trees and set(q.starts) < set(f.starts) == set(demo.STARTS)
    assert f.pretrain_iters >= q.pretrain_iters
    assert f.detect_iters * f.detect_batch > q.detect_iters * q.detect_batch  # images seen
    assert t.trees and not t.scenes and t.trees_detect_iters > f.trees_detect_iters


def test_trees_schedule_follows_the_profile():
    opts = demo._trees_opts(demo.PROFILES["trees"])
    pairs = dict(zip(opts[::2], opts[1::2], strict=True))
    assert (pairs["SOLVER.MAX_ITER"], pairs["SOLVER.STEPS"]) == ("1000", "(750,)")
    assert pairs["INPUT.CROP.ENABLED"] == "True" and pairs["INPUT.MIN_SIZE_TEST"] == "400"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    report = demo.run("quick", tmp_path / "out", data_root=str(tmp_path / "data"))
    assert set(report["scenes"]) == set(demo.PROFILES["quick"].starts)
    saved = json.loads((tmp_path / "out" / "quick" / "results.json").read_text())
    assert saved["scenes"].keys() == report["scenes"].keys()
    for name in ("scenes_ap.png", "scenes_predictions.png"):
        assert (tmp_path / "out" / "quick" / name).stat().st_size > 1000
    assert len(capsys.readouterr().out.splitlines()) <= 40


@pytest.mark.detectron2
def test_the_prediction_picture_sees_the_image_as_the_evaluator_does(tmp_path):
    """``predict`` (the pictures) against Detectron2's test-time mapper (the evaluators' path):
    the same detections for an image whose channels differ, and not for the channels swapped."""
    import cv2
    import numpy as np
    import torch
    from detectron2.data import DatasetMapper
    from detectron2.modeling import build_model

    from transfer.config import get_detection_cfg

    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    bgr[..., 0] = 255 - bgr[..., 2] // 4  # blue differs from red: the channel order matters
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), bgr)
    cfg = get_detection_cfg(demo._config_path(demo.TREES_CONFIG), [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "INPUT.MIN_SIZE_TEST", "96"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    record = {"file_name": str(path), "height": 96, "width": 128, "image_id": 0}
    with torch.no_grad():
        want = model([DatasetMapper(cfg, is_train=False)(record)])[0]["instances"]
    got = plots.predict(cfg, cv2.imread(str(path)))
    assert len(want) > 0
    torch.testing.assert_close(got.scores, want.scores)
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor)
    swapped = plots.predict(cfg, cv2.imread(str(path))[:, :, ::-1].copy())
    assert len(swapped) != len(want) or not torch.allclose(swapped.scores, want.scores)

    # weights that do not load whole, or whose file would run code, give no picture
    from transfer.weights import DetectError

    partial = {k: v for k, v in model.state_dict().items() if "box_predictor" not in k}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "partial.pth")
    with pytest.raises(DetectError, match="box_predictor"):
        plots.predict(cfg, bgr)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {"x": Payload()}}, tmp_path / "payload.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "payload.pth")
    with pytest.raises(DetectError):
        plots.predict(cfg, bgr)
    assert not marker.exists()


@pytest.mark.detectron2
def test_the_prediction_picture_uses_the_model_as_it_was_trained(tmp_path):
    """A start point's model trained with the data's class count (DATASETS.AUTO_NUM_CLASSES: 3
    here, where the config file says 1) is drawn from its trial's config.yaml, not refused as a
    model that does not fit the config file."""
    import cv2
    import numpy as np
    import torch
    from detectron2.modeling import build_model
    from detectron2.structures import BoxMode

    from transfer.config import get_detection_cfg

    cfg = get_detection_cfg(demo._config_path(demo.TREES_CONFIG), [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3", "INPUT.MIN_SIZE_TEST", "96"])
    torch.manual_seed(0)
    trial = tmp_path / "start" / "trial0"
    trial.mkdir(parents=True)
    torch.save({"model": build_model(cfg).state_dict()}, trial / "model_final.pth")
    (trial / "config.yaml").write_text(cfg.dump())
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8))
    record = {"file_name": str(image), "height": 96, "width": 128, "image_id": 0,
              "annotations": [{"bbox": [10, 10, 40, 30], "bbox_mode": BoxMode.XYWH_ABS,
                               "category_id": 2}]}
    out = plots.plot_predictions(tmp_path / "p.png", {"start": tmp_path / "start"}, [record])
    assert out == tmp_path / "p.png" and cv2.imread(str(out)).shape == (192, 256, 3)
