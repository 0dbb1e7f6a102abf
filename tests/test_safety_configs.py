"""Config files of both halves are plain YAML: nothing in them is constructed or run, and every
fault is one line naming the file.

Truth: a marker file that a ``!!python/object/apply`` tag (in the file or in its ``_BASE_``) would
create never appears, and the command exits 2 with one ``feataug COMMAND: error:`` line.
``feataug pretrain`` reads its configs with fvcore's loader, ``feataug detect`` with Detectron2's,
which would fall back to ``yaml.unsafe_load`` by default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import refused

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = ["pretrain", pytest.param("detect", marks=pytest.mark.detectron2)]


def _refused(command: str, config: Path, capsys, keep) -> str:
    """``feataug COMMAND --config-file CONFIG`` refused (conftest.refused), naming the config."""
    if command == "detect":
        pytest.importorskip("detectron2")
    line = refused(capsys, [command, "--config-file", config], keep=keep)
    assert line.startswith(f"feataug {command}: error: {config}: "), line
    return line


def _payload(marker: Path) -> str:
    return f'SEED: !!python/object/apply:os.system ["touch {marker}"]\n'


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("in_base", [False, True])
def test_a_python_tag_is_refused_not_run(command, in_base, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.yaml"
    evil.write_text(_payload(marker))
    config = evil
    if in_base:
        config = tmp_path / "child.yaml"
        config.write_text("_BASE_: evil.yaml\n")
    line = _refused(command, config, capsys, keep=[tmp_path])
    assert "YAML tag refused at line 1" in line and "python/object/apply" in line
    assert ("of " + str(evil)) in line if in_base else " of " not in line
    assert not marker.exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "name, text, message",
    [
        ("cfg.py", "open('ran', 'w')\n", "a config is a .yaml file (got .py)"),
        ("list.yaml", "- SEED: 1\n", "must map KEY: value at the top level (it is a list)"),
        ("empty.yaml", "", "must map KEY: value at the top level (it is empty)"),
        ("loop.yaml", "_BASE_: loop.yaml\n", "its _BASE_ files include each other in a loop"),
        ("orphan.yaml", "_BASE_: gone.yaml\n", "gone.yaml: No such file or directory"),
        ("syntax.yaml", "SEED: [1\n", "invalid YAML"),
        ("unknown.yaml", "NOT_A_KEY: 1\n", "NOT_A_KEY"),
    ],
)
def test_a_bad_config_file_is_one_line(command, name, text, message, tmp_path, capsys,
                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # a .py config that ran would write ./ran
    config = tmp_path / name
    config.write_text(text)
    assert message in _refused(command, config, capsys, keep=[tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("base, text, message", [
    ("base.txt", "SEED: 3\n", "_BASE_ {dir}/base.txt: a config is a .yaml file (got .txt)"),
    ("/etc/passwd", None, "_BASE_ /etc/passwd: a config is a .yaml file (got no suffix)"),
    ("mid.yaml", "_BASE_: base.txt\n",
     "_BASE_ {dir}/base.txt of {dir}/mid.yaml: a config is a .yaml file (got .txt)"),
    ("plain.yaml", "just a string\n",
     "_BASE_ {dir}/plain.yaml: the file must map KEY: value at the top level (it is a str)"),
    ("[a.yaml]", None, "_BASE_ must be a file name, got ['a.yaml']"),
], ids=["txt", "/etc/passwd", "txt of a base", "string", "a list"])  # fmt: skip
def test_base_files_follow_the_same_rules(command, base, text, message, tmp_path, capsys):
    """A _BASE_ is read only as a .yaml/.yml file of KEY: value; a fault names the config, the
    base (and the base that included it)."""
    if command == "detect":
        pytest.importorskip("detectron2")
    if text is not None:
        (tmp_path / base).write_text(text)
        (tmp_path / "base.txt").write_text("SEED: 3\n")  # what mid.yaml includes
    config = tmp_path / "child.yaml"
    config.write_text(f"_BASE_: {base}\n")
    line = refused(capsys, [command, "--config-file", config], keep=[tmp_path])
    assert line == f"feataug {command}: error: {config}: " + message.format(dir=tmp_path)
