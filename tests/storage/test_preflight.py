"""Storage and resume mistakes are one-line errors, rc != 0, within seconds, before any
model is loaded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icd.cli import app
from icd.config import load_config
from icd.storage import preflight
from icd.storage.runstate import RunState, resume_fingerprint

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through file modes; /sys refuses new entries
        return Path("/sys/icd-root")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "root"


CASES = {
    "root under a file": (lambda t: [f"storage.root={t / 'file' / 'root'}"], "storage.root"),
    "read-only root": (lambda t: [f"storage.root={_read_only_folder(t)}"], "storage.root"),
    "unreachable tracking URI": (
        lambda t: [f"storage.root={t}", f"storage.tracking_uri=http://127.0.0.1:{_closed_port()}"],
        "storage.tracking_uri",
    ),
    "unreachable pool URI": (
        lambda t: [f"storage.root={t}", "storage.pool_uri=s3://icd-no-such-bucket/pool"],
        "storage.pool_uri",
    ),
    "pool URI under a file": (
        lambda t: [f"storage.root={t}", f"storage.pool_uri={t / 'file' / 'pool'}"],
        "storage.pool_uri",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_storage_mistakes_are_one_line_errors_within_seconds(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(preflight, "CONNECT_TIMEOUT_S", 1.0)
    sets, key = CASES[case]
    args = ["run", "--no-progress", *[a for s in sets(tmp_path) for a in ("--set", s)]]
    t0 = time.perf_counter()
    out = runner.invoke(app, args)
    assert time.perf_counter() - t0 < 10
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.output, out.output
    assert lines[0].startswith("error:") and key in lines[0]


def test_resume_with_a_changed_config_is_a_one_line_error(tmp_path: Path) -> None:
    """As a user runs it (a real process: Prefect's own logging would show a traceback)."""
    before = load_config("smoke", overrides=[f"storage.root={tmp_path}"])
    RunState(before.storage.results_dir("nightly")).check_config(resume_fingerprint(before))
    cmd = [sys.executable, "-m", "icd.cli", "run", "--no-progress", "--run-id", "nightly"]
    cmd += ["--set", f"storage.root={tmp_path}", "--set", "method.policy.budget=0.2"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 15
    assert out.returncode == 2
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and "different configuration" in lines[0], out.stderr
