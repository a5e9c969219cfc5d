"""Test-session environment: one Prefect home, one fixture cache, offline Hugging Face."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
