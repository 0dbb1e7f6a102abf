"""``transfer.checkpoint``: SafeCheckpointer loads what Detectron2's DetectionCheckpointer loads.

The safe checkpointer reads files itself and loads their tensors with its own code; on the same
files, the model ends with the same tensors and the load reports the same incompatible keys as
Detectron2's own checkpointer (the oracle, read here with its pickle / torch.load on files these
tests wrote).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.detectron2, pytest.mark.usefixtures("one_thread")]

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from transfer import convert  # noqa: E402
from transfer.checkpoint import SafeCheckpointer, load_model_state  # noqa: E402
from transfer.config import get_detection_cfg  # noqa: E402
from transfer.weights import DetectError  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "detection" / "tiny_faster_R18_FPN.yaml"


class _Detectron2(DetectionCheckpointer):
    """Detectron2's checkpointer, keeping the incompatible keys its load reports."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


class _Safe(SafeCheckpointer):
    """The safe checkpointer, keeping the incompatible keys its load reports."""

    def log_incompatible(self, result):
        self.incompatible = result
        super().log_incompatible(result)


class _Net(nn.Module):
    """A conv + BN + linear model with Detectron2's pixel_mean / pixel_std buffers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.register_buffer("pixel_std", torch.ones(3, 1, 1))


class _Wrapped(nn.Module):
    """:class:`_Net` one level down, as a detector holds a backbone."""

    def __init__(self):
        super().__init__()
        self.body = _Net()


def _both(build, path: str, **kwargs):
    """(Detectron2's model and incompatible keys, the safe checkpointer's) for ``path``."""
    out = []
    for kind in (_Detectron2, _Safe):
        torch.manual_seed(0)
        model = build()
        ckpt = kind(model, **kwargs)
        extra = ckpt.load(path)
        out.append((model, ckpt.incompatible, extra))
    return out


def _assert_same(ref, ours) -> None:
    (m1, inc1, extra1), (m2, inc2, extra2) = ref, ours
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=0, atol=0, msg=k)
    assert sorted(inc1.missing_keys) == sorted(inc2.missing_keys)
    assert sorted(inc1.unexpected_keys) == sorted(inc2.unexpected_keys)
    assert sorted(inc1.incorrect_shapes) == sorted(inc2.incorrect_shapes)
    assert extra1.keys() == extra2.keys()


def test_converted_weights_load_into_a_detector_as_detectron2_loads_them(tmp_path):
    """A converted ResNet-18 (Detectron2 names, matching heuristics) into the tiny R18-FPN."""
    import torchvision

    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    convert.convert(tmp_path / "tv.pth", tmp_path / "r18.pkl")
    cfg = get_detection_cfg(TINY, ["MODEL.DEVICE", "cpu"])
    ref, ours = _both(lambda: build_model(cfg), str(tmp_path / "r18.pkl"))
    _assert_same(ref, ours)
    assert any(k.startswith("roi_heads.") for k in ours[1].missing_keys)  # a trunk only
    assert not any(k.startswith("backbone.bottom_up.") for k in ours[1].missing_keys)


@pytest.mark.parametrize("case", ["exact", "missing, extra and shapes", "module. prefix",
                                  "no pixel stats", "matching query"])
def test_torch_files_load_as_detectron2_loads_them(tmp_path, case):
    torch.manual_seed(2)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in _Net().state_dict().items()}
    path = str(tmp_path / "model.pth")
    if case == "missing, extra and shapes":
        del state["fc.bias"]
        state["conv.weight"] = torch.zeros(5, 3, 3, 3)
        state["anchor_generator.cell_anchors.0"] = torch.zeros(1)
        state["head.extra"] = torch.zeros(2)
    elif case == "module. prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif case == "no pixel stats":
        del state["pixel_mean"], state["pixel_std"]
    torch.save({"model": state, "iteration": 7}, path)
    build = _Net
    if case == "matching query":  # Detectron2's ?matching_heuristics=True: names by suffix
        path, build = path + "?matching_heuristics=True", _Wrapped
    ref, ours = _both(build, path)
    _assert_same(ref, ours)
    if case in ("exact", "module. prefix", "matching query"):
        assert ours[1] == ([], [], [])  # every tensor loaded
        assert torch.equal(ours[0].state_dict()[f"{'body.' * (build is _Wrapped)}fc.weight"],
                           state[f"{'module.' * (case == 'module. prefix')}fc.weight"])


def test_caffe2_and_pycls_pickles_load_as_detectron2_loads_them(tmp_path):
    torch.manual_seed(3)
    state = {k: v.numpy() for k, v in _Net().state_dict().items()
             if not k.endswith("num_batches_tracked")}
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"blobs": state}))
    _assert_same(*_both(_Net, str(tmp_path / "plain.pkl")))
    torch.save({"model_state": {k: torch.from_numpy(v) for k, v in state.items()}},
               tmp_path / "net.pyth")
    _assert_same(*_both(_Net, str(tmp_path / "net.pyth")))


def test_checkpointables_resume_and_the_extra_entries(tmp_path):
    """Resuming loads every checkpointable from the last checkpoint, which must be exactly the
    model; a plain load of ``path`` loads the model only."""
    torch.manual_seed(4)
    model, other = _Net(), _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saver = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer)
    optimizer.state[model.fc.weight]["momentum_buffer"] = torch.ones(2, 4)
    saver.save("model_0000004", iteration=4)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    safe = SafeCheckpointer(other, str(tmp_path), optimizer=opt2)
    extra = safe.resume_or_load("", resume=True)
    assert extra == {"iteration": 4}
    assert torch.equal(opt2.state[other.fc.weight]["momentum_buffer"], torch.ones(2, 4))
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    # the run's own checkpoint of another model: refused, not warned about
    torch.save({"model": {**model.state_dict(), "more": torch.zeros(1)}},
               tmp_path / "model_0000009.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(DetectError, match=r"model_0000009.pth: does not fit the model \(more "):
        safe.resume_or_load("", resume=True)
    fresh = _Net()
    opt3 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    plain = SafeCheckpointer(fresh, str(tmp_path), optimizer=opt3)
    extra = plain.resume_or_load(str(tmp_path / "model_0000004.pth"), resume=False)
    assert set(extra) == {"optimizer", "iteration"} and not opt3.state  # the model only
    assert torch.equal(fresh.fc.weight, model.fc.weight)


def test_load_model_state_reports_without_loading_on_meta(tmp_path):
    """The fit check's use: a meta-device model, no memory, the same report."""
    with torch.device("meta"):
        model = _Net()
    state = {k: torch.zeros(v.shape) for k, v in _Net().state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 4)
    del state["bn.bias"]
    result = load_model_state(model, {"model": state})
    assert result.incorrect_shapes == [("fc.weight", (3, 4), (2, 4))]
    assert result.missing_keys == ["bn.bias", "fc.weight"] and result.unexpected_keys == []


def test_a_query_detectron2_does_not_know_is_refused(tmp_path):
    torch.save({"model": _Net().state_dict()}, tmp_path / "m.pth")
    with pytest.raises(DetectError, match=r"m.pth\?other=1: unsupported URL query"):
        SafeCheckpointer(_Net()).load(f"{tmp_path / 'm.pth'}?other=1")
