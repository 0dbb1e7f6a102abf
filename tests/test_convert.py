"""`feataug convert`: every known checkpoint layout becomes Detectron2 weights that reproduce
torchvision's own forward pass, and everything that cannot be converted exactly is refused.

Truth: torchvision's ResNet forward (layer1..layer4) on the same normalized input, compared with
the res2..res5 outputs of a Detectron2 backbone built from our detection configs and loaded by
Detectron2's own ``DetectionCheckpointer``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import refused
from torch import nn

from feataug import cli
from transfer import convert as C

pytest.importorskip("detectron2")
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402

import transfer.modeling  # noqa: E402,F401  (registers Res5ROIHeadsExtraNorm)
from transfer.config import get_detection_cfg  # noqa: E402

pytestmark = [pytest.mark.detectron2, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detection"
R18_CONFIG = CONFIGS / "tiny_faster_R18_FPN.yaml"
R50_CONFIG = CONFIGS / "pascal_voc_R_50_C4_24k.yaml"
if not R50_CONFIG.exists():
    R50_CONFIG = CONFIGS / "Base-RCNN-C4-BN.yaml"
SIZE = 64  # input side: enough for res5 (stride 32) to be 2x2


# ----------------------------------------------------------------------------- fixtures


def _random_resnet(depth: int) -> nn.Module:
    """torchvision ResNet with random weights and random BN affine parameters and statistics."""
    torch.manual_seed(depth)
    return _randomize_bn(getattr(torchvision.models, f"resnet{depth}")())


def _junk(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _partial_copy(prefix: str) -> dict[str, torch.Tensor]:
    """A few tensors of a second (momentum / key) encoder: distinct values, same names."""
    return {
        prefix + "conv1.weight": _junk(64, 3, 7, 7),
        prefix + "bn1.running_mean": _junk(64),
        prefix + "layer1.0.conv1.weight": _junk(64, 64, 1, 1),
    }


def _mlp(prefix: str, dims: tuple[int, ...], bn: bool) -> dict[str, torch.Tensor]:
    """Projector / predictor tensors, torchvision-Sequential numbering (Linear, [BN], ReLU)."""
    out, i = {}, 0
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        out[f"{prefix}{i}.weight"], out[f"{prefix}{i}.bias"] = _junk(b, a), _junk(b)
        i += 1
        if bn:
            for k in ("weight", "bias", "running_mean", "running_var"):
                out[f"{prefix}{i}.{k}"] = _junk(b)
            out[f"{prefix}{i}.num_batches_tracked"] = torch.tensor(5)
            i += 1
        i += 1  # ReLU
    return out


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _no_fc(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def make_checkpoint(fmt: str, state: dict[str, torch.Tensor], depth: int) -> dict:
    """A checkpoint laid out as ``fmt``'s training code writes it, around trunk ``state``
    (torchvision names, with ``fc`` and ``num_batches_tracked``), plus heads and queues."""
    feat = state["fc.weight"].shape[1]
    optimizer = {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}
    if fmt == "feataug":
        trunk = _no_fc(state)
        return {
            "version": 1,
            "config": f"MODEL:\n  METHOD: moco\n  BACKBONE: resnet{depth}\n",
            "epoch": 2,
            "iter": 40,
            "model": {
                **_prefixed("encoder_q.", trunk),
                **_mlp("encoder_q.fc.", (feat, 128, 128), bn=False),
                **_partial_copy("encoder_k."),
                "queue": _junk(128, 256),
                "queue_ptr": torch.zeros(1, dtype=torch.long),
            },
            "optimizer": optimizer,
            "backbone": trunk,
            "arch": {"name": f"resnet{depth}", "stem": "imagenet"},
            "queue": _junk(128, 256),
            "rng": {"torch": torch.get_rng_state()},
        }
    if fmt == "moco":  # MoCo v1/v2 main_moco.py
        sd = {
            **_prefixed("module.encoder_q.", _no_fc(state)),
            **_mlp("module.encoder_q.fc.", (feat, feat, 128), bn=False),
            **_partial_copy("module.encoder_k."),
            "module.queue": _junk(128, 4096),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        }
        return {"epoch": 200, "arch": f"resnet{depth}", "state_dict": sd, "optimizer": optimizer}
    if fmt == "simsiam":  # the projector replaces fc; the predictor sits beside the encoder
        sd = {
            **_prefixed("module.encoder.", _no_fc(state)),
            **_mlp("module.encoder.fc.", (feat, 256, 256, 256), bn=True),
            **_mlp("module.predictor.", (256, 64, 256), bn=True),
        }
        return {"epoch": 100, "arch": f"resnet{depth}", "state_dict": sd, "optimizer": optimizer}
    if fmt == "mocov3":
        sd = {
            **_prefixed("module.base_encoder.", _no_fc(state)),
            **_mlp("module.base_encoder.fc.", (feat, 512, 256), bn=True),
            **_partial_copy("module.momentum_encoder."),
            **_mlp("module.predictor.", (256, 512, 256), bn=True),
        }
        return {
            "epoch": 100,
            "arch": f"resnet{depth}",
            "state_dict": sd,
            "optimizer": optimizer,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 10},
        }
    # DenseCL (OpenSelfSup): encoder_q = Sequential(backbone, neck), and .backbone aliases it
    if fmt == "densecl":
        trunk = _no_fc(state)
        sd = {
            **_prefixed("encoder_q.0.", trunk),
            **_mlp("encoder_q.1.mlp.", (feat, feat, 128), bn=False),
            **_partial_copy("encoder_k.0."),
            **_prefixed("backbone.", trunk),
            "queue": _junk(128, 4096),
            "queue2": _junk(128, 4096),
            "queue_ptr": torch.zeros(1, dtype=torch.long),
        }
        return {
            "meta": {"epoch": 200, "mmcv_version": "0.4.3"},
            "state_dict": sd,
            "optimizer": optimizer,
        }
    if fmt == "solo-learn":  # Lightning checkpoint; torchvision backbone with fc = Identity
        sd = {
            **_prefixed("backbone.", _no_fc(state)),
            **_mlp("projector.", (feat, 256, 128), bn=True),
            **_partial_copy("momentum_backbone."),
            "classifier.weight": _junk(10, feat),
            "classifier.bias": _junk(10),
            "queue": _junk(2, 128, 256),
        }
        return {
            "epoch": 400,
            "global_step": 1000,
            "pytorch-lightning_version": "2.1.3",
            "state_dict": sd,
            "loops": {},
            "callbacks": {},
            "optimizer_states": [optimizer],
            "lr_schedulers": [],
            "hyper_parameters": {"method": "mocov2plus", "backbone": {"name": f"resnet{depth}"}},
        }
    if fmt == "pixpro":  # options are an argparse.Namespace
        sd = {
            **_prefixed("module.encoder.", _no_fc(state)),
            **_partial_copy("module.encoder_k."),
            **_mlp("module.projector.", (feat, 256, 128), bn=True),
            **_mlp("module.predictor.", (128, 256, 128), bn=True),
            "module.value_transform.weight": _junk(128, 128, 1, 1),
        }
        opt = argparse.Namespace(arch=f"resnet{depth}", epochs=100, instance_ratio=0.5)
        return {"opt": opt, "model": sd, "optimizer": optimizer, "scheduler": {}, "epoch": 100}
    if fmt == "vissl":
        model = {
            "trunk": _prefixed("_feature_blocks.", _no_fc(state)),
            "heads": _mlp("0.clf.", (feat, 2048, 128), bn=False),
        }
        return {
            "phase_idx": 399,
            "iteration": 5000,
            "loss": {},
            "classy_state_dict": {
                "train": True,
                "base_model": {"model": model, "meta": {"trunk": {}, "heads": {}}},
                "optimizer": optimizer,
            },
        }
    if fmt == "lightly":  # lightly's examples: nn.Sequential(*list(resnet.children())[:-1])
        seq = _as_sequential(state, depth)
        sd = {
            **_prefixed("backbone.", seq),
            **_prefixed("backbone_momentum.", dict(list(seq.items())[:3])),
            **_mlp("projection_head.layers.", (feat, 256, 128), bn=True),
        }
        return {"epoch": 5, "global_step": 50, "pytorch-lightning_version": "2.2.0",
                "state_dict": sd, "optimizer_states": [optimizer]}  # fmt: skip
    if fmt == "torchvision":
        return dict(state)
    raise AssertionError(fmt)


def _as_sequential(state: dict[str, torch.Tensor], depth: int, keep_fc: bool = False):
    """``state`` as torchvision's ResNet children in an ``nn.Sequential`` names it (built by
    torch itself: the children of a meta-device ResNet holding these tensors)."""
    name = depth if isinstance(depth, str) else f"resnet{depth}"
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    model.load_state_dict(state, assign=True)
    children = list(model.children())
    return dict(nn.Sequential(*(children if keep_fc else children[:-1])).state_dict())


@pytest.fixture(scope="module")
def resnets():
    return {depth: _random_resnet(depth) for depth in (18, 50)}


class _RecordingCheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer, keeping the incompatible keys its load reports."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _cfg(depth: int):
    if depth == 18:
        return get_detection_cfg(R18_CONFIG, ["MODEL.DEVICE", "cpu"])
    # C4: res5 lives in the ROI heads; build it into the backbone to compare all four stages.
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"]
    cfg = get_detection_cfg(R50_CONFIG, opts)
    assert cfg.MODEL.RESNETS.DEPTH == 50
    return cfg


@pytest.fixture(scope="module")
def d2_backbones():
    return {depth: build_backbone(_cfg(depth)).eval() for depth in (18, 50)}


def _torchvision_stages(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(model, f"layer{i}")(x)
        out[f"res{i + 1}"] = x
    return out


def _assert_same_stages(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Detectron2's stages ``got`` equal torchvision's ``want``, both computed in float64."""
    for name, w in want.items():
        assert got[name].shape == w.shape and got[name].dtype == torch.float64
        # the same function in float64: sums of <= 9216 products, <= 53 layers deep, round to
        # <= 9216 * 53 * eps64 ~ 1e-10 of the largest feature; a wrong weight is O(1) off
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-9 * float(w.abs().max()), msg=name)


def _poison(module: nn.Module) -> None:
    """NaN every float parameter and buffer, so anything the load misses shows in the output."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))


def _input() -> torch.Tensor:
    """A normalized image batch (Detectron2's backbone takes normalized input)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=g) * 255
    mean = torch.tensor(C.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C.PIXEL_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# ----------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("fmt", C.FORMAT_NAMES)
def test_converted_weights_reproduce_torchvision(
    fmt, depth, resnets, d2_backbones, tmp_path, capsys
):
    model = resnets[depth]
    src, dst = tmp_path / f"{fmt}.pth", tmp_path / "out" / "d2.pkl"
    torch.save(make_checkpoint(fmt, model.state_dict(), depth), src)

    assert cli.main(["convert", str(src), str(dst)]) == 0
    report = capsys.readouterr().out
    assert f"({fmt}), ResNet-{depth}," in report  # auto-detected format and depth
    assert f"MODEL.RESNETS.DEPTH {depth}" in report
    assert "MODEL.RESNETS.STRIDE_IN_1X1 False" in report and "INPUT.FORMAT RGB" in report
    assert ("RES2_OUT_CHANNELS 64" in report) == (depth == 18)
    # options objects (argparse.Namespace) are on the allow-list: no placeholders, no unsafe load
    assert "placeholder" not in report and "weights_only" not in report

    with open(dst, "rb") as f:
        payload = pickle.load(f)
    assert set(payload) == {"model", "__author__", "matching_heuristics", "feataug"}
    assert payload["__author__"] == "feataug" and payload["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in payload["model"].values())

    backbone = d2_backbones[depth]
    _poison(backbone)
    ckpt = _RecordingCheckpointer(backbone)
    ckpt.load(str(dst))
    bad = ckpt.incompatible
    resnet_part = "bottom_up." if depth == 18 else ""  # R18: FPN around the ResNet
    assert [k for k in bad.missing_keys if k.startswith(resnet_part)] == []
    assert bad.unexpected_keys == [] and bad.incorrect_shapes == []

    trunk = backbone.bottom_up if depth == 18 else backbone
    x = _input().double()
    with torch.no_grad():
        want = _torchvision_stages(copy.deepcopy(model).double(), x)
        got = copy.deepcopy(trunk).double()(x)
    assert all(torch.isfinite(got[name]).all() for name in want)
    _assert_same_stages(got, want)


def test_r50_loads_into_the_full_c4_detector(resnets, tmp_path):
    """The real C4 model: res2-res4 in the backbone, res5 in the ROI heads (plus its extra norm)."""
    model = resnets[50]
    src, dst = tmp_path / "moco.pth", tmp_path / "d2.pkl"
    torch.save(make_checkpoint("moco", model.state_dict(), 50), src)
    conv = C.convert(src, dst)
    assert conv.depth == 50 and conv.format.name == "moco"

    cfg = get_detection_cfg(R50_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    detector = build_model(cfg).eval()
    _poison(detector.backbone)
    _poison(detector.roi_heads.res5)
    ckpt = _RecordingCheckpointer(detector)
    ckpt.load(str(dst))
    missing = ckpt.incompatible.missing_keys
    assert [k for k in missing if k.startswith("backbone.")] == []
    # the only res5 keys not in the checkpoint are the extra norm's, after the last block
    res5_missing = [k for k in missing if k.startswith("roi_heads.res5.")]
    assert res5_missing and all(k.startswith("roi_heads.res5.norm.") for k in res5_missing)
    assert ckpt.incompatible.unexpected_keys == []

    x = _input().double()
    detector.double()
    with torch.no_grad():
        want = _torchvision_stages(copy.deepcopy(model).double(), x)
        res4 = detector.backbone(x)["res4"]
        res5 = res4
        for block in list(detector.roi_heads.res5.children())[:3]:  # the three res5 blocks
            res5 = block(res5)
    _assert_same_stages({"res4": res4, "res5": res5}, {k: want[k] for k in ("res4", "res5")})


def test_detection_opts_merge_into_a_detectron2_config():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_list(C.detectron2_opts(18))
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS) == (18, 64)
    assert cfg.MODEL.RESNETS.RES5_DILATION == 1


def test_name_mapping_by_hand():
    expected = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.conv3.weight": "res2.0.conv3.weight",
        "layer1.2.bn3.bias": "res2.2.conv3.norm.bias",
        "layer3.0.downsample.0.weight": "res4.0.shortcut.weight",
        "layer4.0.downsample.1.running_mean": "res5.0.shortcut.norm.running_mean",
        "layer3.22.bn2.weight": "res4.22.conv2.norm.weight",
    }
    assert {k: C.torchvision_to_detectron2(k) for k in expected} == expected


def test_forced_format_and_tools_script(resnets, tmp_path, capsys):
    state = resnets[18].state_dict()
    src, dst = tmp_path / "simsiam.pth", tmp_path / "d2.pkl"
    torch.save(make_checkpoint("simsiam", state, 18), src)
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(src), str(dst), "--format", "simsiam"]) == 0
    out = capsys.readouterr().out
    assert "SimSiam (simsiam), ResNet-18" in out
    assert "module.encoder.fc." in out and "module.predictor." in out  # heads reported dropped
    with open(dst, "rb") as f:
        model = pickle.load(f)["model"]
    np.testing.assert_array_equal(
        model["res3.0.shortcut.norm.running_var"],
        state["layer2.0.downsample.1.running_var"].numpy(),
    )
    assert not any("num_batches_tracked" in k for k in model)


def test_objects_of_training_code_that_is_not_installed(resnets, tmp_path, monkeypatch, capsys):
    """Lightning-style hyper-parameters pickled as classes this environment cannot import."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "gone_trainer_utils.py").write_text(
        "class AttributeDict(dict):\n    pass\n\n"
        "class Options:\n    def __init__(self):\n        self.lr = 0.1\n\n"
        "class Steps(list):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(code))
    import gone_trainer_utils as gone

    ckpt = make_checkpoint("solo-learn", resnets[18].state_dict(), 18)
    ckpt["hyper_parameters"] = gone.AttributeDict(method="byol", optimizer=gone.Options())
    ckpt["loops"] = gone.Steps([1, 2, 3])
    src, dst = tmp_path / "solo.ckpt", tmp_path / "d2.pkl"
    torch.save(ckpt, src)
    monkeypatch.delitem(sys.modules, "gone_trainer_utils")
    (code / "gone_trainer_utils.py").unlink()
    importlib.invalidate_caches()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gone_trainer_utils")

    assert cli.main(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "(solo-learn), ResNet-18" in out
    # the absent classes are named, not imported: the module does not even exist any more
    assert (
        "kept as inert placeholders (not imported, not called): "
        "gone_trainer_utils.AttributeDict, gone_trainer_utils.Options, gone_trainer_utils.Steps;"
    ) in out
    with open(dst, "rb") as f:
        model = pickle.load(f)["model"]
    np.testing.assert_array_equal(
        model["res2.0.conv1.weight"], resnets[18].state_dict()["layer1.0.conv1.weight"].numpy()
    )


# ----------------------------------------------------------------------------- refusals


def _refused(tmp_path: Path, capsys, ckpt, *extra: str, name: str = "in.pth") -> str:
    """Convert ``ckpt`` (an object to save, or raw bytes); check the refusal; return its line."""
    src = tmp_path / name
    if isinstance(ckpt, bytes):
        src.write_bytes(ckpt)
    elif ckpt is not None:
        torch.save(ckpt, src)
    dst = tmp_path / "out.pkl"
    line = refused(capsys, ["convert", src, dst, *extra], keep=[tmp_path])  # no leftovers
    assert not dst.exists()
    return line


@pytest.fixture
def r18_state(resnets):
    return dict(resnets[18].state_dict())


def test_refuses_no_trunk(tmp_path, capsys, r18_state):
    ckpt = {"epoch": 1, "state_dict": _prefixed("module.encoder_x.", r18_state)}
    line = _refused(tmp_path, capsys, ckpt)
    assert "in.pth: no ResNet trunk found" in line
    assert "epoch" in line and "state_dict: module.encoder_x." in line


def test_refuses_forced_format_that_does_not_match(tmp_path, capsys, r18_state):
    line = _refused(tmp_path, capsys, make_checkpoint("moco", r18_state, 18), "--format", "mocov3")
    assert "no mocov3 ResNet trunk found" in line and "module.encoder_q." in line


def test_refuses_missing_keys(tmp_path, capsys, r18_state):
    del r18_state["layer3.1.bn2.running_var"], r18_state["layer4.0.downsample.0.weight"]
    line = _refused(tmp_path, capsys, make_checkpoint("moco", r18_state, 18))
    assert "ResNet-18 keys missing" in line
    assert "layer3.1.bn2.running_var" in line and "layer4.0.downsample.0.weight" in line


def test_refuses_shape_mismatch(tmp_path, capsys, r18_state):
    r18_state["layer2.1.conv2.weight"] = torch.randn(128, 128, 1, 1)
    line = _refused(tmp_path, capsys, make_checkpoint("simsiam", r18_state, 18))
    assert "shape mismatch" in line and "layer2.1.conv2.weight (128, 128, 1, 1)" in line
    assert "(128, 128, 3, 3)" in line


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite_weights(bad, tmp_path, capsys, r18_state):
    var = r18_state["layer3.0.bn1.running_var"].clone()  # the fixture's tensors are shared
    var[5] = bad  # a diverged run
    r18_state["layer3.0.bn1.running_var"] = var
    line = _refused(tmp_path, capsys, make_checkpoint("moco", r18_state, 18))
    assert "non-finite values (NaN or inf) in layer3.0.bn1.running_var" in line


def test_refuses_unknown_trunk_tensors(tmp_path, capsys, r18_state):
    r18_state["layer1.0.se.fc1.weight"] = torch.randn(4, 64)
    line = _refused(tmp_path, capsys, r18_state)
    assert "layer1.0.se.fc1.weight" in line


def test_refuses_cifar_stem_by_arch(tmp_path, capsys, r18_state):
    ckpt = make_checkpoint("feataug", r18_state, 18)
    ckpt["arch"] = {"name": "resnet18", "stem": "cifar"}
    line = _refused(tmp_path, capsys, ckpt)
    assert "'cifar' stem" in line


@pytest.mark.parametrize("fmt", ["torchvision", "solo-learn"])
def test_refuses_cifar_stem_by_shape(fmt, tmp_path, capsys, r18_state):
    r18_state["conv1.weight"] = torch.randn(64, 3, 3, 3)
    line = _refused(tmp_path, capsys, make_checkpoint(fmt, r18_state, 18))
    assert "conv1 is 3x3, a CIFAR-style stem" in line


def test_refuses_arch_name_disagreeing_with_keys(tmp_path, capsys, r18_state):
    ckpt = make_checkpoint("feataug", r18_state, 18)
    ckpt["arch"]["name"] = "resnet34"
    assert "arch.name is 'resnet34' but the trunk is ResNet-18" in _refused(tmp_path, capsys, ckpt)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"MODEL:\n  WEIGHTS: x\n", "not a readable PyTorch checkpoint"),
        (b"PK\x03\x04 truncated zip", "not a readable PyTorch checkpoint"),
        ([torch.zeros(3)], "not a checkpoint (top level is a list"),
    ],
)
def test_refuses_unreadable_or_non_checkpoint(content, message, tmp_path, capsys):
    line = _refused(tmp_path, capsys, content)
    assert f"in.pth: {message}" in line


def test_refuses_output_without_pkl(tmp_path, capsys, r18_state):
    src = tmp_path / "tv.pth"
    torch.save(r18_state, src)
    assert "must end with .pkl" in refused(capsys, ["convert", src, tmp_path / "out.pth"],
                                           keep=[tmp_path])
    assert not (tmp_path / "out.pth").exists()


def test_converted_weights_carry_the_config_they_need(tmp_path):
    """The .pkl records the Detectron2 settings ``detectron2_opts`` prints, and a config merged
    with those overrides has exactly them."""
    from pretrain.utils.safe_load import load_pickle

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    C.convert(tmp_path / "tv.pth", tmp_path / "r18.pkl")
    data = load_pickle(tmp_path / "r18.pkl")
    need = data["feataug"]["config"]
    assert need == C.detectron2_settings(18)
    assert need["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53] and need["INPUT.FORMAT"] == "RGB"
    cfg = get_detection_cfg(None, C.detectron2_opts(18))
    for key, want in need.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert (list(node) if isinstance(node, tuple) else node) == pytest.approx(want), key


# ----------------------------------------------------------------------------- other trunks

TORCHVISION_ARCHS = {  # builder -> (groups, Detectron2 WIDTH_PER_GROUP), as torchvision defines
    "resnet18": (1, 64), "resnet34": (1, 64), "resnet50": (1, 64), "resnet101": (1, 64),
    "resnet152": (1, 64), "wide_resnet50_2": (1, 128), "wide_resnet101_2": (1, 128),
    "resnext50_32x4d": (32, 4), "resnext101_32x8d": (32, 8), "resnext101_64x4d": (64, 4),
}  # fmt: skip


def _vissl_trunk(multiplier: int, depth: int = 50) -> nn.Module:
    """A VISSL ``ResNeXt`` trunk of WIDTH_MULTIPLIER ``multiplier`` (their construction:
    torchvision's ResNet, then stem and stages rebuilt with ``multiplier`` times the planes)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    layers = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    model = ResNet(Bottleneck, layers)
    model.inplanes = planes = 64 * multiplier
    model.conv1 = nn.Conv2d(3, planes, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(planes)
    model.layer1 = model._make_layer(Bottleneck, planes, layers[0])
    model.layer2 = model._make_layer(Bottleneck, planes * 2, layers[1], stride=2)
    model.layer3 = model._make_layer(Bottleneck, planes * 4, layers[2], stride=2)
    model.layer4 = model._make_layer(Bottleneck, planes * 8, layers[3], stride=2)
    model.fc = nn.Linear(planes * 32, 10)
    return model


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]  # fmt: skip


@pytest.mark.parametrize("name", TORCHVISION_ARCHS)
def test_reference_shapes_equal_torchvision(name):
    """The trunk layout the converter checks against is torchvision's, key for key, in order."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    want = _shapes(model)
    arch = C.infer_arch(dict(model.state_dict()))
    groups, width = TORCHVISION_ARCHS[name]
    assert (arch.depth, arch.groups, arch.width_per_group, arch.multiplier) == (
        int(re.search(r"\d+", name).group()), groups, width, 1)
    assert arch.torchvision_name == name
    assert list(C.reference_shapes(arch).items()) == want


@pytest.mark.parametrize("multiplier", [2, 4])
def test_reference_shapes_equal_vissl_wide_trunks(multiplier):
    with torch.device("meta"):
        model = _vissl_trunk(multiplier)
    arch = C.infer_arch(dict(model.state_dict()))
    assert arch == C.Arch(50, 1, 64 * multiplier, multiplier)
    assert arch.title == f"ResNet-50 w{multiplier}"
    assert list(C.reference_shapes(arch).items()) == _shapes(model)


def _randomize_bn(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Random BN affine parameters and statistics (from ``seed``, else the current RNG), eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.25, 0.75)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
    return model.eval()


def _check_exact(dst: Path, model: nn.Module, arch) -> None:
    """Detectron2's ResNet built from ``arch``'s settings, loaded from ``dst`` by Detectron2's
    checkpointer, gives torchvision's res2..res5 (every tensor loaded, none left over)."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']",
            *C.detectron2_opts(arch)]  # fmt: skip
    backbone = build_backbone(get_detection_cfg(R50_CONFIG, opts)).eval()
    _poison(backbone)
    ckpt = _RecordingCheckpointer(backbone)
    ckpt.load(str(dst))
    bad = ckpt.incompatible
    assert bad.missing_keys == [] and bad.unexpected_keys == [] and bad.incorrect_shapes == []
    x = _input().double()
    with torch.no_grad():
        want, got = _torchvision_stages(copy.deepcopy(model).double(), x), backbone.double()(x)
    _assert_same_stages(got, want)


@pytest.mark.parametrize(
    "name, fmt, title, settings",
    [
        ("wide_resnet50_2", "moco", "Wide ResNet-50-2", ("NUM_GROUPS 1", "WIDTH_PER_GROUP 128")),
        ("resnext50_32x4d", "lightly", "ResNeXt-50 32x4d", ("NUM_GROUPS 32", "WIDTH_PER_GROUP 4")),
    ],
)
def test_wide_and_resnext_trunks_reproduce_torchvision(name, fmt, title, settings, tmp_path,
                                                       capsys):  # fmt: skip
    model = _randomize_bn(getattr(torchvision.models, name)(), seed=1)
    src, dst = tmp_path / "in.pth", tmp_path / "d2.pkl"
    torch.save(make_checkpoint(fmt, model.state_dict(), name if fmt == "lightly" else 50), src)
    assert cli.main(["convert", str(src), str(dst)]) == 0
    report = capsys.readouterr().out
    assert f"({fmt}), {title}," in report
    assert all(f"MODEL.RESNETS.{s}\n" in report for s in settings)
    assert "STEM_OUT_CHANNELS 64\n" in report and "RES2_OUT_CHANNELS 256\n" in report
    from pretrain.utils.safe_load import load_pickle

    groups, width = TORCHVISION_ARCHS[name]
    need = load_pickle(dst)["feataug"]["config"]
    got = (need["MODEL.RESNETS.NUM_GROUPS"], need["MODEL.RESNETS.WIDTH_PER_GROUP"])
    assert got == (groups, width)
    _check_exact(dst, model, C.Arch(50, groups, width))


@pytest.mark.slow
def test_vissl_wide_trunk_reproduces_vissl(tmp_path, capsys):
    """A VISSL RN50-w2 trunk (SwAV's wide model): stem 128, res2 512 out."""
    model = _randomize_bn(_vissl_trunk(2), seed=2)
    src, dst = tmp_path / "vissl.torch", tmp_path / "d2.pkl"
    torch.save(make_checkpoint("vissl", model.state_dict(), 50), src)
    assert cli.main(["convert", str(src), str(dst)]) == 0
    report = capsys.readouterr().out
    assert "(vissl), ResNet-50 w2," in report
    for s in ("NUM_GROUPS 1", "WIDTH_PER_GROUP 128", "STEM_OUT_CHANNELS 128",
              "RES2_OUT_CHANNELS 512"):  # fmt: skip
        assert f"MODEL.RESNETS.{s}\n" in report
    _check_exact(dst, model, C.Arch(50, 1, 128, 2))


def test_bare_sequential_trunk_with_its_classifier(resnets, tmp_path, capsys):
    """torch.save(nn.Sequential(*resnet.children()).state_dict()): no prefix, fc at index 9."""
    model = resnets[18]
    src, dst = tmp_path / "seq.pth", tmp_path / "d2.pkl"
    torch.save(_as_sequential(dict(model.state_dict()), 18, keep_fc=True), src)
    assert cli.main(["convert", str(src), str(dst)]) == 0
    report = capsys.readouterr().out
    assert "(lightly), ResNet-18, trunk at top level with prefix ''" in report
    assert "9. (fc) (2)" in report  # the classifier's weight and bias, dropped
    with open(dst, "rb") as f:
        out = pickle.load(f)["model"]
    np.testing.assert_array_equal(out["res5.1.conv2.norm.running_var"],
                                  model.state_dict()["layer4.1.bn2.running_var"].numpy())


def test_refuses_sequential_that_is_not_torchvision_children(tmp_path, capsys, r18_state):
    """lightly's own CIFAR ResNetGenerator puts layer1 at index 2: not torchvision's order."""
    index = {0: 0, 1: 1, 4: 2, 5: 3, 6: 4, 7: 5}  # conv1, bn1, layer1..4 with no relu/maxpool
    shifted = {}
    for k, v in _as_sequential(r18_state, 18).items():
        i, rest = k.split(".", 1)
        shifted[f"{index[int(i)]}.{rest}"] = v
    line = _refused(tmp_path, capsys, {"state_dict": _prefixed("backbone.", shifted)})
    assert "backbone.2.0.conv1.weight: torchvision's ResNet children" in line


@pytest.fixture(scope="module")
def resnext_state():
    torch.manual_seed(3)
    return dict(torchvision.models.resnext50_32x4d().state_dict())


def test_refuses_truncated_resnext(tmp_path, capsys, resnext_state):
    state = dict(resnext_state)
    del state["layer4.2.conv3.weight"]
    line = _refused(tmp_path, capsys, make_checkpoint("moco", state, 50))
    assert "ResNeXt-50 32x4d keys missing: layer4.2.conv3.weight" in line
    state = {k: v for k, v in resnext_state.items() if not k.startswith("layer4.2.")}
    line = _refused(tmp_path, capsys, state)
    assert "not a ResNet-18/34/50/101/152 trunk (bottleneck blocks per stage 3-4-6-2)" in line
    state = dict(resnext_state)
    state["layer2.1.conv2.weight"] = torch.randn(256, 4, 3, 3)  # 64 groups where it has 32
    line = _refused(tmp_path, capsys, make_checkpoint("simsiam", state, 50))
    assert "shape mismatch for ResNeXt-50 32x4d: layer2.1.conv2.weight (256, 4, 3, 3)" in line
    assert "(expected (256, 8, 3, 3))" in line


def test_refuses_truncated_file(tmp_path, capsys, resnext_state):
    full = tmp_path / "full.pth"
    torch.save(resnext_state, full)
    data = full.read_bytes()
    full.unlink()
    line = _refused(tmp_path, capsys, data[: len(data) // 2])
    assert "in.pth: not a readable PyTorch checkpoint" in line


def test_wide_settings_merge_into_a_config():
    arch = C.Arch(50, 1, 128, 2)
    cfg = get_detection_cfg(None, C.detectron2_opts(arch))
    r = cfg.MODEL.RESNETS
    widths = (r.NUM_GROUPS, r.WIDTH_PER_GROUP, r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS)
    assert widths == (1, 128, 128, 512)
