"""The package's shape: no module over 400 lines, no function over 50, no import cycle among
its modules. (`test_readme.py` checks that the README's code map names every module.)

A file that breaks a limit today and is being split elsewhere is listed in `ALLOWED`, with
the limit it breaks; the list must stay true both ways: a file not in it fails the limit,
and an entry that no longer breaks its limit fails too, so that it is taken off."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50  # the `def` line through the last line of its body

# What breaks a limit today: "<file>" for its length, "<file>::<function>" for a function.
# Each entry says why it may wait, e.g.
#   # being rewritten elsewhere (issue N): split when it lands
#   "dispatcher/producer.py": f"over {MAX_MODULE_LINES} lines",
ALLOWED: dict[str, str] = {}


def modules(repo_root: Path) -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted((repo_root / "dispatcher").rglob("*.py")):
        parts = list(path.relative_to(repo_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            end = node.end_lineno or node.lineno
            yield prefix + node.name, end - node.lineno + 1
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def too_long(repo_root: Path) -> dict[str, str]:
    """What breaks a length limit, named as in `ALLOWED`."""
    found = {}
    for path in modules(repo_root).values():
        name = str(path.relative_to(repo_root))
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            found[name] = f"over {MAX_MODULE_LINES} lines"
        for function, lines in functions(ast.parse(source)):
            if lines > MAX_FUNCTION_LINES:
                found[f"{name}::{function}"] = f"over {MAX_FUNCTION_LINES} lines"
    return found


def test_no_module_or_function_is_too_long_but_the_listed_ones(repo_root: Path) -> None:
    found = too_long(repo_root)
    unlisted = {name: why for name, why in found.items() if ALLOWED.get(name) != why}
    assert not unlisted, f"split these (or, if being split elsewhere, list them): {unlisted}"
    fixed = sorted(set(ALLOWED) - set(found))
    assert not fixed, f"within the limits now: take them off ALLOWED: {fixed}"


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports when it runs: at the top or inside a
    function; not under `if TYPE_CHECKING:` (those run only for the type checker)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    visit_one(branch)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        else:
            visit(node)

    visit(ast.parse(path.read_text()))
    return (found & set(known)) - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of more than one module (Tarjan)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in graph[module]:
            if other not in order:
                strong(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            part = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(part) > 1:
                found.append(sorted(part))

    for module in graph:
        if module not in order:
            strong(module)
    return found


def test_no_import_cycle(repo_root: Path) -> None:
    known = modules(repo_root)
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert sum(map(len, graph.values())) > len(known)  # the graph was read at all
    assert cycles(graph) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycles_finds_a_cycle(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected


def test_the_limits_are_read_from_the_source(tmp_path: Path) -> None:
    module = tmp_path / "dispatcher" / "big.py"
    module.parent.mkdir()
    body = "\n".join(f"        x{n} = {n}" for n in range(MAX_FUNCTION_LINES))
    module.write_text(f"class A:\n    async def long(self) -> None:\n{body}\n")
    assert too_long(tmp_path) == {"dispatcher/big.py::A.long": f"over {MAX_FUNCTION_LINES} lines"}
    module.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert too_long(tmp_path) == {"dispatcher/big.py": f"over {MAX_MODULE_LINES} lines"}


def test_imports_are_read_as_they_run(tmp_path: Path) -> None:
    package = tmp_path / "dispatcher"
    package.mkdir()
    for name in ("__init__", "a", "b", "c", "d"):
        (package / f"{name}.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from dispatcher import b\n"
        "if TYPE_CHECKING:\n    from dispatcher.c import C\n"
        "def f() -> None:\n    from . import d\n"
    )
    known = modules(tmp_path)
    assert imported("dispatcher.a", package / "a.py", known) == {"dispatcher.b", "dispatcher.d"}
