"""The package's seams, read from its source (no import, no TensorFlow): no import cycle between its parts and no
private name imported from another module.

A part is a stage package (``mammoseg.data``, ``mammoseg.patches``, ...) or a top-level module (``mammoseg.mining``,
``mammoseg.export``, ``mammoseg.cli``, ...). Imports inside functions count as much as those at the top: hiding an
import in a function body keeps a cycle, it only moves where it bites.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "mammoseg"
#: The stage packages; each must be importable without the ones that come after it in the workflow.
STAGE_PACKAGES = ("io", "data", "config", "patches", "model", "inference", "evaluation")


def module_name(path: Path) -> str:
    """``mammoseg.a.b`` of ``src/mammoseg/a/b.py`` (a package's ``__init__.py`` is the package)."""
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) of every ``mammoseg`` import in a file, at any depth."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "mammoseg"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] == "mammoseg":
                found.append((module, [alias.name for alias in node.names]))
    return found


def part_of(module: str) -> str | None:
    """The part a module belongs to: ``mammoseg.model.train`` -> ``model``; the root package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def import_graph() -> dict[str, set[str]]:
    """{part: the other parts it imports}."""
    graph: dict[str, set[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        source = part_of(module_name(path))
        if source is None:
            continue
        targets = graph.setdefault(source, set())
        for module, names in imports_of(path):
            target = part_of(module)
            if target is None:  # `from mammoseg import x`: x may be a part
                targets.update(name for name in names if (SOURCE / name).exists() or (SOURCE / f"{name}.py").exists())
            elif target != source:
                targets.add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first = last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b", "c"}}) == ["b", "b"]


def test_import_graph_sees_imports_in_function_bodies(tmp_path, monkeypatch):
    package = tmp_path / "mammoseg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "a.py").write_text("def f():\n    from mammoseg.high import g\n")
    (package / "high.py").write_text("from mammoseg.low.a import f\nfrom . import low\n")
    monkeypatch.setattr(f"{__name__}.SOURCE", package)
    assert import_graph() == {"low": {"high"}, "high": {"low"}}
    assert find_cycle(import_graph()) == ["high", "low", "high"]


def test_no_import_cycle_between_the_parts_of_the_package():
    graph = import_graph()
    assert set(STAGE_PACKAGES) <= set(graph), "a stage package was renamed: update STAGE_PACKAGES"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between parts of mammoseg: {' -> '.join(cycle)}"


@pytest.mark.parametrize("position", range(len(STAGE_PACKAGES)))
def test_stage_packages_import_only_earlier_stages(position):
    """The stages form a line: a stage package may use those before it (and no top-level module), never a later
    one, so each can be read, tested and reused with only its predecessors."""
    stage = STAGE_PACKAGES[position]
    later = set(STAGE_PACKAGES[position + 1:])
    modules = {path.stem for path in SOURCE.glob("*.py")} | {path.parent.name for path in SOURCE.glob("*/__init__.py")}
    top_level = modules - set(STAGE_PACKAGES) - {"__init__", "errors"}
    wrong = import_graph()[stage] & (later | top_level)
    assert not wrong, f"mammoseg.{stage} imports {sorted(wrong)}, which come after it"


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        for module, names in imports_of(path):
            private = [name for name in names if name.startswith("_") and not name.startswith("__")]
            if private and module != module_name(path):
                offenders.append(f"{path.relative_to(SOURCE.parent)}: {private} from {module}")
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)
