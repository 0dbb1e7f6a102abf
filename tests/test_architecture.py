"""The shape of the code base: imports point one way, tools are thin, modules stay small.

Layers, bottom to top: ``pretrain`` (library) <- ``transfer`` (library) <- ``feataug`` (the
application) <- ``tools`` (scripts). A layer imports only from the layers below it. Truth: the
import statements themselves, read with ``ast`` from the source files.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pretrain", "transfer", "feataug", "tools")
MAX_LINES = 400


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Top-level package names ``path`` imports (relative imports resolve to its own package)."""
    tree = ast.parse(path.read_text(), str(path))
    own = path.relative_to(ROOT).parts[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(own if node.level else (node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS[:3])
def test_imports_point_down_the_layers(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    wrong = {str(p.relative_to(ROOT)): sorted(_imported(p) & above) for p in _modules(layer)}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = ROOT / "pretrain" / "_probe_wrong_import.py"
    bad.write_text("from feataug.data import default_root\nfrom . import build\n")
    try:
        assert _imported(bad) == {"feataug", "pretrain"}
    finally:
        bad.unlink()


def _edits_sys_path(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        target = None
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t for t in targets if "sys.path" in ast.unparse(t)), None)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node if ast.unparse(node.func.value) == "sys.path" else None
        if target is not None:
            return True
    return False


def test_tools_are_thin_and_leave_sys_path_alone():
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')"))
    assert _edits_sys_path(ast.parse("import sys\nsys.path[:] = []"))
    scripts = _modules("tools")
    assert scripts
    for path in scripts:
        assert not _edits_sys_path(ast.parse(path.read_text())), path
        assert path.stem not in {"pretrain", "transfer", "feataug"}, f"{path} shadows a package"


@pytest.mark.parametrize("script", ["pretrain_net.py", "lincls.py", "convert.py"])
def test_tool_scripts_run_from_anywhere(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout


def test_long_modules_say_what_their_one_concern_is():
    long = {}
    for layer in LAYERS[:3]:
        for path in _modules(layer):
            lines = path.read_text().count("\n")
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if lines > MAX_LINES and "One concern:" not in doc:
                long[str(path.relative_to(ROOT))] = lines
    assert long == {}
