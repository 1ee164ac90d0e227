"""The package's layer order: a lower layer never imports a higher one, and no module imports itself in a circle.

Every module of ``samv2_components`` is parsed with :mod:`ast`; every import counts, wherever it sits (module
level, inside a function, under ``if TYPE_CHECKING``), including relative ones (``from . import x``) and
``importlib.import_module("samv2_components....")`` with a literal name. Importing ``samv2_components.a.b`` from
outside package ``a`` also runs ``a/__init__.py``, so that counts as an import of ``a`` too.

Imports within one layer are allowed (as long as they make no circle); a new top-level module or subpackage must be
given a layer in :data:`LAYERS` before this test passes.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import samv2_components

PACKAGE = "samv2_components"
ROOT = Path(samv2_components.__file__).resolve().parent

#: bottom to top: a unit (top-level module or subpackage of ``samv2_components``) may import units of its own layer
#: or of lower layers only. ``samv2_components`` itself (its ``__init__``) is at the bottom.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("samv2_components", "errors"),  # error types, no package imports
    ("geometry", "consensus", "modality", "sample_data", "bundle_schema", "allocator"),  # pure helpers: import only errors
    ("io",),  # files: scans, points, point pairs, datalists, embedding maps, transforms
    ("transforms", "losses", "metrics", "visualize"),  # on top of io: augmentation, losses, scores, QC pictures
    ("networks",),
    ("inference",),
    ("engines",),
    ("matching",),
    ("registration",),
    ("bundle_support",),  # finding and running whole bundles: only the front ends use it
    ("serving", "cli"),  # front ends
)
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(name: str) -> str | None:
    """The package module ``name`` refers to (a module, or the package/module holding the imported attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(importer: str, is_package: bool, node: ast.AST) -> list[str]:
    """Package modules named by one import node, as written (no parent packages)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # ``from a import b`` imports the module a.b when there is one, else it takes attribute b of a
        names = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names]
    elif isinstance(node, ast.Call):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str):
                names = [node.args[0].value]
    return [t for t in (_resolve(n) for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")) if t]


def edges_in(importer: str, is_package: bool, source: str, filename: str = "<string>") -> list[tuple[str, int, str]]:
    """``[(imported module, line, source text of the import), ...]`` of one module's source."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        for target in _targets(importer, is_package, node):
            text = " ".join((ast.get_source_segment(source, node) or type(node).__name__).split())
            found.append((target, node.lineno, text))
            # importing a.b.c from outside package a.b runs a/__init__ and a/b/__init__ first
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in MODULES and not (importer == parent or importer.startswith(parent + ".")):
                    found.append((parent, node.lineno, text))
    return found


def import_edges() -> dict[str, list[tuple[str, int, str]]]:
    """``{importer: [(imported module, line, source text of the import), ...]}`` for every package module."""
    return {
        m: edges_in(m, p.name == "__init__.py", p.read_text(encoding="utf-8"), str(p)) for m, p in MODULES.items()
    }


EDGES = import_edges()


def _where(importer: str, line: int, text: str) -> str:
    return f"{os.path.relpath(MODULES[importer], ROOT.parent)}:{line} ({importer}): {text}"


def test_every_unit_has_a_layer():
    missing = sorted({unit_of(m) for m in MODULES} - set(LAYER_OF))
    assert not missing, f"give these top-level modules/subpackages a layer in LAYERS: {missing}"


def test_finds_imports():
    """The parser sees module-level, function-level and relative imports (guards the other tests)."""
    assert any(t == "samv2_components.errors" for t, _, _ in EDGES["samv2_components.geometry"])
    assert any(t.startswith("samv2_components.transforms.") for t, _, _ in EDGES["samv2_components.transforms"])
    assert len(MODULES) > 40 and sum(map(len, EDGES.values())) > 100


def test_no_import_from_a_lower_layer_to_a_higher_one():
    violations = []
    for importer, found in sorted(EDGES.items()):
        low = LAYER_OF.get(unit_of(importer))
        for target, line, text in found:
            high = LAYER_OF.get(unit_of(target))
            if low is not None and high is not None and high > low:
                violations.append(
                    f"{_where(importer, line, text)}: layer {low} ({unit_of(importer)}) imports layer {high} ({unit_of(target)})"
                )
    assert not violations, "imports against the layer order:\n" + "\n".join(sorted(set(violations)))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or with a self-loop (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return components


def _describe(component: list[str], edges: dict[str, list[tuple[str, int, str]]], key) -> str:
    members = set(component)
    lines = [f"cycle between {', '.join(component)}:"]
    for importer, found in sorted(edges.items()):
        for target, line, text in found:
            where = f"  {_where(importer, line, text)}"
            if key(importer) in members and key(target) in members and key(importer) != key(target) and where not in lines:
                lines.append(where)
    return "\n".join(lines)


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _, _ in found if t != m} for m, found in EDGES.items()}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_describe(c, EDGES, lambda m: m) for c in cycles)


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for importer, found in EDGES.items():
        graph.setdefault(unit_of(importer), set()).update(unit_of(t) for t, _, _ in found if unit_of(t) != unit_of(importer))
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_describe(c, EDGES, unit_of) for c in cycles)


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "from samv2_components.registration.workflow import RegistrationFailed",
            ["samv2_components.registration.workflow", "samv2_components.registration"],
        ),
        ("def f():\n    from samv2_components import visualize", ["samv2_components.visualize"]),
        ("from .. import errors", ["samv2_components.errors"]),
        ("from ..geometry import as_points", ["samv2_components.geometry"]),
        ("from . import image", ["samv2_components.io.image"]),
        ("from samv2_components.io.image import load_scan", ["samv2_components.io.image"]),
        ("import importlib\nimportlib.import_module('samv2_components.networks')", ["samv2_components.networks"]),
        ("import numpy\nfrom monai.data import MetaTensor", []),
    ],
)
def test_parser_sees(source, expected):
    """What the import parser finds in snippets placed in ``samv2_components/io/points.py``."""
    assert [t for t, _, _ in edges_in("samv2_components.io.points", False, source)] == expected
