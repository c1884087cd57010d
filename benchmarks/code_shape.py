"""The shape of the product code, from the code: lines per folder, the longest functions,
the most parameters, import circles between modules, imports inside functions, README lines.

    python benchmarks/code_shape.py            # this checkout
    python benchmarks/code_shape.py --repo DIR # another checkout (e.g. a worktree of an older commit)

Product code is every Python file outside tests/ and benchmarks/. Module names follow the
package mapping in pyproject.toml (`[tool.setuptools.package-dir]`) when there is one, else
the path. An import counts toward a circle when it runs at import time (module level,
outside `if TYPE_CHECKING:`); imports inside functions are listed apart.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tomllib
from collections import defaultdict

SKIP = {"tests", "benchmarks", "build", "dist", "docs"}


def product_files(repo: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(repo):
        rel = os.path.relpath(folder, repo)
        top = rel.split(os.sep)[0]
        dirs[:] = [d for d in dirs if not d.startswith((".", "__")) and not d.endswith(".egg-info")]
        if top in SKIP or top.startswith("."):
            continue
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".py")]
    return sorted(found)


def module_names(repo: str, files: list[str]) -> dict[str, str]:
    """file -> dotted module name, through pyproject's package-dir mapping if any."""
    mapping: dict[str, str] = {}
    try:
        with open(os.path.join(repo, "pyproject.toml"), "rb") as handle:
            mapping = tomllib.load(handle).get("tool", {}).get("setuptools", {}).get("package-dir", {}) or {}
    except FileNotFoundError:
        pass
    by_folder = sorted(((path.rstrip("/"), package) for package, path in mapping.items() if package),
                       key=lambda item: -len(item[0]))
    names = {}
    for file in files:
        stem = file[:-3].replace(os.sep, "/")
        name = stem.replace("/", ".")
        for folder, package in by_folder:
            if stem == folder or stem.startswith(folder + "/"):
                name = package + stem[len(folder):].replace("/", ".")
                break
        names[file] = name.removesuffix(".__init__")
    return names


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if is_package else parts[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def analyse(repo: str) -> dict:
    files = product_files(repo)
    names = module_names(repo, files)
    known = set(names.values())
    lines_per_folder: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    functions, imports, every, inner = [], defaultdict(set), defaultdict(set), []
    for file in files:
        with open(os.path.join(repo, file), encoding="utf-8") as handle:
            text = handle.read()
        folder = os.path.dirname(file) or "."
        lines_per_folder[folder][0] += 1
        lines_per_folder[folder][1] += text.count("\n")
        tree = ast.parse(text)
        module = names[file]
        is_package = file.endswith("__init__.py")

        def visit(node: ast.AST, scope: str, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _type_checking(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    targets = [t for t in _imported(child, module, is_package)]
                    if in_function:
                        ours = [t for t in targets if t in known or t.rsplit(".", 1)[0] in known]
                        inner.append((file, child.lineno, ", ".join(sorted({t for t in ours} or
                                                                            {targets[0]})), bool(ours)))
                    for target in targets:
                        while target and target not in known:
                            target = target.rpartition(".")[0]
                        if target and target != module:
                            every[module].add(target)
                            if not in_function:
                                imports[module].add(target)
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = child.args
                    params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs
                              if a.arg not in ("self", "cls")]
                    params += [f"*{args.vararg.arg}"] if args.vararg else []
                    params += [f"**{args.kwarg.arg}"] if args.kwarg else []
                    length = child.end_lineno - child.lineno + 1
                    functions.append((f"{file}:{child.lineno} {scope}{child.name}", length, len(params)))
                    visit(child, f"{scope}{child.name}.", True)
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{scope}{child.name}.", in_function)
                else:
                    visit(child, scope, in_function)

        visit(tree, "", False)
    return {"files": files, "folders": dict(lines_per_folder), "functions": functions,
            "circles": circles(imports), "hidden_circles": circles(every), "inner": inner}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in list(graph):
        if v not in index:
            strong(v)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--top", type=int, default=12, help="how many functions to list (default 12)")
    args = parser.parse_args()
    shape = analyse(args.repo)
    total_files = sum(f for f, _ in shape["folders"].values())
    total_lines = sum(n for _, n in shape["folders"].values())
    print(f"product code: {total_files} files, {total_lines} lines")
    for folder, (count, lines) in sorted(shape["folders"].items()):
        print(f"  {folder + '/':28s} {count:3d} files {lines:6d} lines")
    functions = shape["functions"]
    print(f"\nlongest functions (of {len(functions)}):")
    for name, length, params in sorted(functions, key=lambda f: -f[1])[:args.top]:
        print(f"  {length:4d} lines {params:3d} params  {name}")
    print("\nmost parameters:")
    for name, length, params in sorted(functions, key=lambda f: (-f[2], -f[1]))[:args.top]:
        print(f"  {params:4d} params {length:4d} lines  {name}")
    over = [f for f in functions if f[1] > 80]
    many = [f for f in functions if f[2] > 8]
    print(f"\nfunctions over 80 lines: {len(over)}; over 8 parameters: {len(many)}")
    print(f"import circles: {len(shape['circles'])}")
    for circle in shape["circles"]:
        print("  " + " <-> ".join(circle))
    print(f"import circles counting imports inside functions: {len(shape['hidden_circles'])}")
    for circle in shape["hidden_circles"]:
        print("  " + " <-> ".join(circle))
    inner = shape["inner"]
    ours = [i for i in inner if i[3]]
    print(f"imports inside functions: {len(inner)} ({len(ours)} of the project's own modules)")
    readme = os.path.join(args.repo, "README.md")
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as handle:
            print(f"README.md: {handle.read().count(chr(10))} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
