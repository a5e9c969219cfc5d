"""`icd runs` and `icd report latest` on real smoke run folders (the session's
``smoke_runs``: two finished runs and one stopped after its first chunk)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from icd import cli
from icd.report import resolve_target
from icd.report.runs import RunListing, latest_run, list_runs, read_run, runs_rich_table
from icd.report.tables import fmt_pct
from tests.report import make_predictions, write_run

pytestmark = pytest.mark.slow
runner = CliRunner()


def _invoke(monkeypatch: pytest.MonkeyPatch, *args: str, width: int = 100) -> str:
    """Run the CLI with its console at ``width`` columns; returns what it printed."""
    console = Console(record=True, width=width, force_terminal=False)
    monkeypatch.setattr(cli, "console", console)
    out = runner.invoke(cli.app, list(args))
    assert out.exit_code == 0, out.output
    return console.export_text()


def _summary(root: Path, run_id: str) -> dict:
    return json.loads((root / "runs" / run_id / "summary.json").read_text())


def test_list_runs_reads_finished_and_stopped_runs(smoke_runs: Path) -> None:
    runs = list_runs(smoke_runs)
    assert [r.run_id for r in runs] == ["stopped", "newer", "older"]
    stopped, newer, older = runs
    assert (older.mode, newer.mode, stopped.mode) == ("student_zero_shot", "icd", "icd")
    assert {r.dataset for r in runs} == {"shapes"}
    assert older.finished and newer.finished and not stopped.finished
    # The stopped run: one committed chunk of 32 out of the 96 its config asked for, and
    # the running numbers of that chunk's state.
    assert (stopped.chunks, stopped.samples, stopped.total, stopped.total_chunks) == (1, 32, 96, 3)
    state = json.loads((smoke_runs / "runs" / "stopped" / "state" / "chunk-00000.json").read_text())
    assert stopped.accuracy == state["running"]["accuracy"]
    assert stopped.annotation_rate == state["running"]["annotation_rate"]
    # Finished runs: the summary's numbers, and every chunk counted.
    summary = _summary(smoke_runs, "newer")
    assert (newer.accuracy, newer.annotation_rate) == (
        summary["accuracy"],
        summary["annotation_rate"],
    )
    assert (newer.chunks, newer.samples, newer.total, newer.total_chunks) == (2, 64, 64, 2)
    assert older.annotation_rate == 0.0
    assert list_runs(smoke_runs, limit=2) == runs[:2]
    assert latest_run(smoke_runs) == smoke_runs.absolute() / "runs" / "stopped"


def test_icd_runs_prints_newest_first_within_100_columns(
    smoke_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _invoke(monkeypatch, "runs", "--root", str(smoke_runs))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = {
        line.split()[0]: line
        for line in lines
        if line.split()[:1] in (["older"], ["newer"], ["stopped"])
    }
    assert list(rows) == ["stopped", "newer", "older"]
    newer = _summary(smoke_runs, "newer")
    assert "finished" in rows["newer"] and fmt_pct(newer["accuracy"]) in rows["newer"]
    assert fmt_pct(newer["annotation_rate"]) in rows["newer"]
    assert "student_zero_shot" in rows["older"]
    assert "1/3 chunks" in rows["stopped"] and "finished" not in rows["stopped"]
    assert "3 of 3 runs under" in text

    limited = _invoke(monkeypatch, "runs", "--root", str(smoke_runs), "--limit", "1")
    first_words = [line.split()[0] for line in limited.splitlines() if line.strip()]
    assert "stopped" in first_words and not {"newer", "older"} & set(first_words)
    assert "1 of 3 runs" in limited and "2 older not shown" in limited


def test_icd_report_latest_reports_the_newest_run(
    smoke_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _invoke(monkeypatch, "report", "latest", "--root", str(smoke_runs), width=200)
    html = smoke_runs / "runs" / "stopped" / "report" / "report.html"
    assert str(html) in text and html.exists()
    assert "stopped" in text


def test_icd_runs_on_an_empty_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _invoke(monkeypatch, "runs", "--root", str(tmp_path))
    assert "no runs under" in text and str(tmp_path) in text


def test_a_run_named_latest_wins_over_the_newest(tmp_path: Path) -> None:
    write_run(tmp_path, make_predictions(run_id="latest", n=8), {"accuracy": 0.5})
    write_run(tmp_path, make_predictions(run_id="newest", n=8), {"accuracy": 0.5})
    assert resolve_target("latest", tmp_path) == ("run", tmp_path.absolute() / "runs" / "latest")
    (tmp_path / "runs" / "empty").mkdir()  # no config, summary or state: not a run
    assert read_run(tmp_path / "runs" / "empty") is None
    assert {r.run_id for r in list_runs(tmp_path)} == {"latest", "newest"}


def _listing(run_id: str, dataset: str, **kw: object) -> RunListing:
    fields: dict = dict(
        run_id=run_id,
        folder=Path("/x"),
        mode="student_zero_shot",
        dataset=dataset,
        finished=True,
        chunks=32,
        samples=1000,
        total=1000,
        total_chunks=32,
        accuracy=0.5,
        annotation_rate=0.0,
        when=datetime(2026, 1, 1),
    )
    return RunListing(**(fields | kw))


def test_runs_table_keeps_long_ids_whole_and_gives_way_on_the_mode() -> None:
    now = datetime(2026, 1, 2, 12, 0)
    long_id = "nightly--flowers102--student_zero_shot--all--s2"
    runs = [
        _listing(long_id, "flowers102", finished=False, chunks=12, samples=384,
                 accuracy=0.4567, annotation_rate=0.0412, when=now - timedelta(minutes=5)),
        _listing("cub-icd", "cub200", mode="icd", when=now - timedelta(days=3)),
    ]  # fmt: skip
    console = Console(record=True, width=100)
    console.print(runs_rich_table(runs, now=now, width=100))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert long_id in text and "cub-icd" in text  # never cut or folded
    for cell in ("12/32 chunks", "45.7%", "4.1%", "5m ago", "3d ago", "finished"):
        assert cell in text
    assert "st…" in text  # the mode gave way
    wide = Console(record=True, width=140)
    wide.print(runs_rich_table(runs, now=now, width=140))
    assert "  student_zero_shot  flowers102  " in wide.export_text()
