"""Test-session environment: one Prefect home, one fixture cache, offline Hugging Face."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".icd" / "test-state"

# Set before anything imports prefect or transformers.
os.environ.setdefault("PREFECT_HOME", str(STATE / "prefect-home"))
# Task results (the cross-run cache) start empty in every test session.
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="icd-prefect-results-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("ICD_FIXTURES", str(REPO / ".icd" / "fixtures"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
(STATE / "prefect-home").mkdir(parents=True, exist_ok=True)


class _Stop(RuntimeError):
    """Raised from a chunk hook to leave a run unfinished after its first chunk."""


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root holding three real smoke runs, oldest first: ``older`` (student
    zero-shot, 64 samples, finished), ``newer`` (icd, 64 samples, finished) and ``stopped``
    (icd over 96 samples, stopped after its first committed chunk of 32). Built once per
    session; tests must not write into it beyond report folders."""
    from icd.config import load_config
    from icd.flows import stream as stream_mod

    root = tmp_path_factory.mktemp("smoke-runs")

    def run(run_id: str, *sets: str) -> None:
        cfg = load_config(
            "smoke", overrides=[f"storage.root={root}", "pipeline.chunk_size=32", *sets]
        )
        stream_mod.stream(config_json=cfg.model_dump_json(), run_id=run_id)

    run("older", "data.limit=64", "method.mode=student_zero_shot")
    time.sleep(1.1)  # distinct modification times, whatever the file system's resolution
    run("newer", "data.limit=64")
    time.sleep(1.1)

    def stop(chunks: int, samples: int, total: int | None) -> None:
        raise _Stop(f"stopped after chunk {chunks}")

    stream_mod.CHUNK_HOOKS.append(stop)
    try:
        with pytest.raises(_Stop):
            run("stopped", "data.limit=96")
    finally:
        stream_mod.CHUNK_HOOKS.remove(stop)
    return root
