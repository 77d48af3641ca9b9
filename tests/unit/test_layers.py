"""Spectral's imports point one way: no cycle, and no module imports from a layer above its own.

Every module of the package is read with :mod:`ast` (imports inside functions and under
``TYPE_CHECKING`` included) and placed in one of the layers below, lowest first; a module
may import from its own layer and from the layers under it. Importing ``spectral.db.urls``
also runs ``spectral/db/__init__.py``, so an import of a subpackage's module counts as an
import of the subpackage too. The root package ``spectral`` is the public facade, at the
top; Python loads it before any of its modules, which is why it is left out of the cycles.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "spectral"

#: Lowest first. A pattern ending in ``.*`` matches a subpackage's modules; a module named
#: exactly is in that layer whatever a pattern says.
LAYERS: list[tuple[str, list[str]]] = [
    # spectral/actors/__init__.py imports nothing: app.py may name actors/user.py's context.
    ("base", ["spectral.errors", "spectral.rules", "spectral.tracing", "spectral._version",
              "spectral.actors"]),
    ("db", ["spectral.db", "spectral.db.*"]),
    ("config", ["spectral.config"]),
    # actors/user.py holds only ActorContext, the value App's ActorFn names; the actor
    # that runs user actors is actors/supervisor.py, in the actors' layer.
    ("core", ["spectral.state", "spectral.verdicts", "spectral.events", "spectral.app",
              "spectral.tx", "spectral.actors.user", "spectral.version", "spectral.logs",
              "spectral.observe", "spectral.metrics", "spectral.records"]),
    # The HTTP actor serves the dashboard's routes, so ui.py sits with it.
    ("actors", ["spectral.turns", "spectral.actors.*", "spectral.ui"]),
    ("runtime", ["spectral.runtime", "spectral.rollout", "spectral.testing", "spectral.testing.*"]),
    ("surface", ["spectral", "spectral.__main__", "spectral.cli", "spectral.render", "spectral.demo"]),
]

#: Known imports against the layers, each with the reason it is still here.
ALLOWED: dict[tuple[str, str], str] = {
}


def module_files() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, whether it is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (explicitly or through a subpackage)."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "spectral")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "spectral":
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        edges: set[str] = set()
        for target in targets:
            parts = target.split(".")
            # Each enclosing subpackage runs first; the root facade is loaded before all.
            for depth in range(2, len(parts) + 1):
                enclosing = ".".join(parts[:depth])
                if enclosing in modules and not (name + ".").startswith(enclosing + "."):
                    edges.add(enclosing)
            if target == "spectral":
                edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    matches = [i for i, (_, patterns) in enumerate(LAYERS) if module in patterns]
    if not matches:
        matches = [i for i, (_, patterns) in enumerate(LAYERS)
                   if any(fnmatch.fnmatchcase(module, p) for p in patterns if "*" in p)]
    assert len(matches) == 1, f"{module} is in {len(matches)} layers; declare it in exactly one"
    return matches[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        if start in done:
            continue
        path.append(start)
        on_path.add(start)
        while stack:
            node, pending = stack[-1]
            if not pending:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
                continue
            nxt = pending.pop()
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt in done or nxt not in graph:
                continue
            stack.append((nxt, sorted(graph[nxt])))
            path.append(nxt)
            on_path.add(nxt)
    return None


def checked_graph() -> dict[str, set[str]]:
    """The graph without the allowed edges and without the root facade as a target."""
    return {m: {t for t in targets if t != "spectral" and (m, t) not in ALLOWED}
            for m, targets in import_graph().items()}


def test_every_module_is_declared_in_exactly_one_layer() -> None:
    for module in module_files():
        layer_of(module)


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(checked_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_from_a_higher_layer() -> None:
    wrong = sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in checked_graph().items() for t in targets
        if layer_of(t) > layer_of(m)
    )
    assert wrong == []


def test_every_allowed_exception_is_still_needed() -> None:
    graph = import_graph()
    stale = [edge for edge in ALLOWED if edge[1] not in graph.get(edge[0], set())]
    assert stale == [], f"delete these entries from ALLOWED, the imports are gone: {stale}"


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}, ["a2", "b", "a2"]),
])
def test_the_cycle_finder_finds_a_planted_cycle(
    graph: dict[str, set[str]], expected: list[str] | None,
) -> None:
    assert find_cycle(graph) == expected


def test_the_reader_sees_imports_under_type_checking_and_inside_functions() -> None:
    graph = import_graph()
    # app.py names ActorContext under TYPE_CHECKING; runtime imports the HTTP actor lazily.
    assert "spectral.actors.user" in graph["spectral.app"]
    assert "spectral.actors.http" in graph["spectral.runtime"]
    # config imports db.urls, which runs spectral/db/__init__.py first.
    assert {"spectral.db", "spectral.db.urls"} <= graph["spectral.config"]
