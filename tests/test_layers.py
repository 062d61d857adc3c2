"""The import graph of geosample follows docs/architecture.md: no cycle, and every import points down.

Layers, top first ("A -> B": A imports B; a module may import its own layer and the layers below):

    cli, commands -> (integrations, distributed) -> (gits, amed, geometry, metrics, data, figures)
        -> solvers -> schedules -> (denoisers, models) -> kernels

The helpers ``_io``, ``_cpp`` (with the extension ``_C``), ``_device``, ``_threads`` and ``_version`` import no other part of
geosample and serve every layer but the kernels; the kernels import nothing of geosample but
``geosample.kernels.*``.  Only the top layer imports the package facade ``geosample`` itself.
Imports are read with ``ast`` from the source, module-level and inside functions alike (a lazy
import must point down too); ``importlib`` calls are not imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "geosample"

#: Top first.  A module belongs to the layer of its longest listed prefix.
LAYERS = (
    ("geosample.cli", "geosample.__main__", "geosample.commands"),
    ("geosample.integrations", "geosample.distributed"),
    ("geosample.gits", "geosample.amed", "geosample.geometry", "geosample.metrics", "geosample.data",
     "geosample.figures"),
    ("geosample.solvers",),
    ("geosample.schedules",),
    ("geosample.denoisers", "geosample.models"),
    ("geosample.kernels",),
)
HELPERS = ("geosample._io", "geosample._cpp", "geosample._C", "geosample._device", "geosample._threads",
           "geosample._version")
FACADE = "geosample"
KERNELS = "geosample.kernels"

#: Known violations in files this change does not own, each named with its owner; remove an entry
#: when the import is gone (the test then fails on a stale entry, so the list cannot rot).
EXCEPTIONS: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(root: Path) -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported geosample module, line)} for every .py file under the package ``root``.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of
    ``pkg``; relative imports are resolved against the importing module's package."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files) | set(HELPERS)
    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == root.name}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != root.name:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add((sub if sub in known else target, node.lineno))
        graph[mod] = edges
    return graph


def layer(mod: str) -> int | None:
    """Index of ``mod``'s layer (0 = top), or None for the helpers and the facade."""
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    return best


def _layer_name(i: int) -> str:
    return "/".join(p.rpartition(".")[2] for p in LAYERS[i])


def violations(graph: dict[str, set[tuple[str, int]]], exceptions=frozenset()) -> list[str]:
    """Every import that points up the layers (or out of the kernels, or into the facade from below)."""
    out = []
    for mod, edges in sorted(graph.items()):
        for target, line in sorted(edges):
            if (mod, target) in exceptions or target == mod:
                continue
            where = f"{mod}:{line} imports {target}"
            if mod == KERNELS or mod.startswith(KERNELS + "."):
                if not (target == KERNELS or target.startswith(KERNELS + ".")):
                    out.append(f"{where}: kernels import only geosample.kernels.*")
            elif mod in HELPERS:
                if target not in HELPERS:
                    out.append(f"{where}: the helpers import no other part of geosample")
            elif mod == FACADE or target in HELPERS:
                continue
            elif target == FACADE:
                if layer(mod) != 0:
                    out.append(f"{where}: only cli/commands import the package facade")
            elif layer(mod) is None or layer(target) is None:
                out.append(f"{where}: {mod if layer(mod) is None else target} has no layer in tests/test_layers.py")
            elif layer(target) < layer(mod):
                out.append(f"{where}: layer {_layer_name(layer(mod))} is below layer {_layer_name(layer(target))}")
    return out


def find_cycle(graph: dict[str, set[tuple[str, int]]], exceptions=frozenset()) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None (depth-first search, colours white/grey/black)."""
    edges = {m: sorted({t for t, _ in e if t in graph and t != m and (m, t) not in exceptions})
             for m, e in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "grey"
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == "grey":
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = "black"
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


@pytest.fixture(scope="module")
def graph():
    return read_imports(PACKAGE)


def test_no_import_cycle(graph):
    cycle = find_cycle(graph, EXCEPTIONS)
    assert cycle is None, " -> ".join(cycle)


def test_every_import_points_down(graph):
    assert violations(graph, EXCEPTIONS) == []


def test_every_module_has_a_layer(graph):
    loose = [m for m in graph if m != FACADE and m not in HELPERS and layer(m) is None]
    assert loose == [], "place these modules in LAYERS (and docs/architecture.md)"


def test_exceptions_are_still_needed(graph):
    edges = {(m, t) for m, e in graph.items() for t, _ in e}
    assert sorted(EXCEPTIONS - edges) == [], "remove the exceptions whose import is gone"
    for m, t in EXCEPTIONS:   # each one is needed: without it, a violation or a cycle
        assert violations({m: {(t, 0)}}) or find_cycle(graph, EXCEPTIONS - {(m, t)}), (m, t)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "geosample"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_wrong_import_fails(tmp_path):
    """The checks on a synthetic package: an upward import, a lazy one, a kernel reaching out, a cycle."""
    root = _package(tmp_path, {
        "schedules.py": "",
        "solvers/__init__.py": "from ..schedules import x\n",
        "solvers/base.py": "def f():\n    from .. import schedules\n",
        "gits/__init__.py": "from ..solvers import base\n",
        "kernels/__init__.py": "from . import step\n",
        "kernels/step.py": "",
    })
    good = read_imports(root)
    assert good["geosample.solvers.base"] == {("geosample.schedules", 2)}   # lazy, resolved to the module
    assert good["geosample.gits"] == {("geosample.solvers.base", 1)}
    assert violations(good) == [] and find_cycle(good) is None

    (root / "schedules.py").write_text("import geosample.gits\n")                       # up, at module level
    (root / "kernels" / "step.py").write_text("def f():\n    from .._io import atomic_write\n")  # kernel, lazily
    bad = read_imports(root)
    found = violations(bad)
    assert any(v.startswith("geosample.schedules:1 imports geosample.gits") for v in found)
    assert any(v.startswith("geosample.kernels.step:2 imports geosample._io") for v in found)
    assert find_cycle(bad) == ["geosample.gits", "geosample.solvers.base", "geosample.schedules", "geosample.gits"]
    assert find_cycle(bad, {("geosample.schedules", "geosample.gits")}) is None
    assert violations(bad, {("geosample.schedules", "geosample.gits"), ("geosample.kernels.step", "geosample._io")}) == []


def test_the_real_tree_would_fail_on_an_upward_import(graph):
    wrong = {**graph, "geosample.solvers.base": graph["geosample.solvers.base"] | {("geosample.gits", 1)}}
    assert violations(wrong, EXCEPTIONS) == ["geosample.solvers.base:1 imports geosample.gits: "
                                             "layer solvers is below layer gits/amed/geometry/metrics/data/figures"]


def test_commands_share_library_code_not_each_other(graph):
    """A command (``geosample <name>``) imports no other command nor another command's parts
    (``commands/<name>_*.py``); what they share lives in commands/common.py."""
    from geosample.cli import COMMANDS

    def owner(mod):
        name = mod.rsplit(".", 1)[1]
        return next((c for c in COMMANDS if name == c or name.startswith(c + "_")), None)

    modules = [m for m in graph if m.startswith("geosample.commands.") and m != "geosample.commands.common"]
    assert {owner(m) for m in modules} == set(COMMANDS), "every module under commands/ is a command or a part of one"
    for mod in modules:
        assert not {t for t, _ in graph[mod] if t in modules and owner(t) != owner(mod)}, mod
