"""The package's import graph, read with ``ast``: lower floors never import evaluation, and no
import circle exists among mess_ray modules (imports inside functions count too: a lazy import
is still a dependency, and the circle it hides breaks as soon as someone hoists it)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mess_ray"
# Floors below evaluation: they may be used by eval/, never the other way round.
NO_EVAL = ("models", "train", "serve", "index")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The mess_ray modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is
    a module, else a.b); anywhere in the file, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in known:
                found.add(target)
                break
            # "import mess_ray.a.b" depends on mess_ray.a.b (and runs the packages above it)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and not isinstance(node, ast.ImportFrom):
                found.add(target)
    found.discard(name)
    return found


@functools.cache
def _graph() -> dict[str, frozenset[str]]:
    known = set(modules())
    return {name: frozenset(imported_modules(path, known)) for name, path in modules().items()}


def import_graph() -> dict[str, set[str]]:
    """Module -> the mess_ray modules it imports (a fresh copy of the cached graph)."""
    return {name: set(deps) for name, deps in _graph().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_reader_sees_imports_and_circles():
    known = set(modules())
    graph = import_graph()
    assert "mess_ray.descriptors" in graph["mess_ray.serve.service"]
    assert "mess_ray.index.job" in graph["mess_ray.eval.benchmark"]  # a lazy import counts
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "mess_ray.eval" in known and "mess_ray.eval.tasks.agreement" in known


@pytest.mark.parametrize("floor", NO_EVAL)
def test_lower_floors_never_import_eval(floor):
    offenders = {
        name: sorted(
            dep for dep in deps if dep == "mess_ray.eval" or dep.startswith("mess_ray.eval.")
        )
        for name, deps in import_graph().items()
        if name == f"mess_ray.{floor}" or name.startswith(f"mess_ray.{floor}.")
    }
    assert not {k: v for k, v in offenders.items() if v}, (
        f"mess_ray/{floor} imports eval/: move what it needs below both (package level)"
    )


def test_no_import_circle_among_mess_ray_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


TESTS = Path(__file__).resolve().parent


def imported_test_modules(path: Path) -> set[str]:
    """The top-level names of ``test_*`` modules and ``conftest`` that ``path`` imports, anywhere
    in the file (a test file's lazy import inside a test counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        found.update(
            top
            for top in (name.partition(".")[0] for name in names)
            if top.startswith("test_") or top == "conftest"
        )
    return found


def test_the_test_import_reader_sees_test_modules(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        "import os\nfrom helpers import tiny_config\nimport test_a\n"
        "def test_x():\n    from test_b import helper\n    from conftest import thing\n"
    )
    assert imported_test_modules(sample) == {"test_a", "test_b", "conftest"}


def test_test_files_never_import_each_other():
    """Shared test helpers live in tests/helpers.py and shared fixtures in tests/conftest.py: a
    test file importing another test file (or conftest) runs that file's module-level setup and
    re-registers its fixtures and tests under a second name."""
    offenders = {
        path.name: sorted(found)
        for path in sorted(TESTS.rglob("*.py"))
        if (found := imported_test_modules(path))
    }
    assert not offenders, f"move what these need into tests/helpers.py or conftest.py: {offenders}"
