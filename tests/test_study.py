"""`feataug study`: grid expansion, baselines, resume, aggregation math, reports, one real job."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import refused

from feataug import study
from feataug.cli import main as cli_main
from feataug.study import Grid, Job, Run, StudyError
from feataug.study import disk as study_disk
from pretrain.evaluation import linear_probe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "tiny_moco_fa_r18.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def write_grid(tmp_path: Path, body: str, name: str = "grid.yaml") -> Path:
    head = (f"base: {TINY}\n"
            "eval: {train: /nowhere/train, val: /nowhere/val}\n")
    path = tmp_path / name
    path.write_text(head + body)
    return path


GRID = """
seeds: 2
random_init: true
overrides: {SOLVER.MAX_ITER: 7}
blocks:
  - name: moco
    overrides: {MODEL.METHOD: moco}
    variants:
      base: {FA.ENABLED: false}
      fa: {FA.ENABLED: true}
      hard: {FA.ENABLED: true, FA.OP: hardmix, FA.ROLE: negative}
    axes:
      FA.OP: [noise, extrapolate]
      DA.STRENGTH: [weak, strong]
  - name: simsiam
    overrides: {MODEL.METHOD: simsiam, SOLVER.BASE_LR: 0.05}
    variants:
      base: {FA.ENABLED: false}
      fa: {FA.ENABLED: true, FA.ARCH: pre_predictor}
    axes:
      FA.OP: [noise]
"""


# ----------------------------------------------------------------------------- grid expansion
def test_grid_expansion_names_baselines_axes(tmp_path):
    grid = study.load_grid(write_grid(tmp_path, GRID))
    names = [r.name for r in grid.runs]
    # moco: (2 ops x 2 strengths) x 3 variants; FA-off collapses over FA.OP (2 left), hardmix
    # overrides FA.OP (2 left, one per strength); simsiam: 1 x 2 variants.
    assert names == [
        "random-init",
        "moco.base.strength=weak", "moco.fa.op=noise.strength=weak", "moco.hard.strength=weak",
        "moco.base.strength=strong", "moco.fa.op=noise.strength=strong",
        "moco.hard.strength=strong",
        "moco.fa.op=extrapolate.strength=weak", "moco.fa.op=extrapolate.strength=strong",
        "simsiam.base", "simsiam.fa.op=noise",
    ]
    by = {r.name: r for r in grid.runs}
    # baseline = FA off, same everything else (DA strength included)
    assert by["moco.fa.op=extrapolate.strength=weak"].baseline == "moco.base.strength=weak"
    assert by["moco.hard.strength=strong"].baseline == "moco.base.strength=strong"
    assert by["simsiam.fa.op=noise"].baseline == "simsiam.base"
    assert by["moco.base.strength=weak"].baseline is None and by["random-init"].random_init
    # overrides: grid <- block <- axes <- variant; FA keys of FA-off runs dropped
    over = dict(by["moco.hard.strength=weak"].overrides)
    assert over == {"SOLVER.MAX_ITER": 7, "MODEL.METHOD": "moco", "FA.OP": "hardmix",
                    "DA.STRENGTH": "weak", "FA.ENABLED": True, "FA.ROLE": "negative"}
    assert dict(by["moco.base.strength=weak"].overrides) == {
        "SOLVER.MAX_ITER": 7, "MODEL.METHOD": "moco", "DA.STRENGTH": "weak", "FA.ENABLED": False}
    # axes: FA.ROLE follows FA.OP, the lr follows the method, FA.ENABLED is "off" in FA.OP
    assert grid.axes == ["MODEL.METHOD", "DA.STRENGTH", "FA.OP"]
    assert dict(by["simsiam.base"].settings) == {
        "MODEL.METHOD": "simsiam", "FA.OP": "off", "DA.STRENGTH": "strong"}
    assert grid.seeds == 2 and grid.eval["knn_k"] == 200
    # a job's config is the run's overrides on the base file, plus its folder and seed
    cfg = Job(by["moco.hard.strength=weak"], 1, "/x/y", grid.eval).cfg()
    assert (cfg.FA.OP, cfg.FA.ROLE, cfg.DA.STRENGTH, cfg.SEED, cfg.OUTPUT_DIR) == (
        "hardmix", "negative", "weak", 1, "/x/y")
    assert cfg.MODEL.BACKBONE == "resnet18"  # from the base file


def test_skip_invalid_and_typo_values(tmp_path):
    body = """
blocks:
  - name: s
    overrides: {MODEL.METHOD: simsiam, FA.ENABLED: true}
    axes:
      FA.ARCH: [basic, post_predictor]
      FA.POSITION: [backbone, projector]
    skip_invalid: true
"""
    grid = study.load_grid(write_grid(tmp_path, body))
    # post_predictor needs POSITION projector: 3 of the 4 combinations remain
    assert [r.name for r in grid.runs] == [
        "s.arch=basic.position=backbone", "s.arch=basic.position=projector",
        "s.arch=post_predictor.position=projector"]
    with pytest.raises(StudyError, match="post_predictor acts on the predictor output"):
        study.load_grid(write_grid(tmp_path, body.replace("skip_invalid: true", "")))
    typo = body.replace("[basic, post_predictor]", "[basic, post_predicter]")
    with pytest.raises(StudyError, match="FA.ARCH value 'post_predicter' is never valid"):
        study.load_grid(write_grid(tmp_path, typo))


@pytest.mark.parametrize("body, message", [
    ("blocks: []\n", "`blocks:` must be a non-empty list"),
    ("blocks: [{name: a, overrides: {FA.OPP: noise}}]\n", "Non-existent key: FA.OPP"),
    ("blocks: [{name: a, axis: {}}]\n", "unknown key(s) ['axis']"),
    ("blocks: [{name: a, base: missing.yaml}]\n", "base config"),
    ("seed: 3\nblocks: [{name: a}]\n", "unknown key(s) ['seed']"),
    ("blocks: [{name: a, variants: {x: {SOLVER.MAX_ITER: 1}, y: {SOLVER.MAX_ITER: 2}}}, "
     "{name: a, variants: {x: {SOLVER.MAX_ITER: 3}}}]\n", "both named 'a.x'"),
    ("blocks: [{name: a, axes: {MODEL.METHOD: [moco, sarsa]}}]\n", "MODEL.METHOD 'sarsa'"),
    ("blocks: [{name: a}]\nprepare: [imagenet]\n", "unknown dataset 'imagenet'"),
    ("blocks: [{name: a, variants: {off: {FA.ENABLED: false}}}]\n", "variant name False"),
    # counts that size a list or a process pool are capped (no out-of-memory from a grid)
    ("seeds: 100000000\nblocks: [{name: a}]\n", "seeds must be an integer from 1 to 1000, "
     "got 100000000"),
    ("seeds: 0\nblocks: [{name: a}]\n", "seeds must be an integer from 1 to 1000, got 0"),
    ("jobs: 1000000000\nblocks: [{name: a}]\n", "jobs must be an integer from 1 to 1000"),
])
def test_bad_grids_are_refused_with_the_file_named(tmp_path, body, message):
    path = write_grid(tmp_path, body)
    with pytest.raises(StudyError) as e:
        study.load_grid(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_shipped_grids_expand():
    cpu = study.load_grid(ROOT / "configs" / "study" / "cpu.yaml")
    assert cpu.seeds == 3 and cpu.runs[0].random_init
    ops = {dict(r.settings)["FA.OP"] for r in cpu.runs if not r.random_init}
    assert ops >= {"off", "identity", "extrapolate", "hardmix"}
    fa_runs = [r for r in cpu.runs if not r.fa_off and not r.random_init]
    assert all(r.baseline for r in fa_runs)
    # runs that add their term are also compared with their block's scale control
    added = [r for r in fa_runs if ("FA.LOSS_MODE", "add") in r.overrides
             and not r.name.endswith(".scale")]
    assert added and all(r.control == r.name.split(".")[0] + ".scale" for r in added)
    assert all(r.control is None for r in fa_runs if r not in added)
    gpu = study.load_grid(ROOT / "configs" / "study" / "cifar_gpu.yaml")
    assert {r.name for r in gpu.runs} >= {"moco.feature_transformation", "moco.mochi", "moco.scale"}
    paper = study.load_grid(ROOT / "configs" / "study" / "paper.yaml")
    assert {"MODEL.METHOD", "FA.OP", "FA.POSITION", "FA.ARCH", "FA.STOP_GRAD"} <= set(paper.axes)
    assert any(a.startswith("DA.") for a in paper.axes)
    assert all(r.baseline for r in paper.runs if not r.fa_off and not r.random_init)


def test_cli_dry_run_and_error_line(tmp_path, capsys):
    path = write_grid(tmp_path, GRID)
    assert cli_main(["study", "--grid", str(path), "--dry-run", "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "11 runs x 3 seeds" in out and "vs moco.base.strength=weak" in out
    bad = write_grid(tmp_path, "blocks: 3\n", "bad.yaml")
    line = refused(capsys, ["study", "--grid", bad], keep=[tmp_path])
    assert line == f"feataug study: error: {bad}: `blocks:` must be a non-empty list"


@pytest.mark.parametrize("flag", ["--seeds", "--jobs"])
def test_absurd_counts_on_the_command_line_are_refused(tmp_path, capsys, flag):
    # (1001, not 10**8: were the cap gone, this test must not exhaust the memory itself)
    line = refused(capsys, ["study", "--grid", write_grid(tmp_path, SMALL), "--dry-run", flag,
                            "1001"], keep=[tmp_path], out="")
    assert line == f"feataug study: error: {flag} must be from 1 to 1000, got 1001"


@pytest.mark.parametrize("in_grid", [False, True])
def test_a_yaml_tag_is_refused_as_a_tag(in_grid, tmp_path, capsys):
    """In the grid or in its base config: one line saying the tag is refused (no combination
    is at fault, so no `skip_invalid` hint), and nothing it names is run."""
    marker = tmp_path / "ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    if in_grid:
        path = write_grid(tmp_path, f"seeds: {tag}\nblocks: [{{name: a}}]\n")
    else:
        (tmp_path / "evil.yaml").write_text(f"SEED: {tag}\n")
        path = tmp_path / "grid.yaml"
        path.write_text("base: evil.yaml\neval: {train: /nowhere/t, val: /nowhere/v}\n"
                        "blocks: [{name: a, axes: {SEED: [1, 2]}, skip_invalid: false}]\n")
    line = refused(capsys, ["study", "--grid", path, "--dry-run"], keep=[tmp_path])
    assert line.startswith(f"feataug study: error: {path}: ") and "YAML tag refused at line" in line
    assert "skip_invalid" not in line and not marker.exists()


# ----------------------------------------------------------------------------- runner + resume
CALLS: list[tuple[str, int]] = []
FAIL: set[tuple[str, int]] = set()


def fake_metrics(name: str, seed: int) -> dict:
    base = 50.0 + (5 * len(name)) % 17
    return {"knn_top1": base + seed, "linear_top1": base + 2.0 * seed, "iterations": 7}


def fake_runner(job: Job) -> dict:
    """Deterministic metrics from the run name and seed; fails for jobs listed in FAIL."""
    CALLS.append((job.run.name, job.seed))
    if (job.run.name, job.seed) in FAIL:
        raise RuntimeError("simulated crash")
    return fake_metrics(job.run.name, job.seed)


SMALL = """
random_init: true
blocks:
  - name: m
    overrides: {MODEL.METHOD: moco}
    variants:
      nofa: {FA.ENABLED: false}
      fa: {FA.ENABLED: true}
    axes:
      FA.OP: [noise, extrapolate]
"""


def test_resume_skips_finished_jobs_and_retries_failed(tmp_path):
    grid = study.load_grid(write_grid(tmp_path, SMALL))
    out = tmp_path / "out"
    CALLS.clear()
    FAIL.clear()
    FAIL.add(("m.fa.op=noise", 1))
    lines: list[str] = []
    records = study.run_study(grid, out, [0, 1], runner=fake_runner, echo=lines.append)
    assert len(CALLS) == 4 * 2
    status = {(r["run"], r["seed"]): r["status"] for r in records}
    assert status.pop(("m.fa.op=noise", 1)) == "failed" and set(status.values()) == {"ok"}
    failed_dir = out / "runs" / "m.fa.op=noise" / "seed1"
    assert not (failed_dir / "result.json").exists()
    assert "simulated crash" in (failed_dir / "error.txt").read_text()
    assert "FAILED RuntimeError: simulated crash" in "\n".join(lines)
    done = json.loads((out / "runs" / "m.nofa" / "seed0" / "result.json").read_text())
    assert done["status"] == "ok" and done["metrics"] == fake_metrics("m.nofa", 0)

    # rerun: only the failed job runs again
    CALLS.clear()
    FAIL.clear()
    records = study.run_study(grid, out, [0, 1], runner=fake_runner, echo=lines.append)
    assert CALLS == [("m.fa.op=noise", 1)]
    assert (failed_dir / "result.json").is_file() and not (failed_dir / "error.txt").exists()
    assert all(r["status"] == "ok" for r in records) and len(records) == 8
    assert "7 finished earlier (skipped), 1 to run" in "\n".join(lines)
    # a removed result reruns that job alone; a new seed runs only the new jobs
    (out / "runs" / "m.nofa" / "seed0" / "result.json").unlink()
    CALLS.clear()
    study.run_study(grid, out, [0, 1, 2], runner=fake_runner, echo=lines.append)
    assert sorted(CALLS) == sorted([("m.nofa", 0)] + [(r.name, 2) for r in grid.runs])

    # reports: one CSV row per run x seed, a table, one chart per axis
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 * 3 and rows[0]["run"] == "random-init"
    assert rows[3] == {**rows[3], "run": "m.nofa", "seed": "0", "status": "ok", "FA.OP": "off",
                       "knn_top1": str(fake_metrics("m.nofa", 0)["knn_top1"]), "iterations": "7"}
    assert (out / "plots" / "FA.OP.png").stat().st_size > 1000
    assert "| m.fa.op=noise | noise | 3 |" in (out / "results.md").read_text()

    # the same folder with a different config is refused before anything runs
    changed = study.load_grid(
        write_grid(tmp_path, "overrides: {SOLVER.MAX_ITER: 3}\n" + SMALL, "g2.yaml"))
    CALLS.clear()
    with pytest.raises(StudyError, match="made for a different config"):
        study.run_study(changed, out, [0, 1], runner=fake_runner, echo=lines.append)
    assert CALLS == []


def test_a_key_added_to_the_defaults_keeps_finished_jobs_finished(tmp_path, monkeypatch):
    """A new config key at a default that keeps the old behaviour leaves every digest (and the
    finished job folders) valid; a grid that changes a value does not."""
    from pretrain import config
    from pretrain.config import CN

    grid = study.load_grid(write_grid(tmp_path, SMALL))
    out = tmp_path / "out"
    CALLS.clear()
    FAIL.clear()
    study.run_study(grid, out, [0], runner=fake_runner, echo=lambda line: None)
    before = {j.output_dir: j.digest() for j in study.make_jobs(grid, out, [0])}
    plain = config.get_cfg

    def with_a_new_key():
        cfg = plain()
        cfg.NEW_NODE = CN({"KEY": 7})
        return cfg

    monkeypatch.setattr(config, "get_cfg", with_a_new_key)
    study.grid._base_cfg.cache_clear()
    study.grid._base_cfg_pickle.cache_clear()
    grown = study.load_grid(write_grid(tmp_path, SMALL, "g2.yaml"))
    jobs = study.make_jobs(grown, out, [0])
    assert all(j.grid_cfg().NEW_NODE.KEY == 7 for j in jobs)  # the key is in every job's config
    assert {j.output_dir: j.digest() for j in jobs} == before
    CALLS.clear()
    study.run_study(grown, out, [0], runner=fake_runner, echo=lambda line: None)
    assert CALLS == []  # nothing reran
    changed = study.load_grid(write_grid(tmp_path, "overrides: {NEW_NODE.KEY: 8}\n" + SMALL,
                                         "g3.yaml"))
    with pytest.raises(StudyError, match="made for a different config"):
        study.run_study(changed, out, [0], runner=fake_runner, echo=lambda line: None)
    study.grid._base_cfg.cache_clear()
    study.grid._base_cfg_pickle.cache_clear()


STUDY_SCRIPT = """
import os, sys, time
from pathlib import Path
from feataug import study

def runner(job):
    Path(job.output_dir, "pid").write_text(str(os.getpid()))
    time.sleep(300)
    return {"knn_top1": 1.0}

if __name__ == "__main__":
    grid = study.load_grid(sys.argv[1])
    study.run_study(grid, sys.argv[2], [0], runner=runner, jobs=2, plots=False)
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_study_leaves_no_job_running(tmp_path):
    """SIGKILL the study process while two jobs run: the job processes end with it (they would
    otherwise run on unseen and write records a later run of the study does not expect)."""
    script = tmp_path / "run_study.py"
    script.write_text(textwrap.dedent(STUDY_SCRIPT))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(write_grid(tmp_path, SMALL)),
                             str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(pids := list(out.glob("runs/*/seed0/pid"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "jobs did not start"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pids]
        assert all(_running(w) for w in workers)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(w) for w in workers)


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("no_plots", [True, False])
def test_cli_names_only_the_files_it_wrote(no_plots, tmp_path, capsys, monkeypatch):
    from feataug.study import cli as study_cli

    real = study_cli.run_study
    monkeypatch.setattr(study_cli, "run_study", lambda *args, **kwargs: real(
        *args, runner=fake_runner, echo=lambda s: None, **kwargs))
    out = tmp_path / "out"
    argv = ["study", "--grid", str(write_grid(tmp_path, SMALL)), "--seeds", "1", "--out", str(out)]
    assert cli_main([*argv, *(["--no-plots"] if no_plots else [])]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out / 'results.csv'}, {out / 'results.md'}")
    assert (f"{out / 'plots'}/" in last) is (out / "plots").is_dir() is (not no_plots)


def _grid_with(runs: list[Run], axes: list[str]) -> Grid:
    return Grid("g.yaml", "", runs, axes, {})


def test_aggregation_mean_std_delta_by_hand():
    runs = [Run("ri", "", (), random_init=True, settings=(("FA.OP", ""),)),
            Run("off", "", (), settings=(("FA.OP", "off"),)),
            Run("fa", "", (), baseline="off", settings=(("FA.OP", "noise"),))]
    grid = _grid_with(runs, ["FA.OP"])

    def rec(run, seed, knn, lin=None):
        m = {"knn_top1": knn} | ({"linear_top1": lin} if lin is not None else {})
        return {"run": run, "seed": seed, "status": "ok", "metrics": m}

    records = [rec("ri", 0, 40.0, 41.0),
               rec("off", 0, 70.0, 80.0), rec("off", 1, 72.0, 81.0), rec("off", 2, 74.0),
               rec("fa", 0, 71.0, 84.0), rec("fa", 1, 75.0), rec("fa", 2, 76.0, 86.0),
               {"run": "fa", "seed": 3, "status": "failed", "error": "x"}]
    rows = {r["run"]: r for r in study.summarize(grid, records, ["knn_top1", "linear_top1"])}
    # off: 70, 72, 74 -> mean 72, sample std sqrt((4 + 0 + 4) / 2) = 2
    assert rows["off"]["knn_top1"] == pytest.approx((72.0, 2.0))
    # fa: 71, 75, 76 -> mean 74, std sqrt((9 + 1 + 4) / 2) = sqrt(7)
    assert rows["fa"]["knn_top1"] == pytest.approx((74.0, math.sqrt(7)))
    # paired differences 1, 3, 2 -> delta 2 ± 1
    assert rows["fa"]["knn_top1_delta"] == pytest.approx((2.0, 1.0))
    # linear: fa has seeds 0, 2; off has 0, 1 -> one common seed (0): delta 84 - 80 = 4, no std
    assert rows["fa"]["linear_top1"] == pytest.approx((85.0, math.sqrt(2)))
    d, s = rows["fa"]["linear_top1_delta"]
    assert d == pytest.approx(4.0) and math.isnan(s)
    assert rows["fa"]["seeds"] == [0, 1, 2]  # the failed seed 3 is not counted
    m, s = rows["ri"]["knn_top1"]
    assert m == 40.0 and math.isnan(s)
    assert math.isnan(rows["off"]["knn_top1_delta"][0])

    knn = study.markdown_table(grid, list(rows.values()), "knn_top1")
    assert knn.splitlines() == [
        "| run | FA.OP | seeds | kNN top-1 | Δ vs baseline | Δ vs random init |",
        "|---|---|---|---|---|---|",
        "| ri |  | 1 | 40.00 | untrained |  |",
        "| off | off | 3 | 72.00 ± 2.00 | baseline | +30.00 (no effect shown) |",
        # 2.00 is not more than 2 x 1.00, and one seed is too few: no claim either way
        "| fa | noise | 3 | 74.00 ± 2.65 | +2.00 ± 1.00 (no effect shown) | +31.00 (no effect shown) |",
    ]
    linear = study.markdown_table(grid, list(rows.values()), "linear_top1").splitlines()
    assert linear[-1] == "| fa | noise | 3 | 85.00 ± 1.41 | +4.00 (no effect shown) | +43.00 (no effect shown) |"


def test_claim_rule_by_hand():
    from pretrain.utils.stats import claim

    assert claim([2.1, 2.0, 1.9]) == "helps"  # same sign, 2.0 > 2 x 0.1
    assert claim([-1.0, -1.1, -0.9]) == "hurts"
    assert claim([1.0, 3.0, 2.0]) == "no effect shown"  # mean 2 = 2 sd, not more
    assert claim([1.0, -0.1, 2.0]) == "no effect shown"  # signs differ
    assert claim([5.0, 5.1]) == "no effect shown"  # fewer than 3 seeds
    assert claim([5.0, 5.1, None]) == "no effect shown"


def test_control_variant_is_matched_and_compared(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(f"""
base: {TINY}
overrides: {{DATA.ROOT: x}}
eval: {{train: a, val: b}}
blocks:
  - name: m
    control: scale
    variants:
      base: {{FA.ENABLED: false}}
      scale: {{FA.ENABLED: true, FA.OP: identity, FA.LOSS_MODE: add}}
      ext: {{FA.ENABLED: true, FA.OP: extrapolate, FA.LOSS_MODE: add}}
      ext_mean: {{FA.ENABLED: true, FA.OP: extrapolate, FA.LOSS_MODE: mean}}
""")
    grid = study.load_grid(grid_file)
    by = {r.name: r for r in grid.runs}
    assert by["m.ext"].control == "m.scale" and by["m.ext"].baseline == "m.base"
    assert by["m.scale"].control is None and by["m.scale"].baseline == "m.base"
    assert by["m.ext_mean"].control is None  # at the baseline's loss scale: no control needed

    def rec(run, seed, knn):
        return {"run": run, "seed": seed, "status": "ok", "metrics": {"knn_top1": knn}}

    records = [rec("m.base", s, 70.0 + s) for s in range(3)]
    records += [rec("m.scale", s, 68.0 + s) for s in range(3)]
    records += [rec("m.ext", s, 69.0 + s + 0.1 * (s == 1)) for s in range(3)]
    rows = {r["run"]: r for r in study.summarize(grid, records, ["knn_top1"])}
    assert rows["m.ext"]["knn_top1_claim"] == "hurts"  # -1, -0.9, -1 vs the baseline
    assert rows["m.ext"]["knn_top1_claim_control"] == "helps"  # +1, +1.1, +1 vs the control
    assert rows["m.scale"]["knn_top1_claim"] == "hurts"
    line = study.markdown_table(grid, list(rows.values()), "knn_top1").splitlines()[-2]
    assert line.endswith("| -0.97 ± 0.06 **hurts** | +1.03 ± 0.06 **helps** |")


def test_mean_std_matches_numpy():
    xs = [3.25, -1.5, 8.0, 2.0]
    m, s = study.mean_std(xs)
    assert m == pytest.approx(np.mean(xs)) and s == pytest.approx(np.std(xs, ddof=1))


# ----------------------------------------------------------------------------- evaluation
def test_linear_probe_known_accuracy():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    y = torch.arange(3).repeat(20)
    x = centers[y] + 0.3 * torch.randn(60, 3, generator=g)
    yv = torch.arange(3).repeat(4)
    xv = centers[yv] + 0.3 * torch.randn(12, 3, generator=g)
    assert linear_probe(x, y, xv, yv, 3) == 100.0
    wrong = yv.clone()
    wrong[:3] = (wrong[:3] + 1) % 3  # 3 of 12 labels contradict their cluster -> exactly 75%
    assert linear_probe(x, y, xv, wrong, 3) == 75.0


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)  # uint8 values, ndim dimensions
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _idx_data(data: Path, n: int = 40) -> Path:
    """``n`` 28x28 images of 4 classes (the class sets the brightness) as an IDX pair."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    images = (rng.integers(0, 60, (n, 28, 28)) + 50 * labels[:, None, None]).astype(np.uint8)
    data.mkdir()
    _write_idx(data / "train-images-idx3-ubyte.gz", images)
    _write_idx(data / "train-labels-idx1-ubyte.gz", labels)
    return data


def test_one_real_tiny_job(tmp_path):
    """Pretrain two iterations on a tiny IDX set, then evaluate the trunk of last.pth."""
    data = _idx_data(tmp_path / "data")
    body = """
random_init: true
overrides:
  DATA.ROOT: "{data}"
  DATA.FORMAT: idx
  DATA.IMAGE_SIZE: 32
  SOLVER.BATCH_SIZE: 8
  SOLVER.EPOCHS: 0
  SOLVER.MAX_ITER: 2
  MODEL.MOCO.K: 16
  MODEL.PROJ_HIDDEN_DIM: 32
  MODEL.PROJ_DIM: 16
  DATALOADER.NUM_WORKERS: 0
  TENSORBOARD: false
blocks:
  - name: moco
    variants:
      fa: {FA.ENABLED: true, FA.OP: extrapolate}
"""
    path = tmp_path / "tiny.yaml"
    path.write_text(f"base: {TINY}\n"
                    "eval: {train: '{data}/train-images-idx3-ubyte.gz', "
                    "val: '{data}/train-images-idx3-ubyte.gz', format: idx, max_train: 24, "
                    "val_per_class: 2, knn_k: 5, batch_size: 16}\n" + body)
    grid = study.load_grid(path, data_root=str(data))
    out = tmp_path / "out"
    records = study.run_study(grid, out, [0], echo=lambda s: None, plots=False)
    assert [r["status"] for r in records] == ["ok", "ok"], records
    ckpt = torch.load(out / "runs" / "moco.fa" / "seed0" / "last.pth", weights_only=False)
    assert ckpt["iter"] == 2 and records[1]["metrics"]["iterations"] == 2
    for r in records:
        for m in ("knn_top1", "linear_top1"):
            v = r["metrics"][m]
            assert 0.0 <= v <= 100.0 and (v * 8) == pytest.approx(round(v * 8))  # k / 8 val images


# ----------------------------------------------------------------------------- checkpoints, disk
def test_jobs_keep_last_pth_alone_unless_the_grid_asks_and_dry_run_sizes_it(tmp_path, capsys):
    """Two real jobs of 2 epochs: the base config asks for a numbered copy every 2nd epoch,
    which a study job drops (last.pth alone); a grid override SOLVER.CHECKPOINT_PERIOD 1 keeps
    one per epoch. The --dry-run estimate equals each job's files on disk."""
    data = _idx_data(tmp_path / "data", 16)  # batch 8: 2 iterations per epoch
    base = tmp_path / "base.yaml"
    base.write_text(f"_BASE_: {TINY}\nSOLVER: {{CHECKPOINT_PERIOD: 2}}\n")
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(f"""
base: {base}
random_init: true
overrides: {{DATA.ROOT: {data}, DATA.FORMAT: idx, DATA.IMAGE_SIZE: 32, SOLVER.BATCH_SIZE: 8,
             SOLVER.EPOCHS: 0, SOLVER.MAX_ITER: 4, MODEL.MOCO.K: 16, MODEL.PROJ_HIDDEN_DIM: 32,
             MODEL.PROJ_DIM: 16, DATALOADER.NUM_WORKERS: 0, TENSORBOARD: false}}
eval: {{train: {data}/train-images-idx3-ubyte.gz, val: {data}/train-images-idx3-ubyte.gz,
        format: idx, knn_k: 5, linear: false}}
blocks:
  - name: moco
    variants:
      plain: {{FA.ENABLED: false}}
      numbered: {{FA.ENABLED: false, SOLVER.CHECKPOINT_PERIOD: 1}}
""")
    out = tmp_path / "out"
    assert cli_main(["study", "--grid", str(grid_file), "--seeds", "1", "--out", str(out),
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    grid = study.load_grid(grid_file)
    records = study.run_study(grid, out, [0], echo=lambda s: None, plots=False)
    assert [r["status"] for r in records] == ["ok"] * 3, records

    def files(run: str) -> list[Path]:
        return sorted((out / "runs" / run / "seed0").glob("*.pth"))

    assert [p.name for p in files("moco.plain")] == ["last.pth"]
    assert [p.name for p in files("moco.numbered")] == [
        "checkpoint_0001.pth", "checkpoint_0002.pth", "last.pth"]
    assert files("random-init") == []
    rows = {r.run: r for r in study_disk.estimate(grid, out, [0])}
    for run in ("moco.plain", "moco.numbered"):
        real = (out / "runs" / run / "seed0" / "last.pth").stat().st_size
        assert abs(rows[run].checkpoint - real) <= 0.001 * real, (rows[run].checkpoint, real)
        assert rows[run].files == len(files(run))
        assert rows[run].total == pytest.approx(sum(p.stat().st_size for p in files(run)),
                                                rel=1e-3)
    assert (rows["random-init"].total, rows["moco.numbered"].files) == (0, 3)
    # the dry run printed those numbers, and their total
    disk = printed[printed.index("disk (estimated)"):].splitlines()
    size = study_disk.human(rows["moco.plain"].checkpoint)
    assert [line.split()[0] for line in disk[1:4]] == ["random-init", "moco.plain",
                                                       "moco.numbered"]
    assert disk[1].endswith(" no checkpoint") and disk[2].endswith(f"{size} x 1 x 1 = {size}")
    assert disk[3].endswith(f"{size} x 3 x 1 = {study_disk.human(rows['moco.numbered'].total)}")
    total = study_disk.human(sum(r.total for r in rows.values()))
    assert disk[4].startswith(f"  total {total} (+ up to {size} of temporaries")


def test_dry_run_warns_when_the_disk_is_too_small(tmp_path, capsys, monkeypatch):
    """Only a warning (exit 0): the estimate may be off, and disk may be freed meanwhile."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(study_disk.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 10**6))
    path = write_grid(tmp_path, SMALL)
    assert cli_main(["study", "--grid", str(path), "--seeds", "2", "--dry-run", "--out",
                     str(tmp_path / "a" / "b")]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the study needs about ")
    assert err[0].endswith(f"more than the 1.0 MB free on the file system of {tmp_path}")
    assert "free: 1.0 MB on the file system of" in captured.out


def test_checkpoint_size_is_the_same_from_a_real_build():
    """Where a model cannot be built on the meta device, the estimate builds it for real."""
    from pretrain.config import load_cfg

    cfg = load_cfg(TINY, ["DEVICE", "cpu"])
    on_meta = study_disk._measure(cfg)
    real = study_disk._measure(cfg, meta=False)
    assert on_meta == real > 10**7  # MoCo ResNet-18: two trunks and momentum buffers


def test_study_default_keeps_the_digests_of_finished_jobs(tmp_path):
    """A job trains with SOLVER.CHECKPOINT_PERIOD 0, yet its digest is the one it had when it
    trained with the base config's 5 (before the study default): folders of studies finished
    then stay finished. The digest formula below is the one those records were written with."""
    import hashlib

    from feataug.study.grid import _digest_cfg
    from feataug.study.jobs import STUDY_DEFAULTS
    from pretrain.config import RESUME_FREE_KEYS, load_cfg

    # a default the study adds must be a key a run may change on resume (never what is trained)
    assert all(key.startswith(RESUME_FREE_KEYS) for key, _ in STUDY_DEFAULTS)
    grid = study.load_grid(write_grid(tmp_path, SMALL))
    pinned = study.load_grid(write_grid(tmp_path, "overrides: {SOLVER.CHECKPOINT_PERIOD: 5}\n"
                                        + SMALL, "pinned.yaml"))
    out = tmp_path / "out"
    for job, same in zip(study.make_jobs(grid, out, [0, 1]), study.make_jobs(pinned, out, [0, 1]),
                         strict=True):
        assert (job.cfg().SOLVER.CHECKPOINT_PERIOD, same.cfg().SOLVER.CHECKPOINT_PERIOD) == (0, 5)
        assert job.digest() == same.digest()
        before = load_cfg(job.run.config_file,
                          job.run.opts() + ["OUTPUT_DIR", job.output_dir, "SEED", job.seed])
        spec = dict(config=_digest_cfg(before), random_init=job.run.random_init, seed=job.seed,
                    eval=job.eval)
        old = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        assert job.digest() == old
        folder = Path(job.output_dir)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(
            dict(run=job.run.name, seed=job.seed, digest=old, status="ok",
                 metrics=fake_metrics(job.run.name, job.seed), wall_s=1.0)))
    CALLS.clear()
    records = study.run_study(grid, out, [0, 1], runner=fake_runner, echo=lambda s: None,
                              plots=False)
    assert CALLS == [] and len(records) == 2 * len(grid.runs)


def test_parallel_jobs_write_the_same_records(tmp_path):
    """--jobs 2: jobs run in two worker processes; records and files as with one."""
    grid = study.load_grid(write_grid(tmp_path, SMALL))
    records = study.run_study(grid, tmp_path / "out", [0], runner=fake_runner, jobs=2,
                              echo=lambda s: None, plots=False)
    assert {(r["run"], r["seed"]): r["metrics"] for r in records} == {
        (run.name, 0): fake_metrics(run.name, 0) for run in grid.runs}
    for run in grid.runs:
        assert (tmp_path / "out" / "runs" / run.name / "seed0" / "result.json").is_file()


# ----------------------------------------------------------------------------- detection
def test_eval_detection_end_to_end_at_tiny_size(tmp_path):
    """Pretrain 2 iterations, convert, fine-tune Faster R-CNN 2 iterations on a tiny COCO set,
    COCO AP in the records and a detection table with the Δ columns; random init from scratch."""
    pytest.importorskip("detectron2")
    from detect_data import make_coco
    from test_engine import _images

    data = _images(tmp_path / "imgs", 8)
    train_json = make_coco(tmp_path / "coco", "train", n_images=4)
    test_json = make_coco(tmp_path / "coco", "test", n_images=2, seed=1)
    det_cfg = ROOT / "configs" / "detection" / "tiny_faster_R18_FPN.yaml"
    tiny = ("{SOLVER.MAX_ITER: 2, SOLVER.IMS_PER_BATCH: 2, SOLVER.WARMUP_ITERS: 1, "
            "SOLVER.STEPS: '(1,)', INPUT.MIN_SIZE_TRAIN: '(128,)', INPUT.MAX_SIZE_TRAIN: 160, "
            "INPUT.MIN_SIZE_TEST: 128, INPUT.MAX_SIZE_TEST: 160, TEST.PRECISE_BN.NUM_ITER: 1, "
            "MODEL.RPN.POST_NMS_TOPK_TRAIN: 64, MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE: 32, "
            "MODEL.RPN.POST_NMS_TOPK_TEST: 32, MODEL.DEVICE: cpu}")
    grid_file = tmp_path / "det.yaml"
    grid_file.write_text(f"""
base: {TINY}
random_init: true
overrides: {{DATA.ROOT: {data}, DATA.IMAGE_SIZE: 32, SOLVER.BATCH_SIZE: 4, SOLVER.MAX_ITER: 2,
             SOLVER.EPOCHS: 0, DATALOADER.NUM_WORKERS: 0, TENSORBOARD: false, DEVICE: cpu}}
eval:
  train: {data}
  val: {data}
  linear: false
  detection:
    config: {det_cfg}
    train: [{train_json}, {tmp_path / 'coco' / 'images'}]
    test: [{test_json}, {tmp_path / 'coco' / 'images'}]
    overrides: {tiny}
blocks:
  - name: moco
    variants:
      base: {{FA.ENABLED: false}}
""")
    grid = study.load_grid(grid_file)
    assert grid.eval["detection"]["trials"] == 1
    out = tmp_path / "out"
    records = study.run_study(grid, out, [0], echo=lambda s: None, plots=False)
    assert [r["status"] for r in records] == ["ok", "ok"], records
    for r in records:  # the numbers of the job's own evaluation file, AP and AP50 not swapped
        bbox = json.loads((out / "runs" / r["run"] / f"seed{r['seed']}" / "detect" / "trial0"
                           / "eval_results.json").read_text())["bbox"]
        assert r["metrics"]["det_ap"] == pytest.approx(bbox["AP"])
        assert r["metrics"]["det_ap50"] == pytest.approx(bbox["AP50"])
    job = out / "runs" / "moco.base" / "seed0"
    assert (job / "d2_weights.pkl").is_file()
    assert (job / "detect" / "trial0" / "eval_results.json").is_file()
    assert not (out / "runs" / "random-init" / "seed0" / "d2_weights.pkl").exists()
    report = (out / "results.md").read_text()
    assert "## detection AP (%)" in report and "## detection AP50 (%)" in report
