"""The layout of the package against the floor table of docs/architecture.md: every import (lazy ones inside
functions too) goes down the floors, or stays inside a package that fills one floor; no cycle at all; every
module is placed; modules and functions stay readable in size. And the module names of earlier releases still
import, as the modules that hold their code now."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "edm2"
DOC = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def floor_table() -> dict[str, int]:
    """Module -> floor, from the table: a row names files (`files/base.py`) or whole folders (`data/`)."""
    floors: dict[str, int] = {}
    folders: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not m:
            continue
        for entry in re.findall(r"`([^`]+)`", m.group(2)):
            if entry.endswith("/"):
                folders[entry.rstrip("/")] = int(m.group(1))
            else:
                floors[module_name(SRC / entry)] = int(m.group(1))
    for name, path in MODULES.items():
        folder = path.relative_to(SRC).parent.as_posix()
        if name not in floors and folder in folders:
            floors[name] = folders[folder]
    return floors


def package_of(name: str) -> str:
    path = MODULES[name]
    return module_name(path.parent / "__init__.py") if path.name != "__init__.py" else name


def imported_modules(name: str) -> set[str]:
    """The edm2 modules `name` imports, anywhere in its body: the module itself for `from a.b import c` unless `c`
    is a submodule, and the packages Python initializes on the way that are not the importer's own."""
    tree = ast.parse(MODULES[name].read_text())
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                targets.add(sub if sub in MODULES else node.module)
    found = set()
    for target in targets:
        if not target.startswith("edm2"):
            continue
        assert target in MODULES, f"{name} imports {target}, which is no module of the package"
        parts = target.split(".")
        chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}  # edm2.a, edm2.a.b, ...
        own = package_of(name)
        found.update(m for m in chain if m == target or not own.startswith(m))
    found.discard(name)
    return found


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_every_module_has_a_floor():
    floors = floor_table()
    assert set(MODULES) - set(floors) == set(), "modules missing from the table of docs/architecture.md"
    assert set(floors) - set(MODULES) == set(), "the table names modules that do not exist"


def test_imports_go_down_the_floors():
    floors = floor_table()
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets:
            same_package = package_of(name) == package_of(target) and floors[name] == floors[target]
            if floors[target] > floors[name] or (floors[target] == floors[name] and not same_package):
                wrong.append(f"{name} (floor {floors[name]}) imports {target} (floor {floors[target]})")
    assert wrong == []


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(target):] + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_check_finds_a_cycle_and_an_import_from_above(monkeypatch):
    """The two rules above fail on a house that breaks them (so they can fail at all)."""
    monkeypatch.setitem(GRAPH, "edm2.layers", GRAPH["edm2.layers"] | {"edm2.training.loop"})
    with pytest.raises(AssertionError, match="edm2.layers"):
        test_imports_go_down_the_floors()
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()


def test_modules_and_functions_stay_readable():
    long_modules = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    assert {n: k for n, k in long_modules.items() if k > MAX_MODULE_LINES} == {}
    long_functions = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if size > MAX_FUNCTION_LINES + 5 and "on purpose" not in body:
                    long_functions.append(f"{name}.{node.name}: {size} lines")
    assert long_functions == []


def test_the_old_module_names_are_the_new_modules():
    from edm2._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new)
        assert old.rsplit(".", 1)[1] not in {p.stem for p in SRC.glob("*.py")}  # no file of that name left
    from edm2.checkpoint import RunLock, Snapshot, atomic_output, load_network, save_training_state  # noqa: F401
    from edm2.posthoc import PosthocEMA

    from edm2.training import setup, train, train_step  # noqa: F401

    assert PosthocEMA.__module__ == "edm2.ema.trackers"
