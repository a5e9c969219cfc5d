"""A suite fanned out over a real work pool (``benchmark.executor: deployments``): a Prefect
server and two process workers on loopback, the ``icd/stream`` deployment, a parent that is
killed with one worker mid-suite and started again.

Marked `deployment` (skip locally with `-m "not deployment"`); it runs in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tests.loopback import REPO, free_port, kill_tree, start, stop, wait_healthy

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

BIN = Path(sys.executable).parent
SUITE = """
name: fanout
base_preset: smoke
overrides: [pipeline.chunk_size=16]
datasets: [shapes]
modes: [student_zero_shot, icd]
budgets: [0.08]
seeds: [0, 1]
limit: 48
"""
# What a cell computes (not how long it took, nor the teacher calls it made rather than
# reused from the cache): equal whichever executor ran it.
OUTCOMES = ["variant", "accuracy", "accuracy_not_queried", "annotation_rate", "queried",
            "pool_size", "demo_accuracy", "mean_agreement"]  # fmt: skip


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> str:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def _flow_runs(api: str, name: str) -> list[dict]:
    runs: list[dict] = httpx.post(
        f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=10
    ).json()
    return runs


def _comparison(root: Path, benchmark_id: str) -> pl.DataFrame:
    table = pl.read_parquet(root / "benchmarks" / benchmark_id / "comparison.parquet")
    cols = [c for c in table.columns if c.removesuffix("_mean") in OUTCOMES]
    return table.select(cols).sort("variant")


def test_suite_fans_out_over_two_workers_and_resumes_after_a_kill(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    root = tmp_path / "icd"
    suite = tmp_path / "fanout.yaml"
    suite.write_text(SUITE)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    server = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui", "--analytics-off"],
        env, logs / "server.log",
    )  # fmt: skip
    workers: dict[str, subprocess.Popen] = {}
    parent = None
    fan = [
        str(BIN / "icd"), "benchmark", str(suite), "--id", "fan",
        "--set", "benchmark.executor=deployments", "--set", "benchmark.poll_s=1",
        "--set", "benchmark.max_parallel=2", "--set", f"storage.root={root}",
    ]  # fmt: skip
    try:
        wait_healthy(f"{api}/health", server, logs / "server.log")
        _run([str(BIN / "prefect"), "work-pool", "create", "icd", "--type", "process"], env)
        _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "stream"], env)
        for name in ("a", "b"):  # one cell at a time each, like one worker per GPU
            workers[name] = start(
                [str(BIN / "prefect"), "worker", "start", "--pool", "icd", "--name",
                 f"worker-{name}", "--limit", "1", "--install-policy", "never"],
                env, logs / f"worker-{name}.log",
            )  # fmt: skip

        # The parent runs until a cell has finished and worker a is in the middle of another;
        # then worker a (with its flow-run process) and the parent are killed.
        parent = start(fan, env, logs / "parent-1.log")
        folder = root / "benchmarks" / "fan"
        deadline = time.time() + 480
        while True:
            ledger = (
                json.loads((folder / "cells.json").read_text())
                if (folder / "cells.json").exists()
                else {}
            )
            finished = {r for r in ledger if (root / "runs" / r / "summary.json").exists()}
            on_a = (logs / "worker-a.log").read_text()
            busy_a = [r for r, fid in ledger.items() if fid in on_a and r not in finished]
            if finished and busy_a:
                break
            assert parent.poll() is None, "the suite finished before worker a could be killed"
            assert time.time() < deadline, (logs / "parent-1.log").read_text()[-3000:]
            time.sleep(0.5)
        kill_tree(workers.pop("a"))
        kill_tree(parent)
        parent = None
        first_runs = dict(ledger)

        # Started again: the finished cells are reused, the others (the killed one among
        # them) run on the surviving worker, and the table is complete.
        out = _run(fan, env)
        assert "ICD benchmark" in out, out[-3000:]
        ledger = json.loads((folder / "cells.json").read_text())
        assert len(ledger) == 4
        for run_id in finished:
            assert ledger[run_id] == first_runs[run_id], "a finished cell was submitted again"
            assert len(_flow_runs(api, run_id)) == 1
        for run_id in busy_a:
            states = sorted(r["state"]["type"] for r in _flow_runs(api, run_id))
            assert states == ["CANCELLED", "COMPLETED"], states
        runs = pl.read_parquet(folder / "runs.parquet")
        assert runs.height == 4 and runs["error"].is_null().all()
        # Both workers ran cells.
        for name in ("a", "b"):
            text = (logs / f"worker-{name}.log").read_text()
            assert any(fid in text for fid in {*first_runs.values(), *ledger.values()}), name

        # The same suite on the local executor gives the same table.
        _run([str(BIN / "icd"), "benchmark", str(suite), "--id", "here",
              "--set", f"storage.root={root}"], env)  # fmt: skip
        assert_frame_equal(_comparison(root, "fan"), _comparison(root, "here"))
    finally:
        if parent is not None:
            kill_tree(parent)
        for w in workers.values():
            stop(w)
        stop(server)
