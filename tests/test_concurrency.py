"""Runs started at the same instant on a fresh storage root all finish, with consistent pool
rows and MLflow runs; store creation is serialised across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lancedb
import mlflow
import polars as pl
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

# Each process imports everything first, then waits at a file barrier until all are
# ready, so they reach store creation together (not staggered by import times).
BARRIER = """
import pathlib, sys, time
folder, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
deadline = time.time() + 300
while len(list(folder.glob("ready-*"))) < n and time.time() < deadline:
    time.sleep(0.01)
"""
LAUNCH = (
    "import sys\nimport icd.cli, icd.flows.stream, icd.storage.pool, icd.storage.tracking\n"
    + BARRIER
    + "sys.argv = ['icd', *sys.argv[4:]]\nicd.cli.main()\n"
)
# Store creation alone: the MLflow store, the experiment, a run, and a pool upsert.
STORES = (
    "import sys\nimport numpy as np\n"
    "from icd.storage.pool import DemoPool\nfrom icd.storage.tracking import Tracker\n"
    + BARRIER
    + """root, name = sys.argv[4], sys.argv[3]
tracker = Tracker(f"sqlite:///{root}/mlflow.db", "icd")
tracker.start(name, {"a": 1})
tracker.finish({"x": 1.0})
vec = np.ones(8, np.float32)
rows = [
    {"sample_id": f"s{i}", "run_id": name, "chunk": 0, "stream_pos": i, "image_vec": vec,
     "label": "cat", "label_vec": vec}
    for i in range(5)
]
DemoPool(f"{root}/pool").upsert(rows)
"""
)


def _start(script: str, barrier: Path, n: int, i: int, *args: str, **kw: Any) -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", script, str(barrier), str(n), str(i), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _finish(procs: list[Any]) -> None:
    outputs = [p.communicate(timeout=420)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}: {out[-2000:]}"


def _runs(root: Path) -> list[Any]:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "icd"]
    return client.search_runs([exp.experiment_id])


def test_store_creation_at_once_in_four_processes(tmp_path: Path) -> None:
    root, n = tmp_path / "root", 4
    _finish([_start(STORES, tmp_path, n, i, str(root)) for i in range(n)])
    runs = _runs(root)
    assert sorted(r.data.tags["icd.run_id"] for r in runs) == [str(i) for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in runs)
    pool = pl.from_arrow(lancedb.connect(str(root / "pool")).open_table("demos").to_arrow())
    assert pool.height == 5 * n and pool["key"].n_unique() == pool.height


@pytest.mark.skipif(
    not os.environ.get("ICD_CONCURRENT_RUNS_TEST"),
    reason="four full icd runs at once take minutes on 2 cores; set ICD_CONCURRENT_RUNS_TEST=1",
)
def test_four_first_runs_at_once_on_a_fresh_root(tmp_path: Path) -> None:
    root, n = tmp_path / "root", 4
    sets = [
        f"storage.root={root}",
        "data.limit=8",
        "pipeline.chunk_size=4",
        "models.teacher.backend=oracle",
        "method.policy.budget=0.5",
    ]
    args = [a for s in sets for a in ("--set", s)]
    _finish(
        [
            _start(
                LAUNCH,
                tmp_path,
                n,
                i,
                "run",
                "--no-progress",
                "--run-id",
                f"par-{i}",
                *args,
            )
            for i in range(n)
        ]
    )
    runs = _runs(root)
    assert sorted(r.data.tags["icd.run_id"] for r in runs) == [f"par-{i}" for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in runs)
    pool = pl.from_arrow(lancedb.connect(str(root / "pool")).open_table("demos").to_arrow())
    for i in range(n):
        preds = pl.read_parquet(root / "runs" / f"par-{i}" / "predictions.parquet")
        rows = pool.filter(pl.col("run_id") == f"par-{i}")
        assert preds.height == 8
        assert sorted(rows["sample_id"]) == sorted(preds.filter(pl.col("accepted"))["sample_id"])
    assert pool["key"].n_unique() == pool.height > 0
