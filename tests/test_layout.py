"""The house's rules, read from the code: imports only go down the floors, no import
circles, no Prefect below tasks/, no model code below tasks/ but in models/, and an
import inside a function only where it is deliberately lazy, with a comment saying why."""

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each folder and the folders it may import from (docs/design.md, "The floors").
MAY_IMPORT = {
    "gender_pipeline": {"flows", "tasks", "models", "night", "engine", "faces", "lake", "runtime"},
    "flows": {"tasks", "models", "night", "engine", "faces", "lake", "runtime"},
    "tasks": {"models", "night", "engine", "faces", "lake", "runtime"},
    "models": {"faces", "lake", "runtime"},
    "night": {"engine", "faces", "lake", "runtime"},
    "engine": {"faces", "lake", "runtime"},
    "faces": {"runtime"},
    "lake": {"runtime"},
    "runtime": set(),
}
NO_PREFECT = {"models", "night", "engine", "faces", "lake", "runtime"}


def _modules():
    for folder in MAY_IMPORT:
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                path = os.path.join(ROOT, folder, name)
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
                module = ("gender_pipeline" if folder == "gender_pipeline" else f"gender_pipeline.{folder}") + (
                    "" if name == "__init__.py" else "." + name[:-3])
                yield folder, module, text, ast.parse(text)


def _imports(tree, in_function: bool):
    """(node, module imported) of the imports at module level or inside functions."""
    def walk(node, inside):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == \
                    "TYPE_CHECKING":
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inside == in_function:
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                for name in names:
                    yield child, name
            yield from walk(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    yield from walk(tree, False)


def _folder(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "gender_pipeline":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else "gender_pipeline"


def test_imports_only_go_down_the_floors():
    wrong = []
    for folder, module, _, tree in _modules():
        for in_function in (False, True):
            for node, name in _imports(tree, in_function):
                target = _folder(name)
                if target and target != folder and target not in MAY_IMPORT[folder]:
                    wrong.append(f"{module}:{node.lineno} imports {name}")
                if folder in NO_PREFECT and name.split(".")[0] in ("prefect", "prefect_dask"):
                    wrong.append(f"{module}:{node.lineno} imports Prefect below tasks/")
    assert not wrong, wrong


def test_no_import_circles_even_through_imports_inside_functions():
    graph = defaultdict(set)
    modules = {module for _, module, _, _ in _modules()}
    for _, module, _, tree in _modules():
        for in_function in (False, True):
            for node, name in _imports(tree, in_function):
                candidates = [name] + ([f"{name}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                                       else [])
                graph[module] |= {c for c in candidates if c in modules and c != module}
    seen, stack, circles = {}, [], []

    def visit(module):
        seen[module] = "open"
        stack.append(module)
        for target in graph[module]:
            if seen.get(target) == "open":
                circles.append(stack[stack.index(target):] + [target])
            elif target not in seen:
                visit(target)
        stack.pop()
        seen[module] = "done"

    for module in sorted(modules):
        if module not in seen:
            visit(module)
    assert not circles, circles


def test_an_import_inside_a_function_says_why():
    silent = []
    for _, module, text, tree in _modules():
        lines = text.splitlines()
        for node, name in _imports(tree, True):
            said = [lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else "",
                    lines[node.end_lineno - 1]]
            if not any("#" in line for line in said):
                silent.append(f"{module}:{node.lineno} {name}")
    assert not silent, silent


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_each_floor_is_a_package_of_the_namespace(folder):
    assert os.path.exists(os.path.join(ROOT, folder, "__init__.py"))
