"""Weights & Biases logging (``LOGGER.*``; pretrain/utils/tracking.py): pretraining's
``WandbLogger`` hook, study jobs, ``feataug detect``'s ``WandbWriter``.

Truth: what the real ``wandb`` wrote, offline (``WANDB_MODE=offline``, ``WANDB_DIR`` a temporary
folder), read back from the run's ``run-ID.wandb`` file (a LevelDB-style log of protobuf
``Record`` messages, parsed here with wandb's own ``wandb_internal_pb2``), compared with the
run's ``metrics.jsonl`` and results. Without ``wandb`` installed (``sys.modules["wandb"] =
None``) the key is one error line and nothing is written.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from conftest import refused, tree_hashes
from test_engine import _images, _metrics, _pretrain

from pretrain.utils.tracking import RUN_FILE, WANDB_MISSING, stored_run_id

pytestmark = pytest.mark.usefixtures("one_thread")

WANDB_ON = ["LOGGER.WANDB", "True"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, its files in ``tmp_path/wb``; returns that folder."""
    pytest.importorskip("wandb")
    folder = tmp_path / "wb"
    folder.mkdir()
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(folder)),
                       ("WANDB_SILENT", "true"), ("WANDB_PROJECT", "feataug-tests")):
        monkeypatch.setenv(key, value)
    return folder


def _records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"[:len(data)]  # (the file may still be being written)
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk not written yet
            return
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def _finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of ``path`` once they end with the run's ``exit`` record: wandb's service
    process may still be writing the file when ``finish()`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record"
        time.sleep(0.1)


def _runs(folder: Path) -> list[dict]:
    """Every offline run under ``folder``, in the order started: id, name, group, config,
    history rows ``{step: {key: value}}`` and summary."""
    runs = []
    for f in sorted(folder.rglob("offline-run-*/run-*.wandb")):
        run = dict(id=None, name=None, group=None, config={}, history={}, summary={})
        for r in _finished_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group)
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                       for i in r.history.item}
                run["history"].setdefault(row["_step"], {}).update(
                    {k: v for k, v in row.items() if not k.startswith("_")})
            elif kind == "summary":
                run["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                       for i in r.summary.update})
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------- pretraining
def test_pretraining_logs_what_metrics_jsonl_holds_to_an_offline_run(tmp_path, offline):
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"  # batch 4: 2 iterations per epoch
    knn = ["KNN.PERIOD", "1", "DATA.KNN_TRAIN_ROOT", str(data), "DATA.KNN_VAL_ROOT", str(data)]
    assert _pretrain(data, out, "SOLVER.MAX_ITER", "3", *knn, *WANDB_ON) == 0

    (run,) = _runs(offline)
    assert run["id"] == stored_run_id(out) and (out / RUN_FILE).is_file()
    assert run["name"] == "o" and run["group"] == ""  # default name: OUTPUT_DIR's folder
    assert run["config"]["MODEL.METHOD"] == "moco" and run["config"]["SOLVER.MAX_ITER"] == 3
    assert run["config"]["LOGGER.WANDB"] is True and run["config"]["SOLVER.STEPS"] == [120, 160]
    rows = _metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in train] == [1, 2, 3]  # LOG_PERIOD 1
    for r in train:
        logged = run["history"][r["iter"]]
        assert {k[6:] for k in logged if k.startswith("train/")} == set(r) - {
            "iter", "epoch"} >= {"loss", "lr", "z_std", "time", "data_time", "skipped_images"}
        for key in set(r) - {"iter", "epoch"}:
            assert logged[f"train/{key}"] == pytest.approx(r[key], rel=1e-12), key
        assert logged["epoch"] == r["epoch"]
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [r["iter"] for r in knn_rows] == [0, 2, 3]  # at start, epoch end, the end
    for r in knn_rows:
        assert run["history"][r["iter"]]["knn/knn_top1"] == r["knn_top1"]
    assert run["summary"]["final/iter"] == 3 and run["summary"]["final/loss"] == train[-1]["loss"]
    assert run["summary"]["final/knn_top1"] == pytest.approx(knn_rows[-1]["knn_top1"], abs=1e-3)

    # W&B draws nothing from the run's random generators: without it, the same run
    assert _pretrain(data, tmp_path / "off", "SOLVER.MAX_ITER", "3", *knn) == 0
    off = _metrics(tmp_path / "off")
    for key in ("iter", "loss", "lr", "knn_top1"):
        assert [r.get(key) for r in off] == [r.get(key) for r in rows], key


def test_resume_goes_on_in_the_same_run(tmp_path, offline):
    """A run stopped after its checkpoint at iteration 2 (4 iterations logged), then resumed:
    the same W&B run goes on from iteration 3."""
    from pretrain.checkpoint import load_checkpoint, save_checkpoint

    data, out = _images(tmp_path / "d", 8), tmp_path / "o"
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1", *WANDB_ON]
    assert _pretrain(data, out, *opts) == 0
    first = stored_run_id(out)
    save_checkpoint(load_checkpoint(out / "checkpoint_0001.pth"), out / "last.pth")
    assert _pretrain(data, out, *opts, "--resume") == 0
    assert stored_run_id(out) == first
    runs = _runs(offline)
    assert [r["id"] for r in runs] == [first, first]  # offline: one folder per part of the run
    assert sorted(runs[0]["history"]) == [1, 2, 3, 4] and sorted(runs[1]["history"]) == [3, 4]
    assert runs[1]["name"] == "o" and runs[1]["summary"]["final/iter"] == 4

    # a fresh run in another folder is another W&B run
    assert _pretrain(data, tmp_path / "o2", "SOLVER.MAX_ITER", "1", *WANDB_ON) == 0
    assert stored_run_id(tmp_path / "o2") not in (None, first)


def test_without_wandb_the_key_is_one_line_and_nothing_is_written(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    data, out = _images(tmp_path / "d", 8), tmp_path / "o"
    from test_engine import SMALL, TINY

    line = refused(capsys, ["pretrain", "--config-file", TINY, "DATA.ROOT", data, "OUTPUT_DIR",
                            out, *SMALL, "SOLVER.MAX_ITER", "1", *WANDB_ON],
                   keep=[tmp_path])
    assert line.endswith(WANDB_MISSING) and not out.exists()
    # off (the default), the missing package does not matter
    assert _pretrain(data, out, "SOLVER.MAX_ITER", "1") == 0
    assert not (out / RUN_FILE).exists()


def test_wandb_mode_is_checked(tmp_path, capsys):
    data = _images(tmp_path / "d", 8)
    from test_engine import SMALL, TINY

    line = refused(capsys, ["pretrain", "--config-file", TINY, "DATA.ROOT", data, "OUTPUT_DIR",
                            tmp_path / "o", *SMALL, "LOGGER.WANDB_MODE", "offlien"],
                   keep=[tmp_path])
    assert "LOGGER.WANDB_MODE must be empty, online, offline or disabled" in line
    assert tree_hashes(tmp_path / "o") == {str(tmp_path / "o"): "<absent>"}


@pytest.mark.parametrize("key, value, words", [
    ("WANDB_PROJECT", "lab/feataug", "contains '/'"),
    ("WANDB_PROJECT", "p" * 129, "longer than 128 characters (129)"),
    ("WANDB_GROUP", "a\nb", "contains '\\n'"),
])  # fmt: skip
def test_a_name_wandb_would_refuse_is_refused_before_anything_is_written(tmp_path, capsys, key,
                                                                         value, words):
    """Truth for the project: wandb's own settings validator refuses the same value."""
    data = _images(tmp_path / "d", 8)
    from test_engine import SMALL, TINY

    line = refused(capsys, ["pretrain", "--config-file", TINY, "DATA.ROOT", data, "OUTPUT_DIR",
                            tmp_path / "o", *SMALL, *WANDB_ON, f"LOGGER.{key}", value],
                   keep=[tmp_path])
    assert f"LOGGER.{key}" in line and words in line and not (tmp_path / "o").exists()
    if key == "WANDB_PROJECT":
        import wandb

        with pytest.raises(Exception, match="Invalid project name"):
            wandb.Settings(project=value)


# ----------------------------------------------------------------------------- study jobs
STUDY = """
random_init: true
overrides:
  DATA.ROOT: "{data}"
  DATA.FORMAT: idx
  DATA.IMAGE_SIZE: 32
  SOLVER.BATCH_SIZE: 8
  SOLVER.EPOCHS: 0
  SOLVER.MAX_ITER: 2
  LOG_PERIOD: 1
  MODEL.MOCO.K: 16
  MODEL.PROJ_HIDDEN_DIM: 32
  MODEL.PROJ_DIM: 16
  DATALOADER.NUM_WORKERS: 0
  TENSORBOARD: false
  LOGGER.WANDB: true
blocks:
  - name: moco
    variants:
      fa: {FA.ENABLED: true, FA.OP: extrapolate}
"""


def _study_grid(tmp_path: Path, wandb: bool = True):
    from test_study import TINY, _idx_data

    from feataug import study

    data = tmp_path / "data"
    if not data.is_dir():
        _idx_data(data)
    path = tmp_path / f"tiny_{'on' if wandb else 'off'}.yaml"
    path.write_text(f"base: {TINY}\n"
                    "eval: {train: '{data}/train-images-idx3-ubyte.gz', "
                    "val: '{data}/train-images-idx3-ubyte.gz', format: idx, max_train: 24, "
                    "val_per_class: 2, knn_k: 5, batch_size: 16}\n"
                    + (STUDY if wandb else STUDY.replace("  LOGGER.WANDB: true\n", "")))
    return study.load_grid(path, data_root=str(data))


def test_study_jobs_are_named_runs_of_one_group_and_keep_their_digests(tmp_path):
    from feataug import study

    on, off = _study_grid(tmp_path), _study_grid(tmp_path, wandb=False)
    out = tmp_path / "my-study"
    jobs_on, jobs_off = study.make_jobs(on, out, [0, 3]), study.make_jobs(off, out, [0, 3])
    for job, same in zip(jobs_on, jobs_off, strict=True):
        cfg = job.cfg()
        assert cfg.LOGGER.WANDB and cfg.LOGGER.WANDB_GROUP == "my-study"
        assert cfg.LOGGER.WANDB_NAME == f"{job.run.name}/seed{job.seed}"
        assert not same.cfg().LOGGER.WANDB and same.cfg().LOGGER.WANDB_NAME == ""
        assert job.digest() == same.digest()  # W&B on or off: the same job, still finished
    assert [j.cfg().LOGGER.WANDB_NAME for j in jobs_on] == [
        "random-init/seed0", "random-init/seed3", "moco.fa/seed0", "moco.fa/seed3"]


def test_a_study_job_logs_pretraining_and_its_result_to_one_run(tmp_path, offline):
    from feataug import study

    grid, out = _study_grid(tmp_path), tmp_path / "my-study"
    records = study.run_study(grid, out, [0], echo=lambda s: None, plots=False)
    assert [r["status"] for r in records] == ["ok", "ok"], records
    folders = {r["run"]: out / "runs" / r["run"] / "seed0" for r in records}
    runs = _runs(offline)
    ids = {name: stored_run_id(folder) for name, folder in folders.items()}
    # the untrained trunk: one run; the pretrained one: pretraining, then its evaluation
    assert sorted(r["id"] for r in runs) == sorted([ids["random-init"], *[ids["moco.fa"]] * 2])
    for record in records:
        mine = [r for r in runs if r["id"] == ids[record["run"]]]
        assert {(r["name"], r["group"]) for r in mine} == {(f"{record['run']}/seed0", "my-study")}
        summary = mine[-1]["summary"]
        for key in ("knn_top1", "linear_top1", "eval_s"):
            assert summary[f"study/{key}"] == record["metrics"][key]
    pretraining = next(r for r in runs if r["id"] == ids["moco.fa"] and r["history"])
    assert sorted(pretraining["history"]) == [1, 2]
    assert pretraining["summary"]["final/loss"] == records[1]["metrics"]["loss"]


def test_a_study_without_wandb_is_refused_before_it_writes(tmp_path, monkeypatch):
    from feataug import study
    from pretrain.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)
    grid, out = _study_grid(tmp_path), tmp_path / "my-study"
    with pytest.raises(ConfigError, match=r"^LOGGER\.WANDB is True but wandb is not installed"):
        study.run_study(grid, out, [0], echo=lambda s: None, plots=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- detection
DETECT = Path(__file__).resolve().parents[1] / "configs" / "detection" / "tiny_faster_R18_FPN.yaml"


def test_detect_writer_logs_the_storage_and_the_results(tmp_path, offline):
    pytest.importorskip("detectron2")
    from detectron2.utils.events import EventStorage

    from transfer.config import get_detection_cfg
    from transfer.wandb_writer import WandbWriter

    out = tmp_path / "det"
    out.mkdir()
    cfg = get_detection_cfg(DETECT, ["LOGGER.WANDB", "True", "OUTPUT_DIR", str(out)])
    writer = WandbWriter(cfg)
    with EventStorage(0) as storage:
        for it in range(4):
            storage.iter = it
            storage.put_scalars(total_loss=1.0 / (it + 1), lr=0.01 * (it + 1),
                                smoothing_hint=False)
            if it == 1:
                writer.write()
        storage.put_scalars(**{"bbox/AP": 12.5}, smoothing_hint=False)  # EvalHook, at the end
        writer.write()
        writer.write()  # nothing new: nothing logged
    writer.log_results({"bbox": {"AP": 12.5, "AP50": 30.0}})
    writer.close()
    (run,) = _runs(offline)
    assert run["id"] == stored_run_id(out) and run["name"] == "det"
    assert run["config"]["MODEL.META_ARCHITECTURE"] == cfg.MODEL.META_ARCHITECTURE
    # what each write saw as the latest value: iteration 1 at the first, 3 at the second
    assert run["history"] == {1: {"total_loss": 0.5, "lr": 0.02},
                              3: {"total_loss": 0.25, "lr": 0.04, "bbox/AP": 12.5}}
    assert run["summary"]["bbox/AP"] == 12.5 and run["summary"]["bbox/AP50"] == 30.0

    resumed = WandbWriter(cfg, resume=True)  # --resume from a checkpoint: the same run
    with EventStorage(4) as storage:
        storage.put_scalars(total_loss=0.2, smoothing_hint=False)
        resumed.write()
    resumed.close()
    assert [r["id"] for r in _runs(offline)] == [run["id"]] * 2
    assert _runs(offline)[1]["history"] == {4: {"total_loss": 0.2}}


def test_detect_trainer_adds_the_writer_only_with_the_key(tmp_path):
    pytest.importorskip("detectron2")
    from transfer.config import get_detection_cfg
    from transfer.trainer import Trainer
    from transfer.wandb_writer import WandbWriter

    for on in (False, True):
        trainer = object.__new__(Trainer)  # build_writers reads cfg and max_iter alone
        trainer.cfg = get_detection_cfg(DETECT, ["LOGGER.WANDB", str(on),
                                                 "OUTPUT_DIR", str(tmp_path / str(on))])
        trainer.max_iter, trainer.wandb_writer = 10, None
        writers = trainer.build_writers()
        assert isinstance(writers[-1], WandbWriter) == on
        assert (trainer.wandb_writer is writers[-1]) == on
        for w in writers:
            w.close()
        assert not (tmp_path / str(on) / RUN_FILE).exists()  # opened at the first write


def test_detect_without_wandb_is_refused_before_it_writes(tmp_path, capsys, monkeypatch):
    pytest.importorskip("detectron2")
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "det"
    line = refused(capsys, ["detect", "--config-file", DETECT, "LOGGER.WANDB", "True",
                            "OUTPUT_DIR", out], keep=[tmp_path])
    assert line.endswith(WANDB_MISSING) and not out.exists()


def test_detect_run_logs_training_and_results_and_resumes_its_run(tmp_path, offline, catalog):
    """A 2-iteration ``feataug detect`` from scratch, then ``--resume`` to iteration 3: one W&B
    run, the losses at their iterations, the evaluation's AP as eval_results.json holds it."""
    pytest.importorskip("detectron2")
    from detect_data import make_voc
    from test_detect import TINY

    from transfer import detect

    make_voc(tmp_path / "voc")
    out = tmp_path / "out"
    voc = (("syn_2007_train", str(tmp_path / "voc"), "trainval"),
           ("syn_2007_test", str(tmp_path / "voc"), "test"))
    opts = ["DATASETS.TRAIN", "('syn_2007_train',)", "DATASETS.TEST", "('syn_2007_test',)", *TINY,
            "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(out), *WANDB_ON]

    def run_detect(*more: str, resume: bool = False) -> dict:
        return detect.run_detection(detect.DetectOptions(
            DETECT, (*opts, *more), from_scratch=True, quiet=True, resume=resume,
            register_voc=voc))

    results = run_detect()
    (run,) = _runs(offline)
    assert run["id"] == stored_run_id(out) and run["name"] == "out"
    assert run["config"]["SOLVER.MAX_ITER"] == 2
    assert sorted(run["history"]) == [1, 2]  # the last iteration's write; the final evaluation
    assert "total_loss" in run["history"][1]
    assert run["history"][2]["bbox/AP"] == pytest.approx(results["bbox"]["AP"])
    assert run["summary"]["bbox/AP50"] == pytest.approx(results["bbox"]["AP50"])

    run_detect("SOLVER.MAX_ITER", "3", resume=True)  # from model_final.pth (iteration 2)
    runs = _runs(offline)
    assert [r["id"] for r in runs] == [run["id"]] * 2
    assert sorted(runs[1]["history"]) == [2, 3] and "total_loss" in runs[1]["history"][2]


def test_detect_trials_are_named_runs_of_one_group(tmp_path, monkeypatch):
    pytest.importorskip("detectron2")
    from transfer import runner
    from transfer.config import get_detection_cfg
    from transfer.options import DetectOptions

    ran = []
    monkeypatch.setattr(runner, "_run_once", lambda cfg, options: ran.append(cfg) or
                        {"bbox": {"AP": 1.0}})
    for extra, group in (([], "det"), (["LOGGER.WANDB_NAME", "x", "LOGGER.WANDB_GROUP", "g"], "g")):
        ran.clear()
        cfg = get_detection_cfg(DETECT, ["OUTPUT_DIR", str(tmp_path / "det"), *WANDB_ON, *extra])
        runner._run_trials(cfg, DetectOptions(DETECT, trials=2), None)
        base = extra[1] if extra else "det"
        assert [(c.LOGGER.WANDB_NAME, c.LOGGER.WANDB_GROUP) for c in ran] == [
            (f"{base}/trial0", group), (f"{base}/trial1", group)]
