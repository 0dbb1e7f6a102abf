"""The ground everything stands on: Detectron2 works here, the installer is safe, the CLI answers."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feataug import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import install_detectron2  # noqa: E402


def _d2_model(config: str, **overrides):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    torch.manual_seed(0)
    return build_model(cfg)


def _sample(h: int = 128, w: int = 160, masks: bool = False) -> dict:
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [80.0, 30.0, 150.0, 120.0]])
    inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 2]))
    if masks:
        m = torch.zeros(2, h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            m[i, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(m)
    return {"image": image, "instances": inst, "height": h, "width": w}


def _train_step(model, sample) -> dict[str, float]:
    from detectron2.utils.events import EventStorage

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with EventStorage(0):
        losses = model([sample])
    total = sum(losses.values())
    opt.zero_grad()
    total.backward()
    opt.step()
    return {k: float(v) for k, v in losses.items()}


def test_detectron2_imports_without_compiled_ops():
    import detectron2
    from detectron2.layers import ROIAlign, batched_nms  # noqa: F401  (torchvision-backed)

    assert detectron2.__version__
    # The stray top-level `tools` of the PyPI wheel must not shadow ours.
    import importlib.util

    spec = importlib.util.find_spec("tools")
    assert spec is None or "site-packages" not in str(spec.origin or spec.submodule_search_locations)


def test_faster_rcnn_r50_c4_trains_one_step():
    model = _d2_model("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml")
    losses = _train_step(model, _sample())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(math.isfinite(v) for v in losses.values()), losses


def test_mask_rcnn_r18_fpn_trains_one_step_and_infers():
    from detectron2.structures import Instances

    model = _d2_model(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        **{"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64},
    )
    sample = _sample(masks=True)
    losses = _train_step(model, sample)
    assert {"loss_mask", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses

    model.eval()
    with torch.no_grad():
        (out,) = model([{k: sample[k] for k in ("image", "height", "width")}])
    inst = out["instances"]
    assert isinstance(inst, Instances)
    assert inst.image_size == (128, 160)
    assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_masks")


def test_installer_refuses_wheel_with_wrong_sha256(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    fake.write_bytes(b"not the real wheel")
    calls = []
    monkeypatch.setattr(install_detectron2.subprocess, "run", lambda *a, **k: calls.append(a))

    rc = install_detectron2.main(["--force", "--wheel", str(fake), "--cache", str(tmp_path / "c")])

    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and "sha256 mismatch" in err[0] and str(fake) in err[0]
    assert hashlib.sha256(b"not the real wheel").hexdigest() in err[0]
    assert calls == []  # pip was never invoked: nothing installed


def test_installer_repack_drops_extension_and_tools(tmp_path):
    import zipfile

    src = tmp_path / "sal_detectron2-0.7.2-cp310-cp310-linux_x86_64.whl"
    info = install_detectron2.DIST_INFO
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("detectron2/__init__.py", "__version__ = '0.7.2'\n")
        z.writestr("detectron2/_C.cpython-310-x86_64-linux-gnu.so", b"\x7fELF")
        z.writestr("tools/train_net.py", "")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-cp310-linux_x86_64\n")
        z.writestr(f"{info}/METADATA", "Name: sal-detectron2\nRequires-Dist: numpy<2\nRequires-Dist: yacs>=0.1.8\n")
        z.writestr(f"{info}/top_level.txt", "detectron2\ntools\n")
        z.writestr(f"{info}/RECORD", "")
    out = install_detectron2.repack_pure_python(src, tmp_path)
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert "detectron2/__init__.py" in names
        assert not any(n.startswith("tools/") or n.endswith(".so") for n in names)
        assert "Tag: py3-none-any" in z.read(f"{info}/WHEEL").decode()
        meta = z.read(f"{info}/METADATA").decode()
        assert "numpy" not in meta and "yacs" in meta
        record = z.read(f"{info}/RECORD").decode()
        init_hash = install_detectron2._record_hash(z.read("detectron2/__init__.py"))
        assert f"detectron2/__init__.py,{init_hash}," in record


def test_env_command_lists_versions(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    import torchvision

    for key in ("torch", "torchvision", "detectron2", "detectron2 compiled ops", "CUDA available",
                "faster-coco-eval", "pycocotools"):
        assert any(line.startswith(key + " ") for line in out.splitlines()), key
    assert torch.__version__ in out and torchvision.__version__ in out


def test_console_script_help():
    exe = Path(sys.executable).with_name("feataug")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in cli.COMMANDS:
        assert name in r.stdout
    bad = subprocess.run([str(exe), "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no-such-command" in bad.stderr


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_a_module(name):
    """Each command's module imports and exposes the two functions the dispatcher calls."""
    import importlib

    module = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(module.add_arguments) and callable(module.main)
