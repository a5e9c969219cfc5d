"""What a user sees in the MLflow UI for a finished run, read through the UI server's own
REST API (a real `mlflow ui` on loopback): the run named after the ICD run, its key
metrics once each, the plots and HTML report, the resolved config, a previewable
predictions table and a description."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from icd.config import load_config
from icd.flows.stream import stream
from tests.loopback import free_port, start, stop, wait_healthy

pytestmark = pytest.mark.slow


def test_a_finished_run_shows_its_results_in_the_mlflow_ui(tmp_path: Path) -> None:
    cfg = load_config(
        "smoke", overrides=[f"storage.root={tmp_path}", "data.limit=48", "pipeline.chunk_size=16"]
    )
    summary = stream(config_json=cfg.model_dump_json(), run_id="ui-run")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tmp_path / "mlflow-ui.log"
    server = start(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env, log,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, log, timeout=90)
        exp = httpx.get(f"{api}/experiments/get-by-name", params={"experiment_name": "icd"})
        runs = httpx.post(
            f"{api}/runs/search",
            json={"experiment_ids": [exp.json()["experiment"]["experiment_id"]]},
        ).json()["runs"]
        (run,) = [r for r in runs if r["info"]["run_name"] == "ui-run"]
        rid = run["info"]["run_id"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        # The Overview tab leads with the run against its baselines on one axis: a picture
        # short enough that the UI does not fold it, served by the UI's own artifact route.
        note = tags["mlflow.note.content"]
        assert f"{summary['accuracy'] * 100:.1f}%" in note and "the student alone" in note
        src = re.search(r"!\[[^\]]*\]\((get-artifact\?[^)]+)\)", note)
        assert src and "headline_bars.png" in src.group(1), note
        picture = httpx.get(f"http://127.0.0.1:{port}/{src.group(1)}")
        assert picture.status_code == 200 and picture.content[:4] == b"\x89PNG"
        assert Image.open(io.BytesIO(picture.content)).height <= 80
        assert tags["mlflow.source.name"].startswith("icd/stream") and tags["mlflow.user"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["headline/accuracy"] == pytest.approx(summary["accuracy"])
        assert "headline/gain_from_icl" in metrics
        gain = httpx.get(
            f"{api}/metrics/get-history",
            params={"run_id": rid, "metric_key": "headline/gain_from_icl"},
        ).json()["metrics"]
        assert len(gain) > 1  # a curve over the stream, not a one-dot chart
        assert not any(k.startswith("summary.") for k in metrics)

        def listed(path: str = "") -> set[str]:
            params = {"run_id": rid, **({"path": path} if path else {})}
            files = httpx.get(f"{api}/artifacts/list", params=params).json().get("files", [])
            return {f["path"] for f in files}

        top = listed()
        assert {"config.json", "predictions.parquet", "predictions_table.json"} <= top, top
        report = listed("report")
        assert {"report/report.html", "report/running.png", "report/uncertainty.png"} <= report
        # the run against its baselines, among the run's charts (a stepped image)
        assert any("accuracy_vs_baselines" in p for p in listed("images"))
    finally:
        stop(server)
