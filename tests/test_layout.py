"""Package structure: no import cycle between subpackages, and the shapes world reached only by the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ddstrans"


def _unit(module: str) -> str:
    """The unit a module belongs to: its subpackage (``ddstrans.shapes``) or itself (``ddstrans.module``)."""
    return ".".join(module.split(".")[:2])


def _is_module(name: str) -> bool:
    path = PKG.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def _imports() -> dict[str, set[str]]:
    """Module name -> the ddstrans modules it imports (at any depth of the file, lazy imports included)."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ddstrans")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this package
                    base = name.split(".")[: len(name.split(".")) - node.level + (rel.name == "__init__")]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod.startswith("ddstrans"):
                    found.add(mod)
                    found |= {f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")}
        out[name] = found
    return out


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for mod, deps in _imports().items():
        u = _unit(mod)
        graph.setdefault(u, set()).update(_unit(d) for d in deps if _unit(d) != u and _unit(d) != "ddstrans")
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, u, v]))
            if not state.get(v):
                visit(v, [*path, u])
        state[u] = 2

    for u in sorted(graph):
        if not state.get(u):
            visit(u, [])


def test_only_the_cli_imports_the_shapes_world():
    outside = {mod: sorted(d for d in deps if d == "ddstrans.shapes" or d.startswith("ddstrans.shapes."))
               for mod, deps in _imports().items()
               if not (mod == "ddstrans.shapes" or mod.startswith(("ddstrans.shapes.", "ddstrans.cli")))}
    assert {m: d for m, d in outside.items() if d} == {}


def test_the_layout_test_sees_imports():
    imports = _imports()
    assert "ddstrans.shapes.evaluation" in imports["ddstrans.shapes.callback"]
    assert "ddstrans.guidance" in imports["ddstrans.module"]


MAX_MODULE_LINES = 450
# Modules allowed to be longer, each with the reason it cannot be split along a concern.
LONG_MODULES: dict[str, str] = {}


def test_no_module_is_over_the_line_limit():
    """One concern per module: a module over the limit is split (or listed above with its reason)."""
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert {k: v for k, v in long.items() if k not in LONG_MODULES} == {}
    assert set(LONG_MODULES) <= set(long), "an allowed module is no longer long: drop it from LONG_MODULES"


def _patches_sys_path(tree: ast.AST) -> bool:
    """A call such as ``sys.path.insert(...)`` / ``sys.path.append(...)`` anywhere in the file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Attribute) and owner.attr == "path" and isinstance(owner.value, ast.Name) \
                    and owner.value.id == "sys":
                return True
    return False


def test_no_script_patches_sys_path():
    # scripts import the installed package; a path patch would hide a broken install behind the checkout
    scripts = PKG.parent / "scripts"
    offenders = [str(p.relative_to(scripts)) for p in sorted(scripts.rglob("*.py"))
                 if _patches_sys_path(ast.parse(p.read_text()))]
    assert offenders == []
    assert _patches_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')\n"))
