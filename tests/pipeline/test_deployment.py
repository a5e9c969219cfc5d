"""The deployment loop users run: a real Prefect server (SQLite) + process worker on loopback,
`prefect deploy --all`, `prefect deployment run icd/stream`, results in MLflow, and the
nightly cron schedule producing scheduled runs.

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
import mlflow
import pytest

from tests.loopback import REPO, free_port, start, stop, wait_healthy

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

PREFECT = str(Path(sys.executable).parent / "prefect")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> str:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_deploy_run_and_schedule(tmp_path: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    root = tmp_path / "icd"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        # The scheduler's loop (60 s by default), shortened so the test need not wait a minute.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    }
    server = start(
        [
            PREFECT,
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-ui",
            "--analytics-off",
        ],
        env,
        tmp_path / "server.log",
    )
    worker = None
    try:
        wait_healthy(f"{api}/health", server, tmp_path / "server.log")

        _run([PREFECT, "work-pool", "create", "icd", "--type", "process", "--overwrite"], env)
        _run([PREFECT, "--no-prompt", "deploy", "--all"], env)
        # The nightly deployment's cron schedule produced Scheduled flow runs. (This needs
        # SQLAlchemy < 2.1: with 2.1 the scheduler silently creates none.)
        deadline = time.time() + 90
        scheduled: list = []
        while time.time() < deadline:
            deps = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
            nightly = [d for d in deps if d["name"] == "nightly"]
            assert nightly and nightly[0]["schedules"], "nightly deployment has no schedule"
            scheduled = httpx.post(
                f"{api}/flow_runs/filter",
                json={
                    "deployments": {"id": {"any_": [nightly[0]["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                },
                timeout=10,
            ).json()
            if scheduled:
                break
            time.sleep(5)
        assert scheduled, "the scheduler created no run for the nightly cron schedule"
        worker = start(
            [PREFECT, "worker", "start", "--pool", "icd", "--install-policy", "never"],
            env,
            tmp_path / "worker.log",
        )
        params = {
            "preset": "smoke",
            "overrides": ["data.limit=48", "pipeline.chunk_size=16", f"storage.root={root}"],
            "run_id": "deployed-run",
        }
        out = subprocess.run(
            [
                PREFECT,
                "deployment",
                "run",
                "icd/stream",
                "--params",
                json.dumps(params),
                "--watch",
                "--watch-timeout",
                "300",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        logs = (tmp_path / "worker.log").read_text()[-4000:]
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\nworker:\n{logs}"
        assert "Completed" in out.stdout + out.stderr

        # Results and lineage landed in MLflow, tagged with the Prefect flow-run id.
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        runs = mlflow.search_runs(
            experiment_names=["icd"], filter_string="tags.`icd.run_id` = 'deployed-run'"
        )
        assert len(runs) == 1
        assert runs.iloc[0]["tags.prefect.flow_run_id"] not in ("", "none")
        assert runs.iloc[0]["status"] == "FINISHED"
        assert (root / "runs" / "deployed-run" / "predictions.parquet").exists()

        # The Prefect UI shows the run under its ICD run id, tagged, with its artifacts: a
        # progress bar at 100 %, the headline against the same-run baselines, the summary.
        flow_runs = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"name": {"any_": ["deployed-run"]}}},
            timeout=10,
        ).json()
        assert len(flow_runs) == 1, [r["name"] for r in flow_runs]
        assert {"icd", "mode:icd", "dataset:shapes"} <= set(flow_runs[0]["tags"])
        arts = httpx.post(
            f"{api}/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [flow_runs[0]["id"]]}}},
            timeout=10,
        ).json()
        by_type = {a["type"]: a for a in arts}
        assert {"progress", "markdown", "table"} <= set(by_type), [a["type"] for a in arts]
        assert float(by_type["progress"]["data"]) == 100.0
        headline = by_type["markdown"]["data"]
        assert "forwarding the teacher's labels" in headline and "the student alone" in headline
        table = json.loads(by_type["table"]["data"])
        assert {"metric": "run_id", "value": "deployed-run"} in table
        values = {row["metric"]: row["value"] for row in table}
        assert values["accuracy"].endswith(" %")  # the headline's units, not raw fractions
        assert values["gain_from_icl"].endswith(" pts")
        tasks = httpx.post(
            f"{api}/task_runs/filter",
            json={"flow_runs": {"id": {"any_": [flow_runs[0]["id"]]}}},
            timeout=10,
        ).json()
        assert "icl-chunk0" in {t["name"] for t in tasks}

    finally:
        if worker is not None:
            stop(worker)
        stop(server)
