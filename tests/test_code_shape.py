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


def test_each_stage_is_one_module_with_its_task_named_after_it() -> None:
    for name in STAGES:
        module = importlib.import_module(f"icd.tasks.{name}")
        stage = getattr(module, name)
        if name == "evaluate":  # a plain call, booked by the runner under its name
            assert callable(stage)
            continue
        assert stage.name == name
        assert stage.task_run_name == f"{name}-chunk{{chunk.index}}"
