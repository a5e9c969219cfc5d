"""icd/method stays pure: no Prefect, LanceDB or MLflow (and no model backends) imported."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import icd.method

FORBIDDEN = ("prefect", "lancedb", "mlflow")
METHOD_DIR = Path(icd.method.__file__).parent
REPO = METHOD_DIR.parents[1]


def imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_forbidden_imports_in_source():
    files = sorted(METHOD_DIR.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        for name in imported_names(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            assert not name.startswith("icd.models"), f"{path.name} imports {name} (cycle)"


def test_importing_every_method_module_loads_none_of_them():
    modules = sorted(
        f"icd.method.{p.stem}" for p in METHOD_DIR.glob("*.py") if p.stem != "__init__"
    )
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    loaded = json.loads(out.stdout)
    assert "icd.method.steps" in loaded
    bad = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert bad == []
