"""`feataug lincls` on any checkpoint `feataug convert` reads, in a published protocol, under
DDP, exactly resumable.

Truth, per test: (1) a random torchvision ResNet-18 saved in MoCo's public layout and the same
tensors in a FeatAug checkpoint (``pretrain.checkpoint.build_checkpoint``) give the torchvision
net's own features, exactly, and the same evaluation, bit for bit; (2) an evaluation interrupted
after epoch 1 and resumed ends with the uninterrupted run's layer and optimizer state, bit for bit,
and its accuracy; (3) two gloo processes give the one-process top-1 / top-5, each having loaded only
its share of the images (the tolerance on the weights is derived in the test); (4) every refusal is
one line and leaves the folders as they were; the protocol numbers are the published ones
(``pretrain/lincls.py`` names the sources). A tiny set: 16 training and 12 validation images of
two tinted classes at 32 px, 3 epochs of 2 steps, batch 8.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchvision
from conftest import refused, spawn_ranks
from test_engine import _images

import pretrain.lincls as lincls
from feataug import cli
from feataug import lincls as app
from pretrain.config import get_cfg, load_cfg
from pretrain.data import ResumableSampler
from pretrain.utils.lock import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
EPS = torch.finfo(torch.float32).eps


def _opts(data: Path, *more) -> list[str]:
    """Every key the evaluation depends on, so a MoCo file (default config) and a FeatAug one
    (its stored config) run the same evaluation."""
    return [str(x) for x in (
        "DATA.KNN_TRAIN_ROOT", data / "train", "DATA.KNN_VAL_ROOT", data / "val",
        "DATA.IMAGE_SIZE", 32, "DATA.KNN_FORMAT", "folder", "DATALOADER.NUM_WORKERS", 0,
        "DEVICE", "cpu", "SOLVER.AMP", "off", "SEED", 0, "LINCLS.EPOCHS", 3,
        "LINCLS.BATCH_SIZE", 8, "LINCLS.BASE_LR", 0.3, *more)]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Labelled images and one random ResNet-18 in two layouts."""
    from tiny_models import build, tiny_cfg

    from pretrain.checkpoint import build_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("lincls_any")
    _images(root / "data" / "train", 16, seed=1), _images(root / "data" / "val", 12, seed=2)
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for m in net.modules():  # BN statistics of a trained net, not the identity of a fresh one
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    trunk = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    mlp = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512),
           "fc.2.weight": torch.randn(128, 512), "fc.2.bias": torch.randn(128)}
    state = {f"module.encoder_{e}.{k}": v.clone() for e in "qk" for k, v in {**trunk, **mlp}.items()}
    state |= {"module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1).long()}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, root / "moco_r18.pth.tar")
    cfg = tiny_cfg("moco")
    model = build(cfg)
    model.backbone.load_state_dict(trunk)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(build_checkpoint(cfg=cfg, model=model, optimizer=optimizer, epoch=1,
                                     iteration=1), root / "feataug.pth")
    net.fc = torch.nn.Identity()
    return dict(root=root, data=root / "data", moco=root / "moco_r18.pth.tar",
                feataug=root / "feataug.pth", net=net.eval())


def _args(argv: list) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    return cli.parse_args(parser, [str(a) for a in argv])


def _features(backbone, data: Path) -> torch.Tensor:
    from pretrain.data import build_eval_dataset
    from pretrain.evaluation import eval_loader, extract_features
    from pretrain.transforms import build_eval_transform

    cfg = load_cfg(opts=_opts(data))
    val = build_eval_dataset(cfg, str(data / "val"), build_eval_transform(32))
    return extract_features(backbone, eval_loader(val, 4, 0), torch.device("cpu"), l2=False)[0]


def _head(folder: Path) -> dict:
    return torch.load(folder / lincls.STATE_NAME, weights_only=True)


# ----------------------------------------------------------------------------- (1) formats
def test_moco_and_feataug_layouts_give_the_same_features_and_accuracy(files, capsys):
    sources = {name: app.read_source(str(files[name])) for name in ("moco", "feataug")}
    assert [t.format.name for t, _ in sources.values()] == ["moco", "feataug"]
    assert sources["moco"][1] is None and sources["feataug"][1] is not None  # its stored config
    reference = _features(files["net"], files["data"])  # [12, 512], the torchvision net's own
    for name, (trunk, _) in sources.items():
        assert trunk.arch.title == "ResNet-18" and trunk.stem == "imagenet"
        assert torch.equal(_features(app.build_trunk(trunk), files["data"]), reference), name
    results = {}
    for name in sources:
        out = files["root"] / f"ev_{name}"
        assert cli.main(["lincls", "--checkpoint", str(files[name]), "--output-dir", str(out),
                         *_opts(files["data"])]) == 0
        results[name] = (json.loads((out / "lincls.json").read_text()), _head(out))
        record = json.loads((out / "provenance.json").read_text())["checkpoint"]
        from pretrain.utils.provenance import file_sha256

        assert record["sha256"] == file_sha256(files[name]) and record["format"] == name
    (moco, moco_state), (ours, our_state) = results["moco"], results["feataug"]
    assert (moco["top1"], moco["top5"]) == (ours["top1"], ours["top5"])
    assert moco["top1"] > 50 and moco["top5"] == 100.0  # 2 classes: top-5 is top-2
    for k, v in moco_state["head"].items():
        assert torch.equal(v, our_state["head"][k]), k
    assert "top-1" in capsys.readouterr().out


class _Marker:
    """Unpickling this would create ``path`` (if anything ever executed it)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_foreign_checkpoint_is_read_without_running_anything(files, tmp_path):
    """transfer's reader: objects of other classes (here a pickled ``os.system`` call) become
    inert placeholders, named in the notes; the trunk is read all the same."""
    ckpt = torch.load(files["moco"], weights_only=True)
    ckpt["args"] = _Marker(tmp_path / "MARKER")
    torch.save(ckpt, tmp_path / "payload.pth")
    trunk, config = app.read_source(str(tmp_path / "payload.pth"))
    assert not (tmp_path / "MARKER").exists() and config is None
    assert trunk.format.name == "moco" and "posix.system" in " ".join(trunk.notes)


def test_a_cifar_stem_is_read_from_the_feataug_record(files, tmp_path):
    """A 3x3 conv1 is evaluated with FeatAug's stem (padding 1, no max-pool) only where the
    checkpoint records it (a foreign one is refused: test_a_checkpoint_that_does_not_fit...)."""
    from tiny_models import build, tiny_cfg

    from pretrain.checkpoint import build_checkpoint, save_checkpoint

    cfg = tiny_cfg("moco")
    cfg.MODEL.STEM = "cifar"
    model = build(cfg).eval()
    save_checkpoint(build_checkpoint(cfg=cfg, model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), epoch=1, iteration=1), tmp_path / "cifar.pth")
    trunk, _ = app.read_source(str(tmp_path / "cifar.pth"))
    assert (trunk.stem, trunk.arch.title) == ("cifar", "ResNet-18")
    net = app.build_trunk(trunk)
    assert isinstance(net.maxpool, torch.nn.Identity) and net.conv1.padding == (1, 1)
    assert torch.equal(_features(net, files["data"]), _features(model.backbone, files["data"]))


def test_the_default_folder_is_beside_the_checkpoint(files):
    assert cli.main(["lincls", "--checkpoint", str(files["moco"]), *_opts(files["data"]),
                     "LINCLS.EPOCHS", "1", "LINCLS.AUGMENT", "False"]) == 0
    folder = files["root"] / "moco_r18_lincls"
    assert {p.name for p in folder.iterdir()} == {"lincls.json", "lincls_last.pth",
                                                  "config.yaml", "provenance.json"}


# ----------------------------------------------------------------------------- (2) resume
@pytest.fixture(scope="module")
def whole(files) -> Path:
    """An uninterrupted evaluation in SimSiam's protocol (LARS, cosine over the 3 epochs)."""
    app.run(_args([*_simsiam(files), "--output-dir", files["root"] / "whole"]))
    return files["root"] / "whole"


def _simsiam(files) -> list:
    return ["--checkpoint", files["moco"], "--protocol", "simsiam", *_opts(files["data"])]


@pytest.mark.parametrize("when", ["after epoch 1", "in epoch 2"])
def test_an_interrupted_and_resumed_evaluation_ends_bit_identical(files, whole, tmp_path, when,
                                                                  monkeypatch):
    """Stopped after epoch 1 is saved (``on_epoch``), or killed in the middle of epoch 2 (its
    first step taken, then Ctrl-C): the resumed run redoes epoch 2 from the saved state. The
    momentum buffers, each epoch's lr and the epochs' order and crops must all be right."""
    from pretrain.solver import LARS

    opts, parts = _simsiam(files), tmp_path / "parts"

    def stop(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    if when == "in epoch 2":
        step, calls = LARS.step, []

        def step_then_stop(self, closure=None):
            step(self, closure)
            calls.append(1)
            if len(calls) == 3:  # 2 steps per epoch: the first of epoch 2 is done
                raise KeyboardInterrupt

        monkeypatch.setattr(LARS, "step", step_then_stop)
    with pytest.raises(KeyboardInterrupt, match="after 1 of 3 epochs; .* holds epoch 1"):
        app.run(_args([*opts, "--output-dir", parts]),
                on_epoch=stop if when == "after epoch 1" else None)
    monkeypatch.undo()
    assert _head(parts)["epoch"] == 1 and not (parts / "lincls.json").exists()
    app.run(_args([*opts, "--output-dir", parts, "--resume"]))
    a, b = _head(whole), _head(parts)
    assert a["epoch"] == b["epoch"] == 3 and a["identity"]["LINCLS.OPTIMIZER"] == "lars"
    for k in a["head"]:
        assert torch.equal(a["head"][k], b["head"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ra, rb = (json.loads((f / "lincls.json").read_text()) for f in (whole, parts))
    assert (ra["top1"], ra["top5"]) == (rb["top1"], rb["top5"]) and rb["resumed_at"] == 1
    assert [h["lr"] for h in ra["history"]] == [h["lr"] for h in rb["history"]]
    assert json.loads((parts / "provenance.json").read_text())["start_epoch"] == 1


# ----------------------------------------------------------------------------- (3) DDP
def _rank(rank: int, init: str, argv: list, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=WORLD)
    try:
        from pretrain.data import ImageDataset

        seen: list = []
        get = ImageDataset.__getitem__
        ImageDataset.__getitem__ = lambda self, key: seen.append(key) or get(self, key)
        result = app.run(_args(argv))
        torch.save({"result": result, "seen": seen}, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_accuracy_each_seeing_its_share(files):
    """Global batch 8 (4 per rank), 3 epochs of 2 steps, MoCo's SGD with a step at epoch 2.

    The ranks' batches hold the one-process batch's images (same crops), and DDP averages the
    two half-batch gradients: the same mean over 8 images, summed in another order. One step's
    gradient is then off by at most about B eps = 8 eps of its size, and so is each step; over
    T = 6 steps (momentum buffers included) the weights can drift by T B eps of their range, ten
    times that is allowed: a few hundred float32 ulps, far below what a wrong batch or an
    unaveraged gradient would change (a whole step). The top-1 / top-5 must be equal: each val
    image's top-two logit margin is checked to exceed the largest logit change those weights can
    make (|f . dW| + |db| <= ||f||_1 max|dW| + max|db|).
    """
    argv = ["--checkpoint", files["moco"], *_opts(files["data"], "LINCLS.STEPS", "[2]")]
    one, two = files["root"] / "one", files["root"] / "two"
    reference = app.run(_args([*argv, "--output-dir", one]))
    spawn_ranks(_rank, (str(files["root"] / "init"), [*argv, "--output-dir", str(two)],
                        str(files["root"])), WORLD)
    ranks = [torch.load(files["root"] / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        assert (r["result"]["top1"], r["result"]["top5"]) == (reference["top1"],
                                                              reference["top5"])
    train = [[k for k in r["seen"] if isinstance(k, tuple)] for r in ranks]  # (index, crop seed)
    val = [[k for k in r["seen"] if not isinstance(k, tuple)] for r in ranks]
    assert len(train[0]) == len(train[1]) == 3 * 2 * 4  # epochs x steps x images per rank
    sampler = ResumableSampler(16, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        keys = sampler.keys()  # the one-process order: steps of 8 images
        for step in range(2):
            mine = [t[8 * epoch + 4 * step:][:4] for t in train]  # each rank's 4 of the step
            assert sorted(mine[0] + mine[1]) == sorted(keys[8 * step:8 * step + 8])
    assert (val[0], val[1]) == (list(range(8)), list(range(8, 12)))  # batches of 8: 1 each
    w1, w2 = _head(one)["head"], _head(two)["head"]
    atol = 10 * 6 * 8 * EPS * float(max(w.abs().max() for w in w1.values()))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=atol, msg=k)
    f = _features(app.build_trunk(app.read_source(str(files["moco"]))[0]), files["data"])
    logits = f @ w1["weight"].T + w1["bias"]  # [12, 2]
    top2 = logits.topk(2, dim=1).values
    change = f.abs().sum(1) * (w2["weight"] - w1["weight"]).abs().max() + \
        (w2["bias"] - w1["bias"]).abs().max()  # [12]
    assert bool((top2[:, 0] - top2[:, 1] > 2 * change).all())
    assert reference["top1"] == 100.0  # and the classes are told apart


# ----------------------------------------------------------------------------- (4) refusals
def test_the_protocols_are_the_published_ones():
    cfg = get_cfg()
    s = lincls.settings(cfg)
    assert (s["LINCLS.OPTIMIZER"], s["LINCLS.BASE_LR"], s["LINCLS.BATCH_SIZE"],
            s["LINCLS.EPOCHS"], s["LINCLS.SCHEDULE"], s["LINCLS.STEPS"],
            s["LINCLS.MOMENTUM"], s["LINCLS.WEIGHT_DECAY"]) == \
        ("sgd", 30.0, 256, 100, "steps", [60, 80], 0.9, 0.0)
    assert [lincls.lr_factor(s, e) for e in (0, 59, 60, 79, 80, 99)] == \
        [1, 1, 0.1, 0.1, 0.1 ** 2, 0.1 ** 2]
    # a config spelling out MoCo's numbers (a checkpoint's stored one) does not keep them
    cfg = load_cfg(opts=["LINCLS.BASE_LR", "30.0", "LINCLS.EPOCHS", "100",
                         *lincls.protocol_overrides("simsiam"), "LINCLS.EPOCHS", "10"])
    s = lincls.settings(cfg)
    assert (s["LINCLS.OPTIMIZER"], s["LINCLS.BASE_LR"], s["LINCLS.BATCH_SIZE"],
            s["LINCLS.EPOCHS"], s["LINCLS.SCHEDULE"]) == ("lars", 0.1, 4096, 10, "cosine")
    assert lincls.lr_factor(s, 0) == 1.0 and abs(lincls.lr_factor(s, 5) - 0.5) < 1e-15


def _moco_variant(files, tmp: Path, edit) -> Path:
    ckpt = torch.load(files["moco"], weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, tmp / "variant.pth")
    return tmp / "variant.pth"


@pytest.mark.parametrize("case, words", [
    ("no trunk", "no ResNet trunk found; top-level keys [weights]"),
    ("missing", "ResNet-18 keys missing: layer4.1.bn2.weight"),
    ("shape", "shape mismatch for ResNet-18: layer1.0.conv1.weight (64, 64, 1, 1)"),
    ("cifar stem", "conv1 is 3x3, a CIFAR-style stem whose padding the weights do not record"),
    ("nan", "non-finite values (NaN or inf) in conv1.weight"),
])  # fmt: skip
def test_a_checkpoint_that_does_not_fit_is_one_line(files, tmp_path, capsys, case, words):
    q = "module.encoder_q."
    edits = {
        "missing": lambda sd: sd.pop(q + "layer4.1.bn2.weight"),
        "shape": lambda sd: sd.update({q + "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}),
        "cifar stem": lambda sd: sd.update({q + "conv1.weight": torch.zeros(64, 3, 3, 3)}),
        "nan": lambda sd: sd[q + "conv1.weight"].view(-1)[0].fill_(float("nan")),
    }
    if case == "no trunk":
        torch.save({"weights": {"a": torch.zeros(2)}}, tmp_path / "variant.pth")
        path = tmp_path / "variant.pth"
    else:
        path = _moco_variant(files, tmp_path, edits[case])
    line = refused(capsys, ["lincls", "--checkpoint", path, *_opts(files["data"])],
                   keep=[tmp_path, files["data"]])
    assert f"{path}: " in line and words in line, line


@pytest.mark.parametrize("case", ["no splits", "split missing", "protocol", "run folder",
                                  "own file", "both sources", "nothing to resume", "held",
                                  "resume changed", "in use"])
def test_bad_input_is_one_line_before_anything_is_written(files, tmp_path, capsys, case):
    data, out = files["data"], tmp_path / "ev"
    argv = ["lincls", "--checkpoint", files["moco"], "--output-dir", out, *_opts(data)]
    words = {
        "no splits": "linear evaluation needs labelled splits",
        "split missing": f"{tmp_path / 'nope'}",
        "protocol": "LINCLS.PROTOCOL 'byol' is not one of: moco, simsiam",
        "run folder": f"--output-dir {out}: holds a pretraining run (last.pth)",
        "own file": f"--output {out / 'provenance.json'}: the evaluation writes its",
        "both sources": "--checkpoint and --random-init exclude each other",
        "nothing to resume": f"--resume: {out / 'lincls_last.pth'}: no such file",
        "held": f"--output-dir {out}: holds an evaluation (lincls_last.pth); --resume continues",
        "resume changed": "was written with other settings (LINCLS.BASE_LR 0.3 -> 2.0)",
        "in use": f"--output-dir {out} is in use by another evaluation (pid {os.getpid()}",
    }[case]
    if case == "no splits":
        argv = argv[:5] + ["DATALOADER.NUM_WORKERS", "0"]
    elif case == "split missing":
        argv += ["DATA.KNN_VAL_ROOT", tmp_path / "nope"]
    elif case == "protocol":
        argv += ["LINCLS.PROTOCOL", "byol"]
    elif case == "run folder":
        out.mkdir()
        (out / "last.pth").write_bytes(b"a pretraining checkpoint")
    elif case == "own file":
        argv += ["--output", out / "provenance.json"]
    elif case == "both sources":
        argv.append("--random-init")
    elif case == "nothing to resume":
        argv.append("--resume")
    elif case in ("held", "resume changed"):
        assert cli.main([str(a) for a in [*argv, "LINCLS.EPOCHS", "1", "LINCLS.AUGMENT",
                                          "False"]]) == 0
        argv += ["LINCLS.EPOCHS", "1", "LINCLS.AUGMENT", "False"]
        if case == "resume changed":
            argv += ["--resume", "LINCLS.BASE_LR", "2.0"]
    with contextlib.ExitStack() as held:
        if case == "in use":  # another process holds the folder's lock (pretrain.utils.lock)
            out.mkdir()
            fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
            held.callback(os.close, fd)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} another evaluation\n".encode())
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = refused(capsys, argv, keep=[tmp_path, data])
    assert words in line, line


@pytest.mark.parametrize("train, val, words", [
    (("b",), ("a", "b"), "(only in val: a; only in train: none)"),
    (("a", "b"), ("a", "c"), "(only in val: c; only in train: b)"),
])  # fmt: skip
def test_splits_with_other_classes_are_refused(files, tmp_path, capsys, train, val, words):
    """Each folder numbers its classes by sorted name: train b is 0, which val reads as a."""
    _images(tmp_path / "train", 4, classes=train), _images(tmp_path / "val", 4, classes=val)
    line = refused(capsys, ["lincls", "--checkpoint", files["moco"], "--output-dir",
                            tmp_path / "ev", *_opts(tmp_path)], keep=[tmp_path])
    assert f"{tmp_path / 'val'} and {tmp_path / 'train'}: the val and train splits have other " \
        f"classes {words}" in line, line


def test_unreadable_images_are_counted(files, tmp_path, capsys):
    import shutil

    shutil.copytree(files["data"], tmp_path / "data")
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a" / "000.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "ev"
    assert cli.main(["lincls", "--checkpoint", str(files["moco"]), "--output-dir", str(out),
                     *_opts(tmp_path / "data", "LINCLS.EPOCHS", 1)]) == 0
    result = json.loads((out / "lincls.json").read_text())
    assert result["unreadable_images"] == {"train": 1, "val": 1}
    assert "warning: 2 unreadable image(s) were replaced" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, words", [
    ("DATA.IMAGE_SIZE", 0, "DATA.IMAGE_SIZE 0 must be a positive integer"),
    ("DATA.IMAGE_SIZE", -5, "DATA.IMAGE_SIZE -5 must be a positive integer"),
    ("SEED", 10**20, f"SEED {10**20} must be an integer in [0, 2**63)"),
])  # fmt: skip
def test_a_bad_image_size_or_seed_is_refused_before_anything_is_written(files, tmp_path, capsys,
                                                                         key, value, words):
    line = refused(capsys, ["lincls", "--checkpoint", files["moco"], "--output-dir",
                            tmp_path / "ev", *_opts(files["data"], key, value)],
                   keep=[tmp_path, files["data"]])
    assert line.endswith(words), line


def test_a_stored_config_that_is_no_mapping_is_one_line(files, tmp_path, capsys):
    ckpt = torch.load(files["feataug"], weights_only=True)
    ckpt["config"] = "- 1\n- 2\n"
    torch.save(ckpt, tmp_path / "list.pth")
    line = refused(capsys, ["lincls", "--checkpoint", tmp_path / "list.pth", "--output-dir",
                            tmp_path / "ev", *_opts(files["data"])], keep=[tmp_path])
    assert line.endswith(f"{tmp_path / 'list.pth'} (its stored config): must map KEY: value at "
                         "the top level (it is a list)"), line


@pytest.fixture(scope="module")
def one_epoch(files) -> Path:
    """A finished one-epoch evaluation, for --resume from a crafted state."""
    out = files["root"] / "one_epoch"
    app.run(_args(["--checkpoint", files["moco"], "--output-dir", out,
                   *_opts(files["data"], "LINCLS.EPOCHS", 1, "LINCLS.AUGMENT", "False")]))
    return out


@pytest.mark.parametrize("edit, words", [
    (dict(identity=[1]), "field 'identity' is a list, not dict"),
    (dict(epoch="seven"), "field 'epoch' is a str, not int"),
    (dict(epoch=None), "field 'epoch' is missing"),
    (dict(epoch=-3), "field 'epoch' -3 is not in 1..1"),
    (dict(head="x"), "field 'head' is a str, not dict"),
    (dict(head={"weight": torch.zeros(3, 512), "bias": torch.zeros(3)}),
     "field 'head' does not fit this evaluation's layer: bias [3] (this evaluation's: [2]); "
     "weight [3, 512] (this evaluation's: [2, 512])"),
    (dict(rng=["junk"]), "field 'rng' does not fit this evaluation (TypeError: "),
    (dict(history=5), "field 'history' is a int, not list"),
    (dict(optimizer={"state": {}, "param_groups": "x"}), "field 'optimizer' does not fit"),
])  # fmt: skip
def test_a_crafted_state_is_refused_naming_the_field(files, one_epoch, tmp_path, capsys, edit,
                                                     words):
    import shutil

    out = tmp_path / "ev"
    shutil.copytree(one_epoch, out)
    state = _head(out)
    for field, value in edit.items():
        state.pop(field) if value is None else state.update({field: value})
    torch.save(state, out / lincls.STATE_NAME)
    line = refused(capsys, ["lincls", "--checkpoint", files["moco"], "--output-dir", out,
                            "--resume", *_opts(files["data"], "LINCLS.EPOCHS", 1,
                                               "LINCLS.AUGMENT", "False")], keep=[tmp_path])
    assert f"{out / lincls.STATE_NAME}: {words}" in line, line
