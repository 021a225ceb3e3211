"""The package's architecture, checked from its source: imports run one way, privates stay private, files stay small.

Each import of a `cdam_pl` module is read with `ast` (nothing is imported), so the checks hold for every module,
including ones no other test loads.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "cdam_pl"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def part(module: str) -> str:
    """The architectural part a module belongs to: its subpackage (cdam_pl.data) or itself (cdam_pl.config)."""
    return ".".join(module.split(".")[:2])


def imports(module: str) -> list[tuple[str, list[str], int, bool]]:
    """(imported cdam_pl module, names taken from it, line, at module level) for every import of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno, id(node) in top) for a in node.names if a.name.startswith("cdam_pl")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cdam_pl"):
            names = [a.name for a in node.names]
            # `from cdam_pl.features import extract` imports the module cdam_pl.features.extract
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            if submodules:
                out += [(m, [], node.lineno, id(node) in top) for m in submodules]
            else:
                out.append((node.module, names, node.lineno, id(node) in top))
    return out


def test_no_file_is_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_nothing_inside_the_package_imports_its_root():
    offenders = [(m, line) for m in MODULES if m != "cdam_pl"
                 for target, names, line, _ in imports(m) if target == "cdam_pl" and names]
    assert not offenders, f"cdam_pl/__init__.py is for users only; imported by {offenders}"


def test_no_module_takes_another_modules_private_names():
    offenders = [(m, target, n) for m in MODULES for target, names, _, _ in imports(m) if target != m
                 for n in names if n.startswith("_")]
    assert not offenders, f"private names imported across modules: {offenders}"


def test_package_imports_sit_at_the_top():
    """Imports of the package's own modules are never hidden inside functions (optional extras may be)."""
    offenders = [(m, target, line) for m in MODULES for target, _, line, at_top in imports(m) if not at_top]
    assert not offenders, f"cdam_pl imports inside functions: {offenders}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path), or None when it is acyclic."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_between_modules_form_no_circle():
    graph = {m: {t for t, _, _, _ in imports(m) if t in MODULES and t != m and not m.startswith(f"{t}.")}
             for m in MODULES if m != "cdam_pl"}
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_parts_of_the_architecture_depend_one_way():
    """Between folders (data, explain, train, ...) and top-level modules the imports form no circle either, so
    the parts stack into layers."""
    graph: dict[str, set[str]] = {}
    for m in MODULES:
        if m == "cdam_pl":
            continue
        deps = {part(t) for t, _, _, _ in imports(m) if t != "cdam_pl"} - {part(m)}
        graph.setdefault(part(m), set()).update(deps)
    assert _cycle(graph) is None, f"parts import each other: {' -> '.join(_cycle(graph))}"


def test_the_checks_see_a_circle_and_a_private_import(tmp_path, monkeypatch):
    """The checks above are not vacuous: a made-up circle and a made-up private import are caught."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    (tmp_path / "cdam_pl").mkdir()
    (tmp_path / "cdam_pl" / "x.py").write_text("from cdam_pl.y import _hidden\n\ndef f():\n    import cdam_pl.y\n")
    monkeypatch.setitem(MODULES, "cdam_pl.x", tmp_path / "cdam_pl" / "x.py")
    found = imports("cdam_pl.x")
    assert ("cdam_pl.y", ["_hidden"], 1, True) in found and ("cdam_pl.y", [], 4, False) in found


@pytest.mark.parametrize("module", ["cdam_pl.explain.registry", "cdam_pl.errors", "cdam_pl.io"])
def test_the_lowest_modules_import_nothing_above_them(module):
    allowed = {"cdam_pl.errors"}
    assert {t for t, _, _, _ in imports(module)} <= allowed


def test_code_passes_the_linter():
    """ruff with the rules of pyproject.toml (pyflakes, pycodestyle, import order) over the package, the tests, the
    benchmarks and the scripts: unused imports and names, undefined names, overlong lines fail CI, not review."""
    import subprocess
    import sys

    repo = ROOT.parent
    targets = ["cdam_pl", "tests", "bench", "scripts", *sorted(p.name for p in repo.glob("*.py"))]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", *targets],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert "No module named ruff" not in out.stderr, "ruff is not installed: pip install -e '.[dev]'"
    assert out.returncode == 0, out.stdout + out.stderr
