"""Test-session environment: one Prefect home per test process (each pytest-xdist worker has
its own), one fixture cache, offline Hugging Face; the order in which `make test` runs files."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".icd" / "test-state"

# Set before anything imports prefect or transformers. Under pytest-xdist the controller
# imports this file first and its workers inherit its environment: each worker replaces the
# values the controller chose here (not ones the caller set) with its own, so two workers
# never share one Prefect database or one task-result cache.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... in an xdist worker
_OURS = "ICD_TEST_ENV_DEFAULTS"  # the variables this file chose, for the workers to redo
_inherited = set(filter(None, os.environ.get(_OURS, "").split(",")))
_chosen: set[str] = set()


def _default(key: str, value: str) -> None:
    if key not in os.environ or key in _inherited:
        os.environ[key] = value
        _chosen.add(key)


PREFECT_HOME = STATE / (f"prefect-home-{WORKER}" if WORKER else "prefect-home")
_default("PREFECT_HOME", str(PREFECT_HOME))
# Task results (the cross-run cache) start empty in every test session (and worker).
_default("PREFECT_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="icd-prefect-results-"))
os.environ[_OURS] = ",".join(sorted(_chosen | _inherited))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("ICD_FIXTURES", str(REPO / ".icd" / "fixtures"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)


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


# The longest files first (seconds each took on one of two workers, on 2 cores): under
# `pytest -n 2 --dist loadfile` (`make test`) each file runs whole on one worker in this order,
# so the long ones start at once and the many short ones fill in around them instead of
# leaving one worker idle at the end.
LONGEST_FIRST = (
    "tests/pipeline/test_fanout.py",  # 155: a Prefect server, two workers, a kill, a rerun
    "tests/pipeline/test_stream.py",  # 130
    "tests/test_openai_student.py",  # 95
    "tests/pipeline/test_pool_curation.py",  # 65
    "tests/pipeline/test_miniworld.py",  # 50
    "tests/test_concurrency.py",  # 50
    "tests/models/test_miniworld.py",  # 45
    "tests/pipeline/test_deployment.py",  # 45: a Prefect server, a worker, a deployed run
    "tests/pipeline/test_scale.py",  # 37
    "tests/test_benchmark_flow.py",  # 22
    "tests/bench/test_bench_smoke.py",  # 17
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not WORKER:  # one process: keep pytest's own order
        return
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
