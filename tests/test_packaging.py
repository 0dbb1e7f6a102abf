"""FeatAug installed from a wheel: the config files ship as package data of ``feataug``
(``feataug/configs``, a link to ``configs/`` in a checkout) and are found through it, or through
``$FEATAUG_CONFIGS``, from any working folder.

Truths: the files under the checkout's ``configs/``; the names inside the wheel pip builds; the
path ``feataug`` is imported from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_study import GRID

import feataug
from feataug import configs_dir, demo, find_config
from feataug.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "tiny_moco_fa_r18.yaml"
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "feataug", "pretrain", "transfer",
           "configs")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEATAUG_CONFIGS")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_the_wheel_ships_the_configs_and_runs_from_another_folder(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--no-cache-dir", str(src), "-w", str(tmp_path / "wheels")]
    build = subprocess.run(pip, capture_output=True, text=True, timeout=300, env=_env())
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("feataug-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {n for n in names if n.startswith("feataug/configs/")}
        zf.extractall(tmp_path / "site")
    configs = {f"feataug/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
               for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and shipped == configs
    assert not any(n.startswith("configs/") for n in names)

    # from another folder, with only the wheel's files on the path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(PYTHONPATH=str(tmp_path / "site"))
    probe = subprocess.run(
        [sys.executable, "-c", "import feataug; print(feataug.__file__); "
         "print(feataug.find_config('configs/study/cpu.yaml'))"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    site = (tmp_path / "site" / "feataug").resolve()
    imported, grid = (Path(line).resolve() for line in probe.stdout.split())
    assert imported == site / "__init__.py" and grid == site / "configs" / "study" / "cpu.yaml"
    dry = subprocess.run([sys.executable, "-m", "feataug", "study", "--grid",
                          "configs/study/cpu.yaml", "--dry-run", "--out", str(tmp_path / "o")],
                         cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert re.match(r"\d+ runs x \d+ seeds", dry.stdout) and "total " in dry.stdout


@pytest.mark.usefixtures("one_thread")
def test_FEATAUG_CONFIGS_is_where_configs_are_looked_up(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    (mine / "pretrain").mkdir(parents=True)
    (mine / "study").mkdir()
    shutil.copy(TINY, mine / "pretrain" / TINY.name)
    # a grid's base is relative to the grid, in the folder it is found in
    (mine / "study" / "g.yaml").write_text(f"base: ../pretrain/{TINY.name}\n"
                                           "eval: {train: /nowhere/train, val: /nowhere/val}\n"
                                           + GRID)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("FEATAUG_CONFIGS", str(mine))
    assert configs_dir() == mine
    assert find_config("configs/study/g.yaml") == find_config("study/g.yaml") == \
        mine / "study" / "g.yaml"
    assert find_config("configs/study/cpu.yaml") == Path("configs/study/cpu.yaml")  # not there
    assert demo._config_path(demo.TREES_PRETRAIN_CONFIG) == mine / "pretrain" / TINY.name
    with pytest.raises(demo.DemoError, match="FEATAUG_CONFIGS"):
        demo._config_path(demo.SCENES_CONFIG)
    assert cli_main(["study", "--grid", "configs/study/g.yaml", "--dry-run", "--out",
                     str(tmp_path / "o")]) == 0
    assert "11 runs x 2 seeds" in capsys.readouterr().out
    # every --config-file is looked up the same way: the error names the file found
    (mine / "pretrain" / "bad.yaml").write_text("NO_SUCH_KEY: 1\n")
    for command in (["pretrain"], ["detect"], ["lincls", "--random-init"]):
        assert cli_main([*command, "--config-file", "configs/pretrain/bad.yaml"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(mine / "pretrain" / "bad.yaml") in err, err

    (elsewhere / "configs" / "study").mkdir(parents=True)  # a file in the working folder wins
    (elsewhere / "configs" / "study" / "g.yaml").write_text("x: 1\n")
    assert find_config("configs/study/g.yaml") == Path("configs/study/g.yaml")

    monkeypatch.delenv("FEATAUG_CONFIGS")  # the package's own copy: the checkout's configs/
    assert configs_dir() == (ROOT / "configs").resolve()
    assert (Path(feataug.__file__).parent / "configs").resolve() == configs_dir()
    assert find_config("configs/study/cpu.yaml") == configs_dir() / "study" / "cpu.yaml"
