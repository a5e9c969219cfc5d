"""Simultaneous first runs on one fresh storage root: how many of them finish.

``python -m icd.bench.firstruns --rounds 5 --runs 4`` starts, in each round, ``runs``
``icd run --preset smoke`` processes at the same instant on a new storage root, a new
fixtures folder (``ICD_FIXTURES``) and a new ``PREFECT_HOME``, so every shared thing is
created by the racing runs themselves: the shapes dataset and its ``datasets`` cache,
Prefect's database, the MLflow SQLite store, the LanceDB pool and the task-result cache.
With ``--prebuilt`` the fixtures are built once before the runs start. Each run's exit
status, wall time and (on failure) its last error line are printed, then the count of
runs that finished.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1][:300]


def run_round(
    work: Path, runs: int, *, prebuilt: bool, extra: list[str], logs: Path | None = None
) -> list[dict[str, Any]]:
    """``runs`` smoke runs started together on fresh storage under ``work``; each run's
    output goes to ``logs/run-I.log`` when ``logs`` is given."""
    root, fixtures = work / "root", work / "fixtures"
    env = {
        **os.environ,
        "ICD_FIXTURES": str(fixtures),
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    if prebuilt:
        subprocess.run(
            [str(BIN / "icd"), "fixtures"], env=env, check=True, capture_output=True, cwd=work
        )
    sets = [f"storage.root={root}", *extra]
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [str(BIN / "icd"), "run", "--preset", "smoke", "--no-progress"]
            + ["--run-id", f"first-{i}", *args],
            env=env,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(runs)
    ]
    rows = []
    for i, p in enumerate(procs):
        out = p.communicate()[0]
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"run-{i}.log").write_text(out)
        rows.append(
            {
                "run": i,
                "rc": p.returncode,
                "seconds": round(time.perf_counter() - t0, 1),  # from the start, when reaped
                "error": "" if p.returncode == 0 else _last_error(out),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--prebuilt", action="store_true", help="build the fixtures first")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    parser.add_argument("--logs", type=Path, help="keep each run's output under LOGS/round-R")
    opts = parser.parse_args(argv)
    ok = total = 0
    for r in range(opts.rounds):
        with tempfile.TemporaryDirectory(prefix="icd-firstruns-") as tmp:
            logs = opts.logs / f"round-{r + 1}" if opts.logs else None
            rows = run_round(
                Path(tmp), opts.runs, prebuilt=opts.prebuilt, extra=opts.sets, logs=logs
            )
        for row in rows:
            total += 1
            ok += row["rc"] == 0
            status = "ok" if row["rc"] == 0 else f"FAILED rc={row['rc']}: {row['error']}"
            print(f"round {r + 1} run {row['run']}: {row['seconds']:6.1f}s {status}", flush=True)
    label = "prebuilt fixtures" if opts.prebuilt else "fixtures built by the runs"
    print(f"{ok} of {total} simultaneous first runs finished ({label})", flush=True)
    return 0 if ok == total else 1


if __name__ == "__main__":
    sys.exit(main())
