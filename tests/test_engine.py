"""The pretraining engine end to end, through the real ``feataug`` command (tiny: ResNet-18,
32 px, batch 4, a few iterations).

Truths: the checkpoint schema (pretrain/checkpoint.py) and torchvision's ResNet-18 parameter names; an
uninterrupted run's weights (for kill-and-resume); hand-computed learning rates and kNN votes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
import yaml
from conftest import refused

from feataug import cli
from pretrain.checkpoint import REQUIRED_KEYS, CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "pretrain" / "tiny_moco_fa_r18.yaml")
# CPU: exact resume and gloo DDP are CPU properties (tests marked "auto" use a GPU if present)
SMALL = ["DATA.IMAGE_SIZE", "32", "SOLVER.BATCH_SIZE", "4", "DATALOADER.NUM_WORKERS", "0",
         "LOG_PERIOD", "1", "TENSORBOARD", "False", "DEVICE", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(root: Path, n: int, classes=("a", "b"), seed=0) -> Path:
    """``n`` random smooth JPEGs, ImageNet layout ``root/<class>/k.jpg``; class k tints red/blue."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        c = k % len(classes)
        img = cv2.resize(rng.integers(0, 120, (6, 6, 3), dtype=np.uint8), (48, 40))
        img[..., 2 - 2 * c] += 120  # BGR: class 0 red, class 1 blue
        (root / classes[c]).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / classes[c] / f"{k:03d}.jpg"), img)
    return root


def _pretrain(data: Path, out: Path, *opts: str, config: str = TINY) -> int:
    return cli.main(["pretrain", "--config-file", config, "DATA.ROOT", str(data),
                     "OUTPUT_DIR", str(out), *SMALL, *opts])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- tiny runs
@pytest.mark.parametrize("method", ["moco", "simsiam", "byol"])
def test_tiny_run_writes_checkpoint_schema_and_metrics(tmp_path, method):
    data, out = _images(tmp_path / "d", 16), tmp_path / "o"
    opts = ["SOLVER.MAX_ITER", "3", "MODEL.METHOD", method, "DEVICE", "auto",
            "SOLVER.WARMUP_EPOCHS", "0", "SOLVER.SCHEDULE", "cosine"]
    if method != "moco":
        opts += ["MODEL.PROJ_HIDDEN_DIM", "64", "MODEL.PROJ_DIM", "32", "MODEL.PRED_HIDDEN_DIM", "16",
                 "TENSORBOARD", "True"]
    assert _pretrain(data, out, *opts) == 0

    ckpt = load_checkpoint(out / "last.pth")
    assert set(REQUIRED_KEYS) <= set(ckpt) and ckpt["version"] == 1
    assert ckpt["iter"] == 3 and ckpt["epoch"] == 0  # 16 images / batch 4: epoch 0 unfinished
    assert ckpt["arch"] == {"name": "resnet18", "stem": "imagenet"}
    assert yaml.safe_load(ckpt["config"])["MODEL"]["METHOD"] == method
    tv = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items()
          if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ckpt["backbone"].items()} == tv
    for k, v in ckpt["backbone"].items():  # the trunk of the saved model, not a copy of the init
        assert torch.equal(v, ckpt["model"]["backbone." + k])
    assert ckpt["sampler"]["iters_per_epoch"] == 4 and len(ckpt["rng"]) == 1
    assert ("queue" in ckpt["model"]) == (method == "moco")

    rows = _metrics(out)
    assert [r["iter"] for r in rows] == [1, 2, 3]
    base = yaml.safe_load(Path(TINY).read_text())["SOLVER"]["BASE_LR"] * 4 / 256
    for r, f in zip(rows, [1.0, 0.75, 0.25], strict=True):  # cosine over the 3 iterations
        assert r["lr"] == pytest.approx(base * f)
        assert math.isfinite(r["loss"]) and r["skipped_images"] == 0
        assert {"time", "data_time", "epoch"} <= set(r)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "config.yaml").read_text())["MODEL"]["METHOD"] == method
    if method != "moco":
        assert list((out / "tb").glob("events.out.tfevents.*"))


def test_checkpoint_period_0_keeps_last_pth_alone(tmp_path):
    """SOLVER.CHECKPOINT_PERIOD 0: two completed epochs, no numbered copy (it once acted as 1)."""
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"  # batch 4: 2 iterations per epoch
    assert _pretrain(data, out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "0") == 0
    assert sorted(p.name for p in out.glob("*.pth")) == ["last.pth"]
    ckpt = load_checkpoint(out / "last.pth")
    assert (ckpt["iter"], ckpt["epoch"]) == (4, 2)


# ----------------------------------------------------------------------------- kill and resume
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import pretrain.build as build
    KILL_AT, TOTAL = int(os.environ["KILL_AT"]), int(os.environ["TOTAL"])
    _build = build.build_model
    def build_model(cfg):
        model = _build(cfg)
        after_step = model.after_step
        def killing_after_step(progress):
            after_step(progress)
            if round(progress * TOTAL) == KILL_AT:  # stepped, not yet checkpointed
                os.kill(os.getpid(), signal.SIGKILL)
        model.after_step = killing_after_step
        return model
    build.build_model = build_model
    from feataug.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("aug", ["cpu", "cpu_split"])  # cpu_split: the device path, on the CPU
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, aug):
    data = _images(tmp_path / "d", 12)  # batch 4: 3 iterations per epoch
    opts = ["SOLVER.MAX_ITER", "7", "SOLVER.CHECKPOINT_ITERS", "2", "DETERMINISTIC", "True",
            "SEED", "3", "DATA.AUG_DEVICE", aug]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _pretrain(data, full, *opts) == 0

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = [sys.executable, str(script), "pretrain", "--config-file", TINY, "DATA.ROOT", str(data),
            "OUTPUT_DIR", str(cut), *SMALL, *opts]
    proc = subprocess.run(args, env={**_env(), "KILL_AT": "6", "TOTAL": "7"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # checkpoints at 2, 3 (end of epoch 0) and 4; killed after step 6, before its checkpoint:
    # the resumed run replays from iteration 4, one batch into epoch 1, and drops log line 5
    assert load_checkpoint(cut / "last.pth")["iter"] == 4
    assert [r["iter"] for r in _metrics(cut)] == [1, 2, 3, 4, 5]

    assert cli.main(["pretrain", "--config-file", TINY, "--resume", "DATA.ROOT", str(data),
                     "OUTPUT_DIR", str(cut), *SMALL, *opts]) == 0
    a, b = load_checkpoint(full / "last.pth"), load_checkpoint(cut / "last.pth")
    assert a["iter"] == b["iter"] == 7
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # the log of the resumed run is the uninterrupted log, line for line
    strip = ("time", "data_time")
    assert [{k: v for k, v in r.items() if k not in strip} for r in _metrics(cut)] == \
        [{k: v for k, v in r.items() if k not in strip} for r in _metrics(full)]


# ----------------------------------------------------------------------------- robustness
def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    data = _images(tmp_path / "d", 9, classes=("x",))
    ok, jpg = cv2.imencode(".jpg", np.zeros((40, 40, 3), np.uint8))
    (data / "x" / "bad_0_truncated.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    (data / "x" / "bad_1_empty.jpg").write_bytes(b"")
    (data / "x" / "bad_2_text.jpg").write_text("not an image\n")
    out = tmp_path / "o"  # 12 files, batch 4: one epoch visits every file; a loader worker
    assert _pretrain(data, out, "SOLVER.EPOCHS", "1", "DATALOADER.NUM_WORKERS", "1") == 0
    rows = _metrics(out)
    assert rows[-1]["iter"] == 3 and rows[-1]["skipped_images"] == 3
    assert len(load_checkpoint(out / "last.pth")["skipped"]) == 3
    log = (out / "log.txt").read_text()
    assert "3 unreadable image(s)" in log
    assert all(name in log for name in ("bad_0_truncated.jpg", "bad_1_empty.jpg", "bad_2_text.jpg"))


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_non_finite_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path, capsys,
                                                                      monkeypatch, what):
    import pretrain.engine.train_loop as loop

    real = loop.build_model

    def poisoned(cfg):  # a NaN loss at the 3rd forward, or NaN weights after the 3rd step
        model, calls = real(cfg), []
        forward, after_step = model.forward, model.after_step

        def nan_loss(x1, x2):
            out = forward(x1, x2)
            calls.append(1)
            if len(calls) == 3:
                out["loss"] = out["loss"] * float("nan")
            return out

        def nan_weights(progress):
            after_step(progress)
            calls.append(1)
            if len(calls) == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))

        if what == "loss":
            model.forward = nan_loss
        else:
            model.after_step = nan_weights
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    data, out = _images(tmp_path / "d", 16), tmp_path / "o"
    assert _pretrain(data, out, "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_ITERS", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    first = {"loss": "loss is nan at iteration 3", "weights": "weights became non-finite at iteration 3"}
    assert err[-1].startswith(f"feataug pretrain: error: {first[what]}")
    assert f"{out / 'last.pth'} (iteration 2)" in err[-1]
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["iter"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("log, every, saved", [(2, 2, 2), (5, 3, None)])
def test_non_finite_loss_between_checks_is_found_before_the_next_checkpoint(
        tmp_path, capsys, monkeypatch, log, every, saved):
    """The loss is read every LOG_PERIOD iterations and before every checkpoint: a NaN at
    iteration 3 (between two reads) is reported as iteration 3 at the next read, and the
    checkpoint due there is not written. (2, 2): read at 2, 4; (5, 3): first read at 3, itself
    a checkpoint, so no checkpoint exists."""
    import pretrain.engine.train_loop as loop

    real = loop.build_model
    nan_at = 2 if saved is None else 3

    def poisoned(cfg):
        model, calls = real(cfg), []
        forward = model.forward

        def nan_loss(x1, x2):
            out = forward(x1, x2)
            calls.append(1)
            if len(calls) == nan_at:
                out["loss"] = out["loss"] * float("nan")
            return out

        model.forward = nan_loss
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    data, out = _images(tmp_path / "d", 40), tmp_path / "o"
    assert _pretrain(data, out, "SOLVER.MAX_ITER", "8", "LOG_PERIOD", str(log),
                     "SOLVER.CHECKPOINT_ITERS", str(every)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"feataug pretrain: error: loss is nan at iteration {nan_at} ")
    if saved is None:
        assert err[-1].endswith("no checkpoint was written") and not (out / "last.pth").exists()
    else:
        assert f"(iteration {saved})" in err[-1]
        ckpt = load_checkpoint(out / "last.pth")
        assert ckpt["iter"] == saved
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["iter"] for r in _metrics(out)] == ([2] if saved else [])  # no NaN line logged


def test_the_host_reads_the_device_only_at_log_lines_and_checkpoints(tmp_path, monkeypatch):
    """16 images, batch 4 (epoch end every 4 iterations), LOG_PERIOD 3, 7 iterations: the
    window is read at 3 (log), 4 (checkpoint), 6 (log), 7 (end): 4 reads for 7 steps."""
    from pretrain.engine.metrics import StepWindow

    reads, real_read = [], StepWindow.read

    def counting(self):
        reads.append(self.iters[-1])
        return real_read(self)

    monkeypatch.setattr(StepWindow, "read", counting)
    data, out = _images(tmp_path / "d", 16), tmp_path / "o"
    assert _pretrain(data, out, "SOLVER.MAX_ITER", "7", "LOG_PERIOD", "3") == 0
    assert reads == [3, 4, 6, 7]
    rows = _metrics(out)
    assert [r["iter"] for r in rows] == [3, 6, 7]
    assert all(math.isfinite(r["loss"]) and r["time"] >= r["data_time"] >= 0 for r in rows)


@pytest.mark.parametrize("case", ["empty", "key", "file", "batch", "method", "aug", "aug_cuda",
                                  "period"])
def test_user_errors_are_one_line(tmp_path, capsys, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"empty": ["DATA.ROOT", str(empty)],
            "key": ["DATA.ROOT", str(empty), "SOLVER.NO_SUCH_KEY", "1"],
            "file": ["--config-file", str(tmp_path / "nope.yaml")],
            "batch": ["DATA.ROOT", str(_images(tmp_path / "d", 3))],
            "method": ["DATA.ROOT", str(empty), "MODEL.METHOD", "simclr"],
            "aug": ["DATA.ROOT", str(empty), "DATA.AUG_DEVICE", "gpu"],
            "aug_cuda": ["DATA.ROOT", str(empty), "DATA.AUG_DEVICE", "cuda"],
            "period": ["DATA.ROOT", str(empty), "SOLVER.CHECKPOINT_PERIOD", "-1"]}[case]
    if case != "file":
        args = ["--config-file", TINY, "OUTPUT_DIR", str(tmp_path / "o"), *SMALL, *args]
    assert cli.main(["pretrain", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("feataug pretrain: error: ")
    assert {"empty": f"{empty}: no image files", "key": "SOLVER.NO_SUCH_KEY",
            "file": "nope.yaml: no such config file", "batch": "fewer than one batch",
            "method": "MODEL.METHOD 'simclr'",
            "aug": "DATA.AUG_DEVICE 'gpu' is not one of: auto, cpu, cuda, cpu_split",
            "aug_cuda": "DATA.AUG_DEVICE cuda needs a CUDA training device",
            "period": "SOLVER.CHECKPOINT_PERIOD -1 must be >= 0"}[case] in err[0]
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="other.pth: not a FeatAug pretraining checkpoint "
                                              r"\(missing version, config"):
        load_checkpoint(tmp_path / "other.pth")


# ----------------------------------------------------------------------------- distributed
DDP_RUNNER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from pretrain.config import load_cfg
    from pretrain.engine import train
    result = train(load_cfg(sys.argv[1], sys.argv[2:]))
    torch.save(result["model"].state_dict(), os.path.join(result["output_dir"],
               f"rank{os.environ['RANK']}.pt"))
""")


def test_two_process_gloo_ddp_ranks_end_identical(tmp_path):
    data, out = _images(tmp_path / "d", 16), tmp_path / "o"
    script = tmp_path / "ddp.py"
    script.write_text(DDP_RUNNER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), TINY, "DATA.ROOT", str(data), "OUTPUT_DIR", str(out), *SMALL,
           "SOLVER.BATCH_SIZE", "8", "SOLVER.MAX_ITER", "3"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    per_rank = ("running_mean", "running_var", "num_batches_tracked")  # BN statistics
    compared = [k for k in r0 if not k.endswith(per_rank)]
    assert "queue" in compared and len(compared) > 100
    for k in compared:
        assert torch.equal(r0[k], r1[k]), k
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["iter"] == 3 and ckpt["sampler"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # seeded SEED + rank
    record = json.loads((out / "provenance.json").read_text())  # written once, by rank 0
    assert record["world_size"] == 2 and ckpt["provenance"] == record
    for k in compared:
        assert torch.equal(ckpt["model"][k], r0[k]), k
    assert [r["iter"] for r in _metrics(out)] == [1, 2, 3]


def test_warm_up_and_step_epochs_become_iterations_in_a_run(tmp_path):
    """8 images, batch 4: 2 iterations an epoch. WARMUP_EPOCHS 1 is 2 iterations of linear
    warm-up; STEPS (2,) is a drop by GAMMA at iteration 4; EPOCHS 3 is 6 iterations."""
    data = _images(tmp_path / "d", 8)
    out = tmp_path / "o"
    assert _pretrain(data, out, "SOLVER.EPOCHS", "3", "SOLVER.MAX_ITER", "0", "SOLVER.WARMUP_EPOCHS",
                     "1", "SOLVER.SCHEDULE", "step", "SOLVER.STEPS", "(2,)", "SOLVER.GAMMA", "0.1",
                     "SOLVER.BASE_LR", "0.64") == 0
    lrs = [(r["iter"], r["lr"]) for r in _metrics(out) if "lr" in r]
    base = 0.64 * 4 / 256
    want = [0.5, 1.0, 1.0, 1.0, 0.1, 0.1]  # (it + 1) / 2 while warming up, then GAMMA from it 4
    assert [it for it, _ in lrs] == list(range(1, 7))
    assert [lr for _, lr in lrs] == pytest.approx([base * f for f in want])


def test_knn_at_start_sees_the_untrained_trunk_and_changes_nothing(tmp_path, monkeypatch):
    from pretrain.backbone import build_backbone
    from pretrain.engine import hooks
    from pretrain.utils.env import seed_all

    data = _images(tmp_path / "d", 8)
    seen = []
    real_knn = hooks.evaluate_knn

    def spy(backbone, *args, **kw):
        seen.append({k: v.clone() for k, v in backbone.state_dict().items()})
        return real_knn(backbone, *args, **kw)

    monkeypatch.setattr(hooks, "evaluate_knn", spy)
    knn = ["KNN.PERIOD", "1", "DATA.KNN_TRAIN_ROOT", str(data), "DATA.KNN_VAL_ROOT", str(data)]
    assert _pretrain(data, tmp_path / "on", "SOLVER.MAX_ITER", "2", *knn) == 0
    assert _pretrain(data, tmp_path / "off", "SOLVER.MAX_ITER", "2", *knn, "KNN.AT_START",
                     "False") == 0
    assert len(seen) == 3  # start + end of the first run, end of the second
    seed_all(0)
    untrained = build_backbone("resnet18", "imagenet").state_dict()
    assert all(torch.equal(seen[0][k], v) for k, v in untrained.items())
    assert not torch.equal(seen[1]["conv1.weight"], untrained["conv1.weight"])  # it did train
    # evaluating first draws no random numbers: both runs end with the same weights
    on, off = (torch.load(tmp_path / d / "last.pth", weights_only=True)["backbone"]
               for d in ("on", "off"))
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_knn_monitor_and_linear_probe_separate_two_colors(tmp_path, capsys):
    train, val = _images(tmp_path / "train", 16, seed=1), _images(tmp_path / "val", 8, seed=2)
    out = tmp_path / "o"
    assert _pretrain(train, out, "SOLVER.MAX_ITER", "2", "KNN.PERIOD", "1", "DEVICE", "auto",
                     "DATA.KNN_TRAIN_ROOT", str(train), "DATA.KNN_VAL_ROOT", str(val)) == 0
    knn = [r for r in _metrics(out) if "knn_top1" in r]  # the untrained trunk, then the end
    assert [r["iter"] for r in knn] == [0, 2] and knn[1]["knn_top1"] == 100.0
    capsys.readouterr()
    assert cli.main(["lincls", "--checkpoint", str(out / "last.pth"), "--knn", "DATALOADER.NUM_WORKERS",
                     "0", "LINCLS.EPOCHS", "20", "LINCLS.BATCH_SIZE", "8", "LINCLS.AUGMENT",
                     "False", "LINCLS.BASE_LR", "1.0"]) == 0
    result = json.loads((out / "last_lincls" / "lincls.json").read_text())
    assert result["top1"] == 100.0 and result["knn_top1"] == 100.0
    assert result["val_images"] == 8 and result["classes"] == 2
    assert "top-1 100.00%" in capsys.readouterr().out


def test_lincls_scores_the_checkpoints_own_trunk(tmp_path, monkeypatch):
    """The red/blue data above is separable by any trunk, so ``top1`` alone cannot show which
    trunk was scored: the trunk ``linear_eval`` receives is the checkpoint's, tensor for tensor."""
    import pretrain.lincls as lincls

    train, val = _images(tmp_path / "train", 8, seed=1), _images(tmp_path / "val", 4, seed=2)
    out = tmp_path / "o"
    assert _pretrain(train, out, "SOLVER.MAX_ITER", "1") == 0
    trunk = torch.load(out / "last.pth", weights_only=True)["backbone"]
    seen = []
    real = lincls.linear_eval

    def spy(cfg, backbone, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in backbone.state_dict().items()})
        return real(cfg, backbone, *args, **kwargs)

    monkeypatch.setattr(lincls, "linear_eval", spy)
    assert cli.main(["lincls", "--checkpoint", str(out / "last.pth"), "DATA.KNN_TRAIN_ROOT",
                     str(train), "DATA.KNN_VAL_ROOT", str(val), "DATALOADER.NUM_WORKERS", "0",
                     "LINCLS.EPOCHS", "1", "LINCLS.AUGMENT", "False"]) == 0
    assert len(seen) == 1 and seen[0].keys() == trunk.keys()
    for k, v in trunk.items():
        torch.testing.assert_close(seen[0][k].to(v.dtype), v, rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_short_fashion_mnist_run_beats_its_untrained_trunk(tmp_path):
    """400 MoCo iterations on Fashion-MNIST (configs/pretrain/fmnist_moco_r18.yaml): the kNN
    monitor (bank 1000, queries 500) must score the pretrained trunk above the same trunk at
    iteration 0. About 5 minutes on 2 CPU cores, plus the data preparation."""
    from feataug.data import prepare_fashion_mnist

    prepare_fashion_mnist(tmp_path)
    data = tmp_path / "fashion-mnist"
    config = str(ROOT / "configs" / "pretrain" / "fmnist_moco_r18.yaml")
    assert cli.main(["pretrain", "--config-file", config, "DATA.ROOT", str(data),
                     "DATA.KNN_TRAIN_ROOT", str(data / "train-knn"),
                     "DATA.KNN_VAL_ROOT", str(data / "val-knn"), "OUTPUT_DIR", str(tmp_path / "o")]) == 0
    knn = {r["iter"]: r["knn_top1"] for r in _metrics(tmp_path / "o") if "knn_top1" in r}
    assert set(knn) == {0, 400}
    assert knn[400] > knn[0] + 5, knn




@pytest.mark.parametrize("key, value, words", [
    ("DATA.IMAGE_SIZE", 0, "DATA.IMAGE_SIZE 0 must be a positive integer"),
    ("SEED", 10**20, f"SEED {10**20} must be an integer in [0, 2**63)"),
    ("SEED", -1, "SEED -1 must be an integer in [0, 2**63)"),
])  # fmt: skip
def test_a_seed_or_image_size_no_run_can_use_is_refused_before_anything_is_written(
        tmp_path, capsys, key, value, words):
    data = _images(tmp_path / "d", 8)
    line = refused(capsys, ["pretrain", "--config-file", TINY, "DATA.ROOT", data, "OUTPUT_DIR",
                            tmp_path / "o", *SMALL, key, value], keep=[tmp_path])
    assert line.endswith(words), line
