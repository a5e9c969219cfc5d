"""Many runs, one storage root: runs started at the same instant, and runs killed (SIGKILL)
in the middle of creating or replacing something shared, leave every shared thing usable.

The default matrix races the functions that create shared things (the fixture dataset and
its ``datasets`` cache, the MLflow store, the pool and its compaction, the run index, a
benchmark's ledger) in separate processes released together from a barrier, with an
injected delay at the critical point, and kills a process at each step of a build or a
replacement before the next one runs. Four whole ``icd run``s at once are opt-in
(``ICD_CONCURRENT_RUNS_TEST=1``; ``python -m icd.bench.firstruns`` runs rounds of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lancedb
import mlflow
import polars as pl
import pyarrow.parquet as pq
import pytest

from icd.data import shapes
from icd.storage.locks import merge_json
from icd.storage.tracking import Tracker

pytestmark = pytest.mark.slow  # processes started and killed: in `make test`, not in -m "not slow"
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
# First use of the fixture dataset: open the stream (building the dataset and the
# `datasets` cache), read it whole, then keep reading the files for a while, as a run
# does. The builds are staggered (process i draws its first image 0.3*i s late) and every
# folder removal is followed by a pause, so a build that removes a dataset another process
# already reads is caught every time, not once in a while.
FIXTURE = (
    "import shutil, sys, time\nimport pyarrow.parquet as pq\n"
    "from icd.config import DataConfig\nfrom icd.data import shapes\n"
    "from icd.data.stream import open_stream\n"
    + BARRIER
    + """i, root, n = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rmtree, render = shutil.rmtree, shapes.render_shape
def slow_rmtree(*a, **k):
    rmtree(*a, **k)
    time.sleep(0.5)
def late_render(k, *a, **kw):
    if k == 0:
        time.sleep(0.3 * i)
    return render(k, *a, **kw)
shutil.rmtree, shapes.render_shape = slow_rmtree, late_render
cfg = DataConfig(dataset="shapes", source=f"fixture:shapes?n={n}&corrupt_every=10")
stream = open_stream(cfg, root=root)
seen = sum(len(c.samples) for c in stream.chunks(16))
assert seen == n, (seen, n)
folder = shapes.dataset_dir(root, n=n, corrupt_every=10)
end = time.time() + 2.5
while time.time() < end:
    assert pq.read_table(shapes.data_files(folder)[0]).num_rows == n
    assert (folder / "shapes.json").exists()
"""
)
# A process killed (SIGKILL) at one step of a build or a replacement.
KILL = """
import os, signal, sys
from pathlib import Path
from icd.data import shapes
from icd.storage import locks
point, root = sys.argv[1], Path(sys.argv[2])
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "shapes-mid-build":  # the parquet file written, the card not yet
    shapes._card = die
elif point == "shapes-built-not-published":
    locks.publish_dir = die
elif point == "shapes-replacing-mid-swap":  # the old folder moved aside, the new not in
    rename, calls = os.rename, []
    def second_rename_dies(a, b):
        calls.append(a)
        if len(calls) == 2:
            die()
        rename(a, b)
    os.rename = second_rename_dies
elif point == "file-before-replace":
    os.replace = die
    locks.atomic_write_text(root / "state.json", '{"new": 1}')
if point.startswith("shapes"):
    shapes.build_shapes_dataset(root, n=30, corrupt_every=0)
"""
# MLflow's first migration, killed once the store passes ``size`` bytes (mid-migration).
KILL_MLFLOW = """
import os, signal, sys, threading, time
from pathlib import Path
folder, size = Path(sys.argv[1]), int(sys.argv[2])
def watch():
    while True:
        for p in folder.glob("*mlflow.db*"):
            try:
                if p.stat().st_size > size:
                    os.kill(os.getpid(), signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.0005)
from icd.storage.tracking import Tracker
threading.Thread(target=watch, daemon=True).start()
Tracker(f"sqlite:///{folder}/mlflow.db")
"""
# Pool writers that compact as they go (every other commit), as runs sharing a pool do.
COMPACTING_WRITER = (
    "import sys\nfrom icd.storage.pool import DemoPool\nfrom tests.storage.rows import chunk_rows\n"
    + BARRIER
    + """pool = DemoPool(sys.argv[4])
for c in range(int(sys.argv[5])):
    pool.upsert(chunk_rows(f"run{sys.argv[3]}", c))
    pool.upsert(chunk_rows("shared", c))
    pool.maybe_compact(2)
"""
)
# A run committing chunks and finishing, beside a reader listing the runs (`icd runs`).
RUN_WRITER = (
    "import json, sys\nfrom pathlib import Path\n"
    "from icd.storage.runstate import RunState, atomic_write_text\n"
    + BARRIER
    + """run_dir = Path(sys.argv[4]) / "runs" / f"run{sys.argv[3]}"
atomic_write_text(run_dir / "config.json", json.dumps({"data": {"limit": 400}}))
state = RunState(run_dir)
for c in range(int(sys.argv[5])):
    state.commit(c, {"samples_seen": c + 1, "running": {"accuracy": 0.5}})
atomic_write_text(run_dir / "summary.json", json.dumps({"samples": 400, "accuracy": 0.5}))
"""
)
RUN_READER = (
    "import sys, time\nfrom icd.report.runs import list_runs\n"
    + BARRIER
    + """root, n = sys.argv[4], int(sys.argv[5])
end = time.time() + 60
while time.time() < end:
    runs = list_runs(root)
    if len(runs) == n and all(r.finished for r in runs):
        break
else:
    raise SystemExit("the runs never all showed as finished")
"""
)
# A benchmark's ledger (cells.json) updated by several processes at once.
LEDGER = (
    "import sys\nfrom icd.storage.locks import merge_json\n"
    + BARRIER
    + """for k in range(int(sys.argv[5])):
    merge_json(sys.argv[4], {f"p{sys.argv[3]}-{k}": "x"})
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


def _race(tmp_path: Path, script: str, n: int, *args: str) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir(exist_ok=True)
    _finish([_start(script, barrier, n, i, *args) for i in range(n)])


def _killed(script: str, *args: str) -> None:
    p = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == -9, f"not killed (rc {p.returncode}): {p.stdout}{p.stderr}"


def _runs(root: Path) -> list[Any]:
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "icd"]
    return client.search_runs([exp.experiment_id])


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of builds and replacements left behind."""
    return sorted(p.name for p in folder.glob(".*") if ".tmp" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("prebuilt", [False, True], ids=["fresh", "prebuilt"])
def test_fixture_dataset_first_use_in_four_processes(tmp_path: Path, prebuilt: bool) -> None:
    root, n = tmp_path / "fixtures", 48
    if prebuilt:
        shapes.build_shapes_dataset(root, n=n, corrupt_every=10)
    _race(tmp_path, FIXTURE, 4, str(root), str(n))
    assert [p.name for p in root.iterdir() if p.name.startswith("shapes")] == ["shapes-48-0-c10"]
    assert _leftovers(root) == []


def test_store_creation_at_once_in_four_processes(tmp_path: Path) -> None:
    root, n = tmp_path / "root", 4
    _race(tmp_path, STORES, n, str(root))
    runs = _runs(root)
    assert sorted(r.data.tags["icd.run_id"] for r in runs) == [str(i) for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in runs)
    pool = pl.from_arrow(lancedb.connect(str(root / "pool")).open_table("demos").to_arrow())
    assert pool.height == 5 * n and pool["key"].n_unique() == pool.height


def test_two_runs_writing_and_compacting_one_pool(tmp_path: Path) -> None:
    uri, chunks = tmp_path / "pool", 6
    _race(tmp_path, COMPACTING_WRITER, 2, str(uri), str(chunks))
    rows = pl.from_arrow(lancedb.connect(str(uri)).open_table("demos").to_arrow())
    assert rows["key"].n_unique() == rows.height == 8 * chunks * 3  # run0, run1, shared
    assert sorted(rows["run_id"].unique()) == ["run0", "run1", "shared"]


def test_runs_listed_while_they_write(tmp_path: Path) -> None:
    root, writers, chunks = tmp_path / "root", 3, 40
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_start(RUN_WRITER, barrier, writers + 1, i, str(root), str(chunks)) for i in range(3)]
    procs.append(_start(RUN_READER, barrier, writers + 1, writers, str(root), str(writers)))
    _finish(procs)


def test_ledger_updated_by_four_processes_keeps_every_entry(tmp_path: Path) -> None:
    path, each = tmp_path / "cells.json", 25
    _race(tmp_path, LEDGER, 4, str(path), str(each))
    assert len(json.loads(path.read_text())) == 4 * each
    merge_json(path, {"more": "y"})
    assert len(json.loads(path.read_text())) == 4 * each + 1


@pytest.mark.parametrize(
    "point",
    [
        "shapes-mid-build",
        "shapes-built-not-published",
        "shapes-replacing-mid-swap",
        "file-before-replace",
    ],
)
def test_killed_at_each_step_the_next_one_succeeds(tmp_path: Path, point: str) -> None:
    root = tmp_path / "fixtures"
    target = shapes.dataset_dir(root, n=30, corrupt_every=0)
    if point == "shapes-replacing-mid-swap":  # a stale build (older format) to replace
        shapes.build_shapes_dataset(root, n=30, corrupt_every=0)
        meta = json.loads((target / "shapes.json").read_text())
        (target / "shapes.json").write_text(json.dumps({**meta, "version": 0}))
    if point == "file-before-replace":
        (root / "state.json").parent.mkdir(parents=True)
        (root / "state.json").write_text('{"old": 1}')
    _killed(KILL, point, str(root))
    if point == "file-before-replace":
        assert json.loads((root / "state.json").read_text()) == {"old": 1}  # never half
        return
    assert not (target / "shapes.json").exists() or point == "shapes-built-not-published"
    folder = shapes.build_shapes_dataset(root, n=30, corrupt_every=0)
    assert pq.read_table(shapes.data_files(folder)[0]).num_rows == 30
    assert json.loads((folder / "shapes.json").read_text())["version"] > 0
    assert _leftovers(root) == []


@pytest.mark.parametrize("size", [150_000, 700_000])
def test_mlflow_store_creation_killed_midway_the_next_run_succeeds(
    tmp_path: Path, size: int
) -> None:
    _killed(KILL_MLFLOW, str(tmp_path), str(size))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "icd")
    tracker.start("after-kill", {"a": 1})
    tracker.finish({"x": 1.0})
    assert [r.data.tags["icd.run_id"] for r in _runs(tmp_path)] == ["after-kill"]
    assert [p.name for p in tmp_path.glob("*.tmp*")] == []


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
    env = {**os.environ, "ICD_FIXTURES": str(tmp_path / "fixtures")}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    _finish(
        [
            _start(
                LAUNCH,
                barrier,
                n,
                i,
                "run",
                "--no-progress",
                "--run-id",
                f"par-{i}",
                *args,
                env=env,
            )
            for i in range(n)
        ]
    )
    runs = _runs(root)
    assert sorted(r.data.tags["icd.run_id"] for r in runs) == [f"par-{i}" for i in range(n)]
    assert all(r.info.status == "FINISHED" for r in runs)
    pool = pl.from_arrow(lancedb.connect(str(root / "pool")).open_table("demos").to_arrow())
    from icd.storage.results import read_predictions

    for i in range(n):
        preds = read_predictions(root / "runs" / f"par-{i}")
        rows = pool.filter(pl.col("run_id") == f"par-{i}")
        assert preds.height == 8
        assert sorted(rows["sample_id"]) == sorted(preds.filter(pl.col("accepted"))["sample_id"])
    assert pool["key"].n_unique() == pool.height > 0
