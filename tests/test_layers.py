"""The layers of docs/architecture.md hold: no import cycle, and every import points down (or sideways).

Every `import` statement that can run counts, at module level or inside a function: a lazy import is
still a dependency, only a later one. So do loads by name: `importlib.import_module("pkg.mod")`, and a
module-level constant that names project modules in strings (`BUILTIN_MODULES = ("tune_bir.si", ...)`,
which the code imports by name). Imports under `if TYPE_CHECKING:` never run; they name types for readers
and type checkers, so they are left out (a type named in an annotation is no coupling at run time).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tune_bir", "trainables", "search_spaces", "analysis", "confirmation")
# layer of each module, by the longest matching prefix; a module may import its own layer and those below
LAYERS = {
    "tune_bir": 0,              # the core: config, data, nets, model, losses, si, exaggeration, engine, ...
    "tune_bir.train": 1,        # the core's command lines (train may log a run live to MLflow)
    "tune_bir.pretrain": 1,
    "search_spaces": 2,         # Ray Tune adapters and search spaces
    "trainables": 2,
    "tune_bir.sweep": 3,        # the sweep driver
    "analysis": 4,              # finished sweeps to tables, plots and statistics
    "confirmation": 5,          # pre-registered confirmations: plan, seed ledger, look after look
    "tune_bir.sweep.__main__": 5,   # the command line's composition root: dispatches to confirmation
}
FRAMEWORKS = ("ray", "optuna", "mlflow")
CORE_LAYER = 0


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name an import statement of the file names (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in _runnable_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}   # `from pkg import module`
        elif isinstance(node, ast.Call) and _called_name(node.func) == "import_module" and node.args:
            names |= set(_strings(node.args[0]))
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:   # module-level constants naming modules: loaded by name somewhere
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            names |= {s for s in _strings(node.value) if s.split(".")[0] in PACKAGES}
    return names


def _called_name(func: ast.AST) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _strings(node: ast.AST) -> list[str]:
    """The string constants of a literal: "a" or ("a", "b") / ["a", "b"]."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runnable_nodes(tree: ast.AST):
    """Every node of the tree except those under `if TYPE_CHECKING:` (their `else:` branch is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def dependency_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = {n for n in imported_names(name, path) if n in modules}
        # importing pkg.mod also imports pkg/__init__, but that is Python's doing, not a dependency we wrote
        graph[name] = {t for t in targets if t != name and not name.startswith(t + ".")}
    return graph


def test_the_import_graph_has_no_cycle():
    sorter = graphlib.TopologicalSorter(dependency_graph())
    try:
        sorter.prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_every_import_points_to_the_same_or_a_lower_layer():
    upward = [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
              for module, targets in dependency_graph().items() for target in sorted(targets)
              if layer(target) > layer(module)]
    assert not upward, "\n".join(upward)


def test_the_core_imports_neither_ray_nor_optuna_nor_mlflow():
    offending = []
    for name, path in project_modules().items():
        if layer(name) != CORE_LAYER:
            continue
        for imported in imported_names(name, path):
            if imported.split(".")[0] in FRAMEWORKS:
                offending.append(f"{name} imports {imported}")
    assert not offending, "\n".join(offending)


def test_the_checks_see_what_they_check():
    """The graph holds the edges we know of, so an empty result above is not an empty graph."""
    graph = dependency_graph()
    assert "tune_bir.config" in graph["tune_bir.engine"]
    assert "tune_bir.sweep.plan" in graph["tune_bir.sweep.driver"]
    assert "trainables.bir" in graph["tune_bir.sweep.run"]          # a lazy import, inside a function
    assert {"tune_bir.si", "tune_bir.exaggeration"} <= graph["tune_bir.terms"]   # loaded by name
    assert layer("tune_bir.sweep.run") == 3 and layer("tune_bir.engine") == CORE_LAYER
    assert layer("tune_bir.train") == 1
    hinted = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\nimport torch\n")
    assert {n.names[0].name for n in _runnable_nodes(hinted) if isinstance(n, ast.Import)} == {"torch"}
    cyclic = {"a": {"b"}, "b": {"a"}}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(cyclic).prepare()
