"""The shape the code keeps: long signatures are keyword-only, and each stage of the
stream is one module of ``icd.tasks`` whose task carries the stage's name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import icd
from icd.tasks.runner import STAGES

ROOT = Path(icd.__file__).parent
MAX_POSITIONAL = 8


def _positional(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    names = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_function_outside_bench_takes_more_than_eight_positional_parameters() -> None:
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        if "bench" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and _positional(node) > MAX_POSITIONAL:
                long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}")
    assert not long, f"more than {MAX_POSITIONAL} positional parameters: {long}"


MAX_LINES = 60


def test_no_function_outside_bench_is_longer_than_sixty_lines() -> None:
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        if "bench" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} {size}")
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps): {long}"


def test_each_stage_is_one_module_with_its_task_named_after_it() -> None:
    for name in STAGES:
        module = importlib.import_module(f"icd.tasks.{name}")
        stage = getattr(module, name)
        if name == "evaluate":  # a plain call, booked by the runner under its name
            assert callable(stage)
            continue
        assert stage.name == name
        assert stage.task_run_name == f"{name}-chunk{{chunk.index}}"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """A module's imports made when it loads (type-checking blocks included), not those
    inside functions."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If | ast.Try):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return found


def _import_graph() -> dict[str, set[str]]:
    """Each ``icd`` module and the ``icd`` modules it imports when it loads."""
    paths = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in _module_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in paths}
                continue
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            for a in node.names:
                target = f"{base}.{a.name}"
                deps |= {target if target in paths else base} & paths.keys()
        graph[name] = deps - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle_between_modules() -> None:
    graph = _import_graph()
    assert graph["icd.flows.stream"] >= {"icd.tasks.zero_shot", "icd.tasks.context"}  # it sees
    assert not _circles(graph), f"modules that import each other: {_circles(graph)}"


def test_the_circle_check_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
