"""``icd bench fanout``: a suite's wall time on a work pool of 1 worker against 2 workers.

Starts a real Prefect server on loopback (a temporary ``PREFECT_HOME``), creates a process
work pool, deploys ``icd/stream`` from the project folder, then for each worker count starts
that many process workers (one cell at a time each, like one worker per GPU) and runs the
same suite with ``benchmark.executor=deployments`` on a fresh storage root (nothing cached),
timing the parent from start to its comparison table. The ratio is the 2-worker wall time
over the 1-worker one, measured in the same bench; on a machine with fewer free cores than
workers the cells compete for CPU and the ratio says how much of the fan-out survives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import icd
from icd.bench.loopback import free_port, start, stop, wait_healthy

PROJECT = Path(icd.__file__).resolve().parents[1]  # where prefect.yaml is
BIN = Path(sys.executable).parent


def _suite(cells: int, limit: int) -> str:
    seeds = list(range(max(1, cells // 2)))
    return (
        "name: fanout-bench\nbase_preset: smoke\ndatasets: [shapes]\n"
        f"modes: [student_zero_shot, icd]\nbudgets: [0.08]\nseeds: {seeds}\nlimit: {limit}\n"
    )


def _check(cmd: list[str], env: dict[str, str]) -> None:
    out = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def run_fanout_bench(*, cells: int = 4, limit: int = 256) -> list[dict[str, Any]]:
    """Wall seconds of one suite of ``cells`` smoke streams of ``limit`` samples on 1 and on
    2 workers; one row per worker count, with the ratio to 1 worker."""
    if not (PROJECT / "prefect.yaml").exists():
        raise RuntimeError(f"no prefect.yaml in {PROJECT}: run the bench from a source checkout")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="icd-fanout-") as tmp:
        work = Path(tmp)
        suite = work / "suite.yaml"
        suite.write_text(_suite(cells, limit))
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_API_URL": api,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        server = start(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(port), "--no-ui", "--analytics-off"],
            env, work / "server.log", cwd=PROJECT,
        )  # fmt: skip
        try:
            wait_healthy(f"{api}/health", server, work / "server.log", timeout=180)
            _check(
                [str(BIN / "prefect"), "work-pool", "create", "icd-bench", "--type", "process"], env
            )
            _check(
                [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "stream",
                 "--pool", "icd-bench"],
                env,
            )  # fmt: skip
            for n in (1, 2):
                workers = [
                    start(
                        [
                            str(BIN / "prefect"),
                            "worker",
                            "start",
                            "--pool",
                            "icd-bench",
                            "--limit",
                            "1",
                            "--install-policy",
                            "never",
                        ],
                        env,
                        work / f"worker-{n}-{i}.log",
                        cwd=PROJECT,
                    )
                    for i in range(n)
                ]
                try:
                    began = time.perf_counter()
                    _check(
                        [str(BIN / "icd"), "benchmark", str(suite), "--id", f"w{n}",
                         "--set", "benchmark.executor=deployments",
                         "--set", "benchmark.poll_s=1",
                         "--set", f"benchmark.max_parallel={n}",
                         "--set", f"storage.root={work / f'root-{n}'}"],
                        env,
                    )  # fmt: skip
                    wall = time.perf_counter() - began
                finally:
                    for w in workers:
                        stop(w)
                rows.append({"workers": n, "cells": cells, "samples": limit, "wall_s": wall})
        finally:
            stop(server)
    for row in rows:
        row["ratio"] = row["wall_s"] / rows[0]["wall_s"]
    return rows


def print_fanout_bench(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    table = Table(title="suite wall time on a work pool (ratio: vs 1 worker, same bench)")
    for col in ("workers", "cells", "samples/cell", "wall s", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["workers"]),
            str(r["cells"]),
            str(r["samples"]),
            f"{r['wall_s']:.1f}",
            f"{r['ratio']:.2f}×",
        )
    (console or Console()).print(table)
