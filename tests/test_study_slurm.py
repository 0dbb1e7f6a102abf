"""`feataug study --slurm` (submitit) and pretraining under `srun`: Slurm host lists, the
process-group env of an srun task, the grid's `slurm:` defaults, the sbatch script, the job
states a rerun reads, and two tiny jobs end to end with submitit's local executor."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import refused
from test_study import GRID, SMALL, TINY, _idx_data, fake_metrics, write_grid

from feataug import study
from feataug.cli import main as cli_main
from feataug.study import StudyError, slurm
from pretrain.engine.launch import DistEnv, dist_env, expand_hostlist
from pretrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_SBATCH = ROOT / "tests" / "data" / "study_slurm.sbatch"

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- srun env
@pytest.mark.parametrize("text, hosts", [
    ("gpu5", ["gpu5"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("r[1-2]-n[09-10]", ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]),
    ("x[007],y[1,3]z", ["x007", "y1z", "y3z"]),
])
def test_hostlist_expansion(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "n[1-2", "n1]", "n[a-b]", "n[3-1]", "n[[1]]", "n[1-]"])
def test_malformed_hostlists_are_refused(text):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(text)


SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "gpu[101-102,200]", "SLURM_JOB_ID": "123456"}


def test_dist_env_of_torchrun_and_srun():
    assert dist_env({}) == DistEnv()
    # srun alone: the first host of the node list, a port derived from the job id
    assert dist_env(SRUN) == DistEnv(5, 16, 1, "gpu101", 10000 + 123456 % 20000, "slurm")
    # the step's node list before the job's; MASTER_ADDR / MASTER_PORT win over both
    assert dist_env({**SRUN, "SLURM_STEP_NODELIST": "gpu[102,200]"}).master_addr == "gpu102"
    mine = dist_env({**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (mine.master_addr, mine.master_port) == ("head", 29400)
    # torchrun's env wins when both are set
    torchrun = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                "MASTER_PORT": "1234"}
    assert dist_env({**SRUN, **torchrun}) == DistEnv(2, 4, 0, "h", 1234, "torchrun")
    # one srun task: no process group, nothing to resolve
    assert dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv(source="slurm")
    with pytest.raises(ConfigError, match="no SLURM_NODELIST"):
        dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(ConfigError, match=r"SLURM_NODELIST: host list 'gpu\[1-': unbalanced"):
        dist_env({**SRUN, "SLURM_NODELIST": "gpu[1-"})
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not a number"):
        dist_env({**SRUN, "SLURM_PROCID": "x"})


def _free_port_from_job_id() -> int:
    """A SLURM_JOB_ID whose derived MASTER_PORT is free here now."""
    for job_id in range(os.getpid() % 15000, 20000, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 10000 + job_id))
            except OSError:
                continue
            return job_id
    pytest.skip("no free port")


def test_two_srun_tasks_start_a_gloo_group():
    """Two processes with only srun's SLURM_* variables (no torchrun env) meet on localhost."""
    script = ("import torch, torch.distributed as dist\n"
              "from types import SimpleNamespace\n"
              "from pretrain.engine.launch import init_distributed\n"
              "device, created = init_distributed(SimpleNamespace(DEVICE='cpu'))\n"
              "t = torch.tensor([dist.get_rank() + 1.0])\n"
              "dist.all_reduce(t)\n"
              "print(created, device, dist.get_rank(), dist.get_world_size(), t.item())\n"
              "dist.destroy_process_group()\n")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    job_id = str(_free_port_from_job_id())
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**keep, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(r),
                                   "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2",
                                   "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": job_id})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [o.split() for o, _ in outs] == [["True", "cpu", str(r), "2", "3.0"] for r in range(2)]


# ----------------------------------------------------------------------------- grid, flags
def test_grid_slurm_defaults_and_flags(tmp_path):
    grid = study.load_grid(write_grid(tmp_path, (
        "slurm: {nodes: 2, partition: gpu, args: {qos: high, cpus-per-task: 10, "
        "exclusive: true}}\n" + SMALL)))
    assert grid.slurm == {"nodes": 2, "partition": "gpu",
                          "args": {"qos": "high", "cpus_per_task": "10", "exclusive": True}}

    class Flags:
        nodes = gpus_per_node = partition = account = None
        time = 30
        slurm_arg = ["qos=low", "mem=64G", "requeue"]

    res = slurm.resources(grid.slurm, Flags)
    assert res == {"nodes": 2, "gpus_per_node": 1, "time": 30, "partition": "gpu",
                   "args": {"qos": "low", "cpus_per_task": "10", "exclusive": True,
                            "mem": "64G", "requeue": True}}
    params = slurm.sbatch_parameters({**res, "gpus_per_node": 0}, "n", parallel=2)
    assert "gpus_per_node" not in params and params["ntasks_per_node"] == 1
    assert slurm.executor_parameters(params)["timeout_min"] == 30
    assert slurm.executor_parameters(params)["slurm_partition"] == "gpu"


@pytest.mark.parametrize("body, message", [
    ("slurm: {gpus: 8}\n", "slurm: unknown key(s) ['gpus']"),
    ("slurm: {nodes: 0}\n", "slurm.nodes must be an integer from 1 to 100000, got 0"),
    ("slurm: {nodes: 100000000000000000000000}\n", "slurm.nodes must be an integer from 1 to "
     "100000, got 100000000000000000000000"),
    ("slurm: {time: 525601}\n", "slurm.time must be an integer from 1 to 525600, got 525601"),
    ("slurm: {time: '1:00:00'}\n", "slurm.time must be an integer from 1 to 525600, got "
     "'1:00:00'"),
    ("slurm: {partition: ''}\n", "slurm.partition must be a non-empty string"),
    ("slurm: {gpus_per_node: true}\n", "slurm.gpus_per_node must be an integer from 0 to 256"),
    ("slurm: {gpus_per_node: 257}\n", "slurm.gpus_per_node must be an integer from 0 to 256"),
    ("slurm: {args: {nodes: 2}}\n", "slurm.args.nodes: set it as slurm.nodes or --nodes"),
    ("slurm: {args: {part: gpu}}\n", "slurm.args.part: set it as slurm.partition or "
     "--partition"),  # sbatch reads an unambiguous abbreviation as the option
    # the keys --slurm-arg refuses
    ("slurm: {args: {1: x}}\n", "slurm.args.1: not an sbatch option name"),
    ("slurm: {args: {'mem per': 4G}}\n", "slurm.args.mem per: not an sbatch option name"),
    # the options the study sets
    ("slurm: {args: {array: 0-9999}}\n", "slurm.args.array: the study sets --array itself"),
    ("slurm: {args: {arr: 0-9999}}\n", "slurm.args.arr: the study sets --array itself"),
    ("slurm: {args: {job-name: x}}\n", "slurm.args.job-name: the study sets --job-name itself"),
    ("slurm: {args: {output: /x}}\n", "slurm.args.output: the study sets --output itself"),
    ("slurm: {args: {error: /x}}\n", "slurm.args.error: the study sets --error itself"),
    ("slurm: {args: {signal: 'USR1@1'}}\n", "slurm.args.signal: the study sets --signal itself"),
    ("slurm: {args: {open_mode: truncate}}\n", "slurm.args.open_mode: the study sets "
     "--open-mode itself"),
    ("slurm: {args: {ntasks-per-node: 1}}\n", "slurm.args.ntasks-per-node: the study sets "
     "--ntasks-per-node itself"),
    ("slurm: {args: {exclusive: false}}\n", "slurm.args.exclusive must be a number, a non-"),
    ("slurm: [1]\n", "slurm must be a mapping"),
])
def test_bad_slurm_mappings_are_refused(tmp_path, body, message):
    path = write_grid(tmp_path, body + SMALL)
    with pytest.raises(StudyError) as e:
        study.load_grid(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_sbatch_options_named_like_the_studys_own_are_kept():
    """``gpus`` and ``ntasks`` are sbatch options of their own, not abbreviations."""
    flags = argparse.Namespace(nodes=None, gpus_per_node=None, partition=None, time=None,
                               account=None, slurm_arg=["gpus=4", "ntasks=8", "mem-per-gpu=8G"])
    assert slurm.resources({}, flags)["args"] == {"gpus": "4", "ntasks": "8",
                                                  "mem_per_gpu": "8G"}


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "2"], "--nodes: only with --slurm"),
    (["--collect", "--partition", "p"], "--collect, --partition: only with --slurm"),
    (["--slurm", "--time", "0"], "--time must be from 1 to 525600, got 0"),
    (["--slurm", "--nodes", str(10**23)], f"--nodes must be from 1 to 100000, got {10**23}"),
    (["--slurm", "--slurm-arg", "gpus-per-node=2"], "--slurm-arg 'gpus-per-node=2': set it as "
     "slurm.gpus_per_node or --gpus-per-node"),
    (["--slurm", "--slurm-arg", "array=0-9999"], "--slurm-arg 'array=0-9999': the study sets "
     "--array itself"),
    (["--slurm", "--slurm-arg", "mem per=4G"], "--slurm-arg 'mem per=4G': not an sbatch option "
     "name (a letter, then letters, digits, - or _)"),
    (["--slurm", "--slurm-arg", "=x"], "--slurm-arg '=x': expected KEY=VALUE (or KEY alone "
     "for an sbatch option without a value)"),
    (["--slurm", "--collect", "--dry-run"], "--collect and --dry-run: choose one"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    path = write_grid(tmp_path, SMALL)
    line = refused(capsys, ["study", "--grid", path, "--out", tmp_path / "out", *flags],
                   keep=[tmp_path])
    assert line == f"feataug study: error: {message}"


def test_without_submitit_slurm_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    path = write_grid(tmp_path, SMALL)
    line = refused(capsys, ["study", "--grid", path, "--slurm", "--dry-run"], keep=[tmp_path],
                   out="")
    assert line == "feataug study: error: --slurm needs submitit: pip install 'feataug[cluster]'"


def test_without_slurm_the_submission_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                             monkeypatch):
    pytest.importorskip("submitit")
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "srun"
                        else which(cmd, *a, **k))
    path = write_grid(tmp_path, SMALL)
    line = refused(capsys, ["study", "--grid", path, "--seeds", "1", "--out", tmp_path / "out",
                            "--slurm"], keep=[tmp_path])
    assert line.startswith("feataug study: error: --slurm: Could not detect \"srun\"")
    assert line.endswith("(--dry-run shows what would be submitted)")


# ----------------------------------------------------------------------------- sbatch script
def _yaml_string(text: str) -> str:
    return json.dumps(text)  # a YAML double-quoted string: "\n" is a newline


@pytest.mark.parametrize("slurm_map, flags, where", [
    ("{args: {comment: %s}}", [], "{path}: slurm.args.comment"),
    ("{args: {%s: x}}", [], "{path}: slurm.args[%r]"),
    ("{partition: %s}", [], "{path}: slurm.partition"),
    ("{account: %s}", [], "{path}: slurm.account"),
    (None, ["--slurm-arg", "comment=%s"], "--slurm-arg %r"),
    (None, ["--slurm-arg", "%s"], "--slurm-arg %r"),
    (None, ["--partition", "%s"], "--partition"),
    (None, ["--account", "%s"], "--account"),
])
@pytest.mark.parametrize("control", ["\n", "\r", "\t", "\x7f"])
def test_a_control_character_never_reaches_the_sbatch_script(tmp_path, capsys, slurm_map,
                                                              flags, where, control):
    """A newline in a string the sbatch script holds would end its ``#SBATCH`` line and run
    the rest: refused, from the grid or a flag, in one line naming the key."""
    pytest.importorskip("submitit")
    marker = tmp_path / "PWNED"
    payload = f"x{control}touch {marker} #"
    body = f"slurm: {slurm_map % _yaml_string(payload)}\n" if slurm_map else ""
    path = write_grid(tmp_path, body + SMALL)
    flags = [f.replace("%s", payload) for f in flags]
    line = refused(capsys, ["study", "--grid", path, "--out", tmp_path / "out", "--slurm",
                            "--dry-run", *flags], keep=[tmp_path])
    shown = where.format(path=path).replace("%r", repr(flags[-1] if flags else payload))
    assert line == f"feataug study: error: {shown}: contains a control character"
    assert not marker.exists()


def test_the_job_name_and_the_log_folder_are_checked_too(tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_grid(tmp_path, SMALL, "a\nb.yaml")
    line = refused(capsys, ["study", "--grid", path, "--out", tmp_path / "out", "--slurm",
                            "--dry-run"], keep=[tmp_path])
    assert line.endswith(": the job name: contains a control character")
    out = tmp_path / "o\nut"
    line = refused(capsys, ["study", "--grid", write_grid(tmp_path, SMALL), "--out", out,
                            "--slurm", "--dry-run"], keep=[tmp_path])
    assert line == f"feataug study: error: --out {str(out)!r}: contains a control character"


def test_shell_text_in_a_slurm_string_stays_inside_its_sbatch_line(tmp_path, capsys):
    """Without a control character a hostile value is one quoted ``#SBATCH`` line: the script
    runs nothing but submitit's command."""
    pytest.importorskip("submitit")
    marker = tmp_path / "PWNED"
    payload = f"x'; touch {marker} # $(touch {marker}) `touch {marker}`"
    path = write_grid(tmp_path, f"slurm: {{args: {{comment: {_yaml_string(payload)}}}}}\n"
                      + SMALL)
    assert cli_main(["study", "--grid", str(path), "--out", str(tmp_path / "out"), "--slurm",
                     "--dry-run", "--slurm-arg", f"mail-user={payload}"]) == 0
    script = capsys.readouterr().out.split("the sbatch script:\n", 1)[1].split(
        "\njobs (array task", 1)[0]
    commands = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2 and commands[0] == "export SUBMITIT_EXECUTOR=slurm"
    assert commands[1].startswith("srun ") and "touch" not in commands[1]
    sbatch = [shlex.split(line) for line in script.splitlines() if line.startswith("#SBATCH")]
    assert ["#SBATCH", f"--comment={payload}"] in sbatch
    assert ["#SBATCH", f"--mail-user={payload}"] in sbatch


def test_dry_run_prints_the_sbatch_script_and_the_jobs(tmp_path, capsys, monkeypatch):
    """The script submitit would write for the array, against tests/data/study_slurm.sbatch
    (the output folder and the Python executable as placeholders); nothing is written."""
    pytest.importorskip("submitit")
    path = write_grid(tmp_path, "slurm: {partition: gpu, time: 30, account: lab, "
                      "args: {qos: high}}\n" + GRID)
    out = tmp_path / "out"
    assert cli_main(["study", "--grid", str(path), "--out", str(out), "--seeds", "2",
                     "--slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8",
                     "--slurm-arg", "mem=64G", "--slurm-arg", "exclusive", "--jobs", "4"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "0 finished, 0 in the queue, 0 failed, 22 not run" in printed
    script = printed.split("the sbatch script:\n", 1)[1].split("\njobs (array task", 1)[0]
    normal = script.replace(str(out.absolute()), "<OUT>").replace(shlex.quote(sys.executable),
                                                                   "<PYTHON>")
    assert normal + "\n" == EXPECTED_SBATCH.read_text()
    jobs = printed.split("jobs (array task, job, folder):\n", 1)[1].splitlines()
    assert len(jobs) == 22 and jobs[0].split() == ["0", "random-init", "seed0",
                                                   str(out / "runs" / "random-init" / "seed0")]
    assert jobs[-1].split()[:3] == ["21", "simsiam.fa.op=noise", "seed1"]

    # what submitit's SlurmExecutor writes for that array, given the same parameters through
    # AutoExecutor (as `submit` does; `srun` faked so that the executor can be made here)
    import submitit

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: "/bin/srun" if cmd == "srun"
                        else which(cmd, *a, **k))
    flags = argparse.Namespace(nodes=2, gpus_per_node=8, partition=None, time=None,
                               account=None, slurm_arg=["mem=64G", "exclusive"])
    params = slurm.sbatch_parameters(slurm.resources(study.load_grid(path).slurm, flags),
                                     "feataug-study-grid", 4)
    executor = submitit.AutoExecutor(folder=out.absolute() / "slurm" / "%j", cluster="slurm")
    executor.update_parameters(**slurm.executor_parameters(params))
    inner = executor._executor
    inner.parameters["map_count"] = 22
    text = inner._make_submission_file_text(inner._submitit_command_str, "uid")
    assert text == script + "\n"


# ----------------------------------------------------------------------------- states, rerun
def _fail(job):
    raise RuntimeError("simulated crash")


def test_a_rerun_skips_finished_and_queued_jobs_and_resubmits_the_rest(tmp_path, capsys,
                                                                        monkeypatch):
    """Four jobs: finished, in the queue (sacct says RUNNING), failed (error.txt), never
    submitted. A rerun submits the last two; --collect reports what has finished."""
    grid = study.load_grid(write_grid(tmp_path, SMALL))
    out = tmp_path / "out"
    jobs = study.make_jobs(grid, out, [0])
    done, queued, failed, _ = jobs
    study.execute(done, lambda j: fake_metrics(j.run.name, j.seed))
    assert study.execute(failed, _fail)["status"] == "failed"
    (out / "slurm").mkdir()
    (out / "slurm" / "submitted.json").write_text(json.dumps({
        str(Path(j.output_dir).relative_to(out)): {"id": f"7_{i}", "cluster": "slurm"}
        for i, j in enumerate(jobs[1:3], 1)}))
    monkeypatch.setattr(slurm, "_in_queue", lambda ids: {"7_1"} & ids)
    sent: list = []

    class Sub:
        def __init__(self, i):
            self.job_id = f"8_{i}"

    monkeypatch.setattr(slurm, "make_executor", lambda params, out: None)
    monkeypatch.setattr(slurm, "submit", lambda todo, *a, **k: sent.extend(todo) or
                        [Sub(i) for i in range(len(todo))])
    argv = ["study", "--grid", str(write_grid(tmp_path, SMALL)), "--seeds", "1", "--out",
            str(out), "--slurm", "--no-plots"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert sent == [failed, jobs[3]]
    assert "1 finished, 1 in the queue, 1 failed, 1 not run" in printed
    assert f"  8_0            {failed.label}" in printed
    assert f"  7_1            {queued.label} (in the queue already)" in printed
    sent.clear()
    assert cli_main([*argv, "--collect"]) == 1
    captured = capsys.readouterr()
    assert sent == [] and captured.err.strip() == (
        "feataug study: error: 1 job(s) failed (see results.md and each job's error.txt); 2 "
        "job(s) have not finished; rerun without --collect to resubmit the failed and missing "
        "ones")
    table = (out / "results.md").read_text()
    assert f"| {done.run.name} |" in table
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "RuntimeError: simulated crash" in rows[2]


def test_the_task_requeues_itself(tmp_path):
    pytest.importorskip("submitit")
    grid = study.load_grid(write_grid(tmp_path, SMALL))
    job = study.make_jobs(grid, tmp_path / "out", [0])[0]
    task = slurm.StudyTask()
    again = task.checkpoint(job, "abc")
    assert again.function is task and again.args == (job, "abc")


# ----------------------------------------------------------------------------- end to end
def test_two_tiny_jobs_through_submitits_local_executor(tmp_path, capsys, monkeypatch):
    """Submit (the command returns), the tasks run as local processes; collect writes the
    reports; a rerun submits nothing."""
    pytest.importorskip("submitit")
    data = _idx_data(tmp_path / "data")
    images = data / "train-images-idx3-ubyte.gz"
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
base: {TINY}
random_init: true
overrides: {{DATA.ROOT: {data}, DATA.FORMAT: idx, DATA.IMAGE_SIZE: 32, SOLVER.BATCH_SIZE: 8,
             SOLVER.EPOCHS: 0, SOLVER.MAX_ITER: 2, MODEL.MOCO.K: 16, MODEL.PROJ_HIDDEN_DIM: 32,
             MODEL.PROJ_DIM: 16, DATALOADER.NUM_WORKERS: 0, TENSORBOARD: false, DEVICE: cpu}}
eval: {{train: {images}, val: {images}, format: idx, max_train: 24, val_per_class: 2,
        knn_k: 5, batch_size: 16, linear: false}}
slurm: {{gpus_per_node: 0, time: 10}}
blocks:
  - name: moco
    variants:
      fa: {{FA.ENABLED: true, FA.OP: extrapolate}}
""")
    monkeypatch.setattr(slurm, "CLUSTER", "local")
    submitted: list = []
    real = slurm.submit
    monkeypatch.setattr(slurm, "submit", lambda *a, **k: submitted.extend(real(*a, **k))
                        or submitted)
    out = tmp_path / "out"
    argv = ["study", "--grid", str(path), "--seeds", "1", "--out", str(out), "--slurm",
            "--no-plots"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert len(submitted) == 2 and f"submitit's logs: {out / 'slurm'}/<job id>/" in printed
    records = [job.result() for job in submitted]
    assert [r["status"] for r in records] == ["ok", "ok"], records
    for run in ("random-init", "moco.fa"):
        assert json.loads((out / "runs" / run / "seed0" / "result.json").read_text())[
            "status"] == "ok"
    ids = json.loads((out / "slurm" / "submitted.json").read_text())
    assert sorted(ids) == ["runs/moco.fa/seed0", "runs/random-init/seed0"]

    assert cli_main([*argv, "--collect"]) == 0
    assert "| moco.fa |" in (out / "results.md").read_text()
    capsys.readouterr()
    submitted.clear()
    assert cli_main(argv) == 0  # all finished: nothing submitted, the reports written again
    printed = capsys.readouterr().out
    assert submitted == [] and "2 finished, 0 in the queue, 0 failed, 0 not run" in printed
    assert f"wrote {out / 'results.csv'}, {out / 'results.md'}" in printed
