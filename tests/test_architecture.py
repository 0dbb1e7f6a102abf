"""The shape of the code base: imports point one way, tools are thin, modules and functions stay
small, FA's code does not branch on an operator's name, transfer/ keeps off Detectron2's
private parts.

Layers, bottom to top: ``pretrain`` (library) <- ``transfer`` (library) <- ``feataug`` (the
application) <- ``tools`` (scripts). A layer imports only from the layers below it. Truth: the
source files themselves, read with ``ast``. Every checker is first shown a bad example (a file in
``tmp_path`` or a string), so a rule that passes is known to be able to fail.
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
MAX_LINES = 450  # per module
MAX_FUNCTION_LINES = 80  # def line through last body line, decorators not counted
# The FA operators' names as FA.OP spells them (configs/pretrain, the README), written out
# independently of pretrain.fa's registry.
FA_OPS = frozenset({"identity", "noise", "dropout", "extrapolate", "interpolate", "generator",
                    "hardmix"})
# Private Detectron2 / fvcore attributes a getattr("...") could reach without an ``x._name``.
D2_PRIVATE = frozenset({"_parsed_url_during_load", "_last_eval_results", "_trainer",
                        "_load_model", "_load_file"})


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _imported(path: Path, own_package: str) -> set[str]:
    """Top-level package names ``path`` imports; relative imports resolve to ``own_package``."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(own_package if node.level else (node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS[:3])
def test_imports_point_down_the_layers(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    wrong = {_rel(p): sorted(_imported(p, layer) & above) for p in _modules(layer)}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "wrong_import.py"
    bad.write_text("from feataug.data import default_root\nfrom . import build\nimport os.path\n")
    assert _imported(bad, "pretrain") == {"feataug", "pretrain", "os"}


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


# ----------------------------------------------------------------------------- size
def _long_modules(paths: list[Path]) -> dict[str, int]:
    """``path`` -> its line count, for each of ``paths`` over ``MAX_LINES``."""
    counts = {str(p): len(p.read_text().splitlines()) for p in paths}
    return {p: n for p, n in counts.items() if n > MAX_LINES}


def test_the_size_checker_sees_a_long_module(tmp_path):
    long, fits = tmp_path / "long.py", tmp_path / "fits.py"
    long.write_text("x = 1\n" * (MAX_LINES + 1))
    fits.write_text("x = 1\n" * MAX_LINES)
    assert _long_modules([long, fits]) == {str(long): MAX_LINES + 1}


def test_no_module_is_over_450_lines():
    long = _long_modules([p for layer in LAYERS[:3] for p in _modules(layer)])
    assert {_rel(Path(p)): n for p, n in long.items()} == {}


def _function_lengths(tree: ast.AST) -> dict[str, int]:
    """``Class.method`` / ``outer.inner`` -> lines from its ``def`` line through its last body
    line (decorators not counted), for every function and method in ``tree``."""
    out = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[prefix + child.name] = child.end_lineno - child.lineno + 1
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def test_the_function_checker_counts_def_to_last_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    src = f"@decorator\ndef long():\n{body}\nclass A:\n    async def short(self):\n        pass\n"
    assert _function_lengths(ast.parse(src)) == {"long": MAX_FUNCTION_LINES + 1, "A.short": 2}


def test_no_function_is_over_80_lines():
    long = {f"{_rel(p)}:{name}": n for layer in LAYERS[:3] for p in _modules(layer)
            for name, n in _function_lengths(ast.parse(p.read_text())).items()
            if n > MAX_FUNCTION_LINES}
    assert long == {}


# ----------------------------------------------------------------------------- FA operators
def _fa_sources() -> list[Path]:
    return _modules("pretrain/fa")


def _identifier(node: ast.AST) -> str | None:
    """The name a variable, argument, keyword or attribute node spells, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, (ast.arg, ast.keyword)):
        return node.arg
    return node.attr if isinstance(node, ast.Attribute) else None


def _names_an_op(node: ast.AST, ops: frozenset[str]) -> bool:
    """A string constant in ``ops``, or a tuple / list / set holding one."""
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(e, ast.Constant) and e.value in ops for e in elts)


def _op_name_branches(tree: ast.AST, ops: frozenset[str] = FA_OPS) -> list[str]:
    """Where code singles out an FA operator by name: an ``op_name`` identifier (variable,
    argument, attribute, keyword), or a comparison or ``case`` with a string naming one of
    ``ops``."""
    found = []
    for node in ast.walk(tree):
        if _identifier(node) == "op_name":
            found.append((node.lineno, "op_name"))
        elif isinstance(node, ast.Compare) and any(_names_an_op(side, ops) for side in
                                                   [node.left, *node.comparators]):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.MatchValue) and _names_an_op(node.value, ops):
            found.append((node.lineno, f"case {ast.unparse(node.value)}"))
    return [f"line {n}: {what}" for n, what in sorted(found)]


def test_the_op_name_checker_sees_a_branch_on_an_operator():
    bad = ast.parse(
        "def mix(self, z, op_name):\n"
        "    if self.op == 'hardmix':\n        return z\n"
        "    if 'noise' != kind or kind in ('dropout', 'x'):\n        pass\n"
        "    match self.kind:\n        case 'generator':\n            pass\n"
        "    f(op_name=1)\n")
    assert [f.split(":")[0] for f in _op_name_branches(bad)] == [
        "line 1", "line 2", "line 4", "line 4", "line 7", "line 9"]
    assert _op_name_branches(ast.parse("if self.mode == 'replace' and x.name == 'fa':\n  pass")) == []


def test_fa_code_does_not_branch_on_an_operators_name():
    from pretrain.fa import FA_REGISTRY

    ops = FA_OPS | {name for name, _ in FA_REGISTRY}  # and any operator registered since
    sources = _fa_sources()
    assert sources
    found = {_rel(p): b for p in sources
             if (b := _op_name_branches(ast.parse(p.read_text()), ops))}
    assert found == {}


# ----------------------------------------------------------------------------- Detectron2 privates
def _own_modules(tree: ast.AST, package_dir: Path) -> set[str]:
    """Names ``tree`` binds to a module of our own (``import pretrain.x as y``, ``from transfer
    import datasets``, ``from . import schedule``), read from the files there."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            own |= {(a.asname or a.name).split(".")[0] for a in node.names
                    if a.name.split(".")[0] in LAYERS[:3]}
        elif isinstance(node, ast.ImportFrom):
            anchor = package_dir.parents[node.level - 2] if node.level > 1 else package_dir
            base = (anchor if node.level else ROOT).joinpath(*(node.module or "").split("."))
            if node.level or (node.module or "").split(".")[0] in LAYERS[:3]:
                own |= {a.asname or a.name for a in node.names
                        if (base / f"{a.name}.py").is_file() or (base / a.name).is_dir()}
    return own


def _private_uses(tree: ast.AST, own: set[str] = frozenset()) -> list[str]:
    """``x._name`` where ``x`` is not ``self``, ``cls``, ``super()`` or a module of ours
    (``own``), and string literals naming a known private Detectron2 attribute."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and (v.id in ("self", "cls") or v.id in own):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and node.value in D2_PRIVATE:
            found.append((node.lineno, repr(node.value)))
    return [f"line {n}: {what}" for n, what in sorted(found)]


def test_the_private_checker_sees_a_private_attribute(tmp_path):
    src = ("from . import schedule\nimport transfer.datasets as ds\nfrom .. import up, Nope\n"
           "def f(self, checkpointer, trainer):\n"
           "    self._x = super()._y + cls._z + schedule._w + ds._v + up._u + a.__class__\n"
           "    url = checkpointer._parsed_url_during_load + Nope._n\n"
           "    return getattr(trainer, '_last_eval_results', None)\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "schedule.py").write_text("")
    (tmp_path / "up.py").write_text("")
    tree = ast.parse(src)
    own = _own_modules(tree, tmp_path / "pkg")
    assert own == {"schedule", "ds", "up"}  # Nope is no file: not a module
    assert _private_uses(tree, own) == ["line 6: Nope._n",
                                        "line 6: checkpointer._parsed_url_during_load",
                                        "line 7: '_last_eval_results'"]


def test_transfer_keeps_off_private_attributes():
    found = {}
    for path in _modules("transfer"):
        tree = ast.parse(path.read_text())
        if uses := _private_uses(tree, _own_modules(tree, path.parent)):
            found[_rel(path)] = uses
    assert found == {}
