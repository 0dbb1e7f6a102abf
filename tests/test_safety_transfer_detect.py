"""Crafted bad input for `feataug detect`: weights files never run code, and weights that do not
fit, contradictory flags and unusable outputs are refused before anything is written.

Each refusal: exit status 2, one line on stderr naming the file or flag, and every file under
the test folder byte-identical afterwards (sha256), with no OUTPUT_DIR created. Positive controls
show that the same checks pass weights that do fit.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torchvision

pytest.importorskip("detectron2")
pytestmark = [pytest.mark.detectron2, pytest.mark.usefixtures("one_thread")]


sys.path.insert(0, str(Path(__file__).parent))
from conftest import refused  # noqa: E402
from detect_data import make_coco, make_voc  # noqa: E402
from test_safety_transfer import Payload  # noqa: E402

from transfer import convert, detect  # noqa: E402
from transfer.weights import checkpointer_class  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
TINY = CONFIGS / "tiny_faster_R18_FPN.yaml"
C4 = CONFIGS / "pascal_voc_R_50_C4_24k.yaml"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Converted R18 and R50 weights, an unconverted torchvision R18 and a pretraining-style
    checkpoint (trunk under ``model.encoder_q.``), all from random torchvision ResNets."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for depth in (18, 50):
        torch.manual_seed(depth)
        state = getattr(torchvision.models, f"resnet{depth}")().state_dict()
        torch.save(state, folder / f"tv{depth}.pth")
        convert.convert(folder / f"tv{depth}.pth", folder / f"r{depth}.pkl")
        out[f"r{depth}"], out[f"tv{depth}"] = folder / f"r{depth}.pkl", folder / f"tv{depth}.pth"
    state = torch.load(out["tv18"], weights_only=True)
    last = {"version": 1, "model": {f"encoder_q.{k}": v for k, v in state.items()}, "iter": 9}
    torch.save(last, folder / "last.pth")
    out["last"] = folder / "last.pth"
    return out


def _options(argv) -> detect.DetectOptions:
    """The options `feataug detect ARGV` runs with."""
    parser = argparse.ArgumentParser()
    detect.add_arguments(parser)
    return detect.DetectOptions.from_args(parser.parse_args([str(a) for a in argv]))


def _argv(tmp_path: Path, *extra, config=TINY) -> list:
    if not (tmp_path / "voc").exists():
        make_voc(tmp_path / "voc", n_train=2, n_test=1)
    return [
        "--config-file", config, "--register-voc", "tr", tmp_path / "voc", "trainval", *extra,
        "DATASETS.TRAIN", "('tr',)", "DATASETS.TEST", "('tr',)", "DATASETS.AUTO_NUM_CLASSES",
        "True", "OUTPUT_DIR", tmp_path / "out",
    ]  # fmt: skip


def detect_refused(tmp_path: Path, capsys, argv) -> str:
    """`feataug detect ARGV` refused (conftest.refused) with nothing under ``tmp_path`` changed
    and no OUTPUT_DIR; returns the line."""
    line = refused(capsys, ["detect", *argv], keep=[tmp_path])
    assert not (tmp_path / "out").exists()
    return line


# ------------------------------------------------------------------------- weights that run code


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "pathlib.Path.touch"])
def test_weights_with_a_payload_are_refused(payload, suffix, tmp_path, capsys, catalog, weights):
    """Converted weights plus a payload: refused at setup, naming the file and the global; the
    checkpointer used for training refuses it too."""
    marker = tmp_path / "MARKER"
    with open(weights["r18"], "rb") as f:
        data = pickle.load(f)
    data["extra"] = Payload(payload, marker)
    bad = tmp_path / f"bad{suffix}"
    if suffix == ".pkl":
        bad.write_bytes(pickle.dumps(data))
    else:
        data["model"] = {k: torch.from_numpy(v) for k, v in data["model"].items()}
        torch.save(data, bad)
    line = detect_refused(tmp_path, capsys, _argv(tmp_path, "MODEL.WEIGHTS", bad))
    names = {"os.system": "posix.system", "pathlib.Path.touch": "pathlib.Path.touch"}
    if suffix == ".pth" and payload == "pathlib.Path.touch":
        names[payload] = "builtins.getattr"  # torch.save's protocol 2 reaches it by getattr
    assert f"{bad}: refused to load: its pickle names {names.get(payload, payload)}," in line
    model = torch.nn.Linear(1, 1)
    with pytest.raises(detect.DetectError, match="refused to load"):
        checkpointer_class()(model).load(str(bad))
    assert not marker.exists()


# ------------------------------------------------------------------------- weights that do not fit


def _c4_missing_res5(weights, tmp_path: Path) -> Path:
    with open(weights["r50"], "rb") as f:
        data = pickle.load(f)
    del data["model"]["res5.2.conv3.norm.running_var"]
    path = tmp_path / "r50_cut.pkl"
    path.write_bytes(pickle.dumps(data))
    return path


CASES = [
    # (id, extra argv, config, words the line must contain)
    ("empty weights", [], TINY, "MODEL.WEIGHTS is empty: the model would train from random"),
    ("from scratch and weights", ["--from-scratch", "MODEL.WEIGHTS", "r18"], TINY,
     "--from-scratch contradicts MODEL.WEIGHTS"),
    ("eval-only from scratch", ["--eval-only", "--from-scratch"], TINY,
     "cannot be combined with --from-scratch"),
    ("R50 into R18", ["MODEL.WEIGHTS", "r50"], TINY,
     "wrong depth? the file is ResNet-50, the config MODEL.RESNETS.DEPTH 18"),
    ("R18 into R50-C4", ["MODEL.WEIGHTS", "r18"], C4,
     "wrong depth? the file is ResNet-18, the config MODEL.RESNETS.DEPTH 50"),
    ("unconverted torchvision", ["MODEL.WEIGHTS", "tv18"], TINY,
     "100 of 100 backbone tensors would stay random (backbone.bottom_up.stem.conv1.weight"),
    ("pretraining last.pth", ["MODEL.WEIGHTS", "last"], TINY, "not converted? run feataug convert"),
    ("config without the weights' normalisation", ["MODEL.WEIGHTS", "r18", "MODEL.PIXEL_STD",
     "[1.0, 1.0, 1.0]", "INPUT.FORMAT", "BGR"], TINY,
     "these weights need INPUT.FORMAT RGB (config: BGR); MODEL.PIXEL_STD [58.395, 57.12, 57.375] "
     "(config: [1.0, 1.0, 1.0])"),
    ("C4 res5 tensor missing", ["MODEL.WEIGHTS", "cut"], C4,
     "1 of 265 backbone tensors would stay random (roi_heads.res5.2.conv3.norm.running_var); "
     "the file holds a ResNet-50 but not these"),  # 265: 53 convs + 53 BNs x 4
    ("eval-only of a backbone", ["--eval-only", "MODEL.WEIGHTS", "r18"], TINY,
     "--eval-only needs the whole model from the file"),
]  # fmt: skip


@pytest.mark.parametrize("extra, config, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_weights_that_do_not_fit_are_refused(
    extra, config, words, tmp_path, capsys, catalog, weights
):
    files = dict(weights, cut=_c4_missing_res5(weights, tmp_path) if "cut" in extra else None)
    extra = [files.get(a, a) for a in extra]
    line = detect_refused(tmp_path, capsys, _argv(tmp_path, *extra, config=config))
    assert words in line, line


@pytest.mark.parametrize(
    "extra, config",
    [(["MODEL.WEIGHTS", "r18"], TINY), (["MODEL.WEIGHTS", "r50"], C4), (["--from-scratch"], TINY)],
    ids=["R18 into R18-FPN", "R50 into R50-C4", "from scratch"],
)
def test_weights_that_fit_pass_setup(extra, config, tmp_path, catalog, weights):
    extra = [weights.get(a, a) for a in extra]
    cfg = detect.setup(_options(_argv(tmp_path, *extra, config=config)))
    assert cfg.MODEL.WEIGHTS == (str(extra[1]) if len(extra) == 2 else "")


def test_run_detection_from_scratch_flag(tmp_path, catalog, weights):
    make_voc(tmp_path / "voc", n_train=2, n_test=1)
    reg = [("tr", tmp_path / "voc", "trainval")]
    opts = ["DATASETS.TRAIN", "('tr',)", "OUTPUT_DIR", tmp_path / "o"]
    with pytest.raises(detect.DetectError, match="MODEL.WEIGHTS is empty"):
        detect.run_detection(TINY, opts, register_voc=reg)
    with pytest.raises(detect.DetectError, match="--from-scratch contradicts MODEL.WEIGHTS"):
        detect.run_detection(
            TINY, [*opts, "MODEL.WEIGHTS", weights["r18"]], register_voc=reg, from_scratch=True
        )
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------- files and folders


@pytest.mark.parametrize(
    "setup_file, words",
    [
        (lambda d: (d / "w.pkl").write_text("MODEL:\n  WEIGHTS: x\n") and d / "w.pkl",
         "w.pkl: not a readable pickle"),
        (lambda d: (d / "w.pth").write_bytes(b"not a torch file") and d / "w.pth",
         "w.pth: not a readable PyTorch checkpoint"),
        (lambda d: (d / "w.pkl").write_bytes(pickle.dumps([1, 2])) and d / "w.pkl",
         "w.pkl: not Detectron2 weights (a list)"),
        (lambda d: torch.save({"state_dict": {}, "epoch": 3}, d / "w.pth") or d / "w.pth",
         "w.pth: not Detectron2 weights (model['state_dict'] is a dict): a training checkpoint? "
         "run feataug convert"),
    ],
    ids=["text as .pkl", "junk as .pth", "pickled list", "training checkpoint"],
)  # fmt: skip
def test_weights_that_are_not_weights(setup_file, words, tmp_path, capsys, catalog):
    path = setup_file(tmp_path)
    assert words in detect_refused(tmp_path, capsys, _argv(tmp_path, "MODEL.WEIGHTS", path))


def test_output_dir_that_is_a_file(tmp_path, capsys, catalog, weights):
    argv = _argv(tmp_path, "MODEL.WEIGHTS", weights["r18"])
    (tmp_path / "out").write_text("results of last week")
    line = refused(capsys, ["detect", *argv], keep=[tmp_path])
    assert f"OUTPUT_DIR {tmp_path / 'out'}: exists and is not a folder" in line
    argv[argv.index(tmp_path / "out")] = tmp_path / "out" / "sub"
    assert "cannot be created" in refused(capsys, ["detect", *argv], keep=[tmp_path])


def test_a_fresh_run_never_replaces_an_earlier_one(tmp_path, capsys, catalog, weights):
    out = tmp_path / "out"
    (out / "trial0").mkdir(parents=True)
    (out / "model_final.pth").write_bytes(b"last week's model")
    (out / "trial0" / "eval_results.json").write_text('{"bbox": {"AP": 41.0}}')
    argv = _argv(tmp_path, "MODEL.WEIGHTS", weights["r18"])
    line = refused(capsys, ["detect", *argv], keep=[tmp_path])
    assert (f"OUTPUT_DIR {out} already holds a run (model_final.pth, "
            "trial0/eval_results.json): use --resume") in line, line


# ------------------------------------------------------------------------- resumed checkpoints


@pytest.mark.parametrize("extra,short", [({"extra": torch.zeros(2)}, {}),
                                         ({}, {"bias"})])
def test_the_exact_checkpointer_refuses_a_checkpoint_of_another_model(tmp_path, extra, short):
    """With ``exact`` (resuming a run's own checkpoint, also in the processes ``launch``
    starts) a tensor the model lacks, or one the file lacks, is a DetectError naming the file;
    without it Detectron2 loads what fits, as for MODEL.WEIGHTS."""
    state = {"weight": torch.full((1, 1), 2.0), "bias": torch.full((1,), 3.0), **extra}
    path = tmp_path / "model_0000004.pth"
    torch.save({"model": {k: v for k, v in state.items() if k not in short}}, path)
    exact = checkpointer_class()(torch.nn.Linear(1, 1))
    exact.exact = True
    with pytest.raises(detect.DetectError, match=rf"^{path}: does not fit the model \("):
        exact.load(str(path))
    model = torch.nn.Linear(1, 1)
    checkpointer_class()(model).load(str(path))
    assert model.weight.item() == 2.0

def test_a_pycls_file_with_a_payload_is_refused(tmp_path, monkeypatch):
    """``.pyth`` files went to Detectron2's plain ``torch.load``; with weights-only loading
    switched off in the environment, that would run the payload."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    torch.save({"model_state": {"weight": torch.zeros(1, 1)}, "x": Payload("os.system", marker)},
               tmp_path / "evil.pyth")
    with pytest.raises(detect.DetectError, match="refused to load"):
        checkpointer_class()(torch.nn.Linear(1, 1)).load(str(tmp_path / "evil.pyth"))
    assert not marker.exists()
    torch.save({"model_state": {"weight": torch.ones(1, 1), "bias": torch.ones(1)}},
               tmp_path / "good.pyth")
    model = torch.nn.Linear(1, 1)
    checkpointer_class()(model).load(str(tmp_path / "good.pyth"))  # positive control
    assert model.weight.item() == 1.0 and model.bias.item() == 1.0


@pytest.mark.parametrize("trials", [None, 2], ids=["one run", "trials"])
def test_resuming_needs_exactly_the_model_in_the_checkpoint(trials, tmp_path, capsys, catalog,
                                                            weights):
    """OUTPUT_DIR's own checkpoint (``last_checkpoint``, per trial with --trials) is loaded
    instead of MODEL.WEIGHTS when resuming: a tensor of another shape or one the model lacks is
    refused before anything is written, not warned about."""
    from detectron2.modeling import build_model

    argv = [*(["--trials", str(trials)] if trials else []),
            *_argv(tmp_path, "MODEL.WEIGHTS", weights["r18"])]
    model = build_model(detect.setup(_options(argv)))
    state = model.state_dict()
    key = "roi_heads.box_predictor.cls_score.weight"
    n, d = state[key].shape
    good = {"model": dict(state), "iteration": 4}
    state[key] = torch.zeros(n + 1, d)
    state["an.extra.tensor"] = torch.zeros(1)
    folder = tmp_path / "out" / ("trial1" if trials else "")
    folder.mkdir(parents=True)
    torch.save({"model": state, "iteration": 4}, folder / "model_0000004.pth")
    (folder / "last_checkpoint").write_text("model_0000004.pth")
    # keep: refused before provenance, config or log were written
    line = refused(capsys, ["detect", "--resume", *argv], keep=[tmp_path])
    assert line.startswith(
        f"feataug detect: error: {folder / 'model_0000004.pth'}: does not fit the model ({key} "
        f"(shape {(n + 1, d)} in the file, {(n, d)} in the model), an.extra.tensor (not in the "
        "model)): --resume continues a run of this config"), line
    torch.save(good, folder / "model_0000004.pth")  # positive control: its own model resumes
    assert detect.setup(_options(["--resume", *argv])).MODEL.WEIGHTS == str(weights["r18"])
    (folder / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(detect.DetectError, match="names 'model_0000009.pth', which is not in"):
        detect.setup(_options(["--resume", *argv]))


def test_eval_only_never_writes_into_a_run(tmp_path, capsys, catalog, weights):
    argv = _argv(tmp_path, "MODEL.WEIGHTS", weights["r18"])
    assert "--eval-only with --resume would evaluate into the run's own folder" in detect_refused(
        tmp_path, capsys, ["--eval-only", "--resume", *argv])


# ------------------------------------------------------------------------- COCO data, config types


def _coco_argv(tmp_path: Path, json_file: Path) -> list:
    return [
        "--config-file", TINY, "--register-coco", "c", json_file, tmp_path / "coco" / "images",
        "--from-scratch", "DATASETS.TRAIN", "('c',)", "DATASETS.TEST", "('c',)",
        "DATASETS.AUTO_NUM_CLASSES", "True", "OUTPUT_DIR", tmp_path / "out",
    ]  # fmt: skip


REPEATS = {  # section -> (the entry added, the refusal)
    "annotations": (lambda gt: dict(gt["annotations"][1]), "annotation id 2 appears twice"),
    "categories": (lambda gt: {"id": 3, "name": "green"}, "category id 3 appears twice"),
    "images": (lambda gt: dict(gt["images"][1]), "image id 2 appears twice"),
}


@pytest.mark.parametrize("section", list(REPEATS))
def test_register_coco_refuses_repeated_ids(section, tmp_path, capsys, catalog):
    """The checks of `feataug coco-eval` at registration, where Detectron2's loader would stop
    with an AssertionError (or rename a category); the file without the repeat passes setup."""
    path = make_coco(tmp_path / "coco", "syn", n_images=3)
    good = json.loads(path.read_text())
    entry, words = REPEATS[section]
    bad = tmp_path / "coco" / "bad.json"
    bad.write_text(json.dumps({**good, section: [*good[section], entry(good)]}))
    assert detect_refused(tmp_path, capsys, _coco_argv(tmp_path, bad)).endswith(f"{bad}: {words}")
    cfg = detect.setup(_options(_coco_argv(tmp_path, path)))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2 and not (tmp_path / "out").exists()


def test_register_coco_refuses_missing_image_files(tmp_path, capsys, catalog):
    path = make_coco(tmp_path / "coco", "syn", n_images=3)
    for name in ("syn_001.jpg", "syn_002.jpg"):
        (tmp_path / "coco" / "images" / name).unlink()
    line = detect_refused(tmp_path, capsys, _coco_argv(tmp_path, path))
    assert line.endswith(f"{tmp_path / 'coco' / 'images' / 'syn_001.jpg'}: image file not found "
                         f"(2 of the 3 images of {path} are missing)")


@pytest.mark.parametrize("key, value, words", [
    ("SOLVER.STEPS", "('a',)", "must be a flat list of integers (the default is [30000]), got "
     "['a']"),
    ("MODEL.PIXEL_MEAN", "[[123.7, 116.3, 103.5]]", "must be a flat list of numbers"),
    ("MODEL.PIXEL_STD", "[58.4, 57.1]", "has 2 values, but INPUT.FORMAT RGB images have 3 "
     "channels"),
    ("MODEL.PIXEL_STD", "[58.4, 0.0, 57.4]", "must be positive numbers"),
    ("MODEL.RESNETS.OUT_FEATURES", "[4]", "must be a flat list of strings"),
    ("INPUT.MIN_SIZE_TRAIN", "(320.5,)", "must be a flat list of integers"),
])  # fmt: skip
def test_config_values_of_the_wrong_type_are_refused_at_load(key, value, words, tmp_path, capsys,
                                                             catalog):
    """Refused when the config is read (Detectron2 would fail after building the model, with
    OUTPUT_DIR created), naming the override; in a file, naming the file."""
    line = detect_refused(tmp_path, capsys, [*_argv(tmp_path, "--from-scratch"), key, value])
    assert f"error: command-line override {key} {value}: {key} {words}" in line
    config = tmp_path / "steps.yaml"
    config.write_text(f"_BASE_: {TINY}\nSOLVER:\n  STEPS: [10, [20]]\n")
    line = detect_refused(tmp_path, capsys, _argv(tmp_path, "--from-scratch", config=config))
    assert f"error: {config}: SOLVER.STEPS must be a flat list of integers" in line
