"""Reports: running curves and comparison tables, HTML pages, target resolution, rich output."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from icd.method.accounting import RunSummary
from icd.report import (
    BENCHMARK_FILE,
    COMPARISON_FILE,
    RUNS_FILE,
    ReportError,
    build_report,
    print_summary,
    resolve_target,
)
from icd.report.tables import comparison_table, running_curves, runs_table, summary_row, to_markdown
from tests.report import PREDICTION_COLUMNS, assert_png, make_predictions, write_run

# ---------------------------------------------------------------------------- tables


def test_running_curves_hand_computed():
    preds = pl.DataFrame(
        {
            "chunk": [0, 0, 0, 1, 1, 2],
            "skip_reason": [None, "bad image", None, None, None, None],
            "score": [1.0, None, 0.0, 1.0, 1.0, 0.0],
            "queried": [True, False, False, True, False, False],
            "accepted": [True, False, False, False, False, False],
        }
    )
    c = running_curves(preds)
    assert c.get_column("chunk").to_list() == [0, 1, 2]
    assert c.get_column("samples_seen").to_list() == [3, 5, 6]
    assert c.get_column("valid_seen").to_list() == [2, 4, 5]
    assert c.get_column("chunk_accuracy").to_list() == [0.5, 1.0, 0.0]
    assert c.get_column("running_accuracy").to_list() == pytest.approx([0.5, 0.75, 0.6])
    assert c.get_column("pool_size").to_list() == [1, 1, 1]
    # queried / all rows so far (skipped ones too), as the budget counts them
    assert c.get_column("annotation_rate").to_list() == pytest.approx([1 / 3, 2 / 5, 2 / 6])


def test_running_curves_unsorted_chunks_and_empty():
    preds = make_predictions(n=100, chunk_size=10, seed=3)
    shuffled = preds.sample(fraction=1.0, shuffle=True, seed=1)
    assert running_curves(shuffled).equals(running_curves(preds))
    assert running_curves(preds.clear()).height == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # chunk
            st.one_of(st.none(), st.sampled_from([0.0, 0.3, 1.0])),  # score (None = skipped)
            st.booleans(),  # queried
            st.booleans(),  # accepted (only counts when queried)
        ),
        min_size=1,
        max_size=60,
    )
)
def test_running_curves_properties(rows):
    preds = pl.DataFrame(
        {
            "chunk": [r[0] for r in rows],
            "skip_reason": [None if r[1] is not None else "skipped" for r in rows],
            "score": [r[1] for r in rows],
            "queried": [r[2] and r[1] is not None for r in rows],
            "accepted": [r[2] and r[3] and r[1] is not None for r in rows],
        },
        schema_overrides={"score": pl.Float64},
    )
    c = running_curves(preds)
    last = c.row(-1, named=True)
    scores = [r[1] for r in rows if r[1] is not None]
    assert last["samples_seen"] == len(rows)
    assert last["pool_size"] == preds.get_column("accepted").sum()
    if scores:
        assert last["running_accuracy"] == pytest.approx(float(np.mean(scores)))
    assert last["annotation_rate"] == pytest.approx(preds.get_column("queried").sum() / len(rows))
    if not scores:
        assert last["running_accuracy"] is None
    assert all(np.diff(c.get_column("pool_size").to_numpy()) >= 0)
    assert all(0.0 <= r <= 1.0 for r in c.get_column("annotation_rate").drop_nulls())
    assert sorted(c.get_column("chunk").to_list()) == c.get_column("chunk").to_list()


def _runs() -> pl.DataFrame:
    rows = []
    for seed, (acc, rate) in enumerate([(0.50, 0.10), (0.60, 0.12), (0.70, 0.08)]):
        rows.append(
            summary_row(
                {"dataset": "shapes", "variant": "icd", "mode": "icd", "budget": 0.1, "seed": seed},
                RunSummary.from_json({"run_id": f"icd-{seed}", "samples": 64, "accuracy": acc, "annotation_rate": rate,
                 "teacher_calls": 30 + seed, "seconds": {"embed": 1.0, "icl": 2.0}}),
            )
        )  # fmt: skip
    rows.append(
        summary_row(
            {
                "dataset": "shapes",
                "variant": "student_zero_shot",
                "mode": "student_zero_shot",
                "budget": None,
                "seed": 0,
            },
            RunSummary.from_json(
                {
                    "run_id": "zs-0",
                    "samples": 64,
                    "accuracy": 0.25,
                    "annotation_rate": 0.0,
                    "demo_accuracy": None,
                }
            ),
        )
    )
    rows.append(
        summary_row(
            {"dataset": "shapes", "variant": "icd", "mode": "icd", "budget": 0.1, "seed": 9},
            None,
            run_id="icd-9",
            error="RuntimeError: boom",
        )
    )
    return runs_table(rows)


def test_comparison_table_mean_std_over_seeds():
    table = comparison_table(_runs())
    assert table.height == 2  # the failed run is left out, zero-shot is its own row
    icd = table.row(0, named=True)
    assert (icd["variant"], icd["budget"], icd["seeds"]) == ("icd", 0.1, 3)
    assert icd["accuracy_mean"] == pytest.approx(0.6)
    assert icd["accuracy_std"] == pytest.approx(np.std([0.5, 0.6, 0.7], ddof=1))
    assert icd["annotation_rate_mean"] == pytest.approx(0.1)
    assert icd["teacher_calls_mean"] == pytest.approx(31)
    assert icd["seconds_mean"] == pytest.approx(3.0)
    zs = table.row(1, named=True)
    assert zs["budget"] is None and zs["seeds"] == 1
    assert zs["accuracy_std"] is None and zs["demo_accuracy_mean"] is None


def test_markdown_table():
    md = to_markdown(comparison_table(_runs()))
    lines = md.strip().splitlines()
    assert len(lines) == 4  # header, rule, two settings
    assert "| shapes | icd | 0.1 | 3 |" in md
    assert "60.0 ± 10.0" in md  # accuracy in %
    assert "| shapes | student_zero_shot | – | 1 |" in md
    assert "25.0 |" in md  # one seed: no ± part


# ---------------------------------------------------------------------------- run reports

SUMMARY = {
    "mode": "icd",
    "dataset": "shapes",
    "samples": 96,
    "skipped": 0,
    "accuracy": 0.734375,
    "zs_accuracy": 0.3125,
    "annotation_rate": 0.15625,
    "queried": 15,
    "accepted": 11,
    "teacher_calls": 75,
    "teacher_errors": 0,
    "pool_size": 11,
    "mean_agreement": 0.8,
    "demo_accuracy": 0.42,
    "seconds": {"embed": 1.5, "score": 2.25},
}
CONFIG = {
    "method": {"mode": "icd", "policy": {"budget": 0.15}, "voting": {"a_min": 0.6}},
    "seed": 1234567,
}


def _images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_run_report(tmp_path):
    run_dir = write_run(tmp_path, make_predictions(run_id="run-7", n=96), SUMMARY, CONFIG)
    paths = build_report("run-7", tmp_path)
    assert paths.kind == "run" and paths.source == run_dir
    assert set(paths.plots) == {"headline", "headline_bars", "running", "uncertainty", "agreement"}
    for p in paths.plots.values():
        assert p.parent == run_dir / "report"
        assert_png(p)
    page = paths.html.read_text()
    assert paths.html == run_dir / "report" / "report.html"
    for text in ("73.44 %", "31.25 %", "15.62 %", "run-7", "seconds.score", "2.25 s", "1234567"):
        assert text in page, text
    images = _images(page)
    assert len(images) == 3
    for data in images:
        assert_png(data)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert paths.summary.accuracy == SUMMARY["accuracy"]


def test_run_report_from_folder_path_without_summary(tmp_path):
    """A run folder given by path, with no summary.json: the summary is computed."""
    run_dir = write_run(tmp_path, make_predictions(run_id="run-8", n=40), SUMMARY)
    (run_dir / "summary.json").unlink()
    paths = build_report(str(run_dir), tmp_path / "elsewhere")
    assert paths.kind == "run"
    assert len(_images(paths.html.read_text())) == 3


def test_run_report_degenerate_run(tmp_path):
    """A run with nothing queried and every sample skipped still gets a full report."""
    preds = make_predictions(run_id="run-9", n=20, query_rate=0.0, skip_every=1)
    write_run(
        tmp_path, preds, SUMMARY | {"accuracy": None}, {"method": {"mode": "student_zero_shot"}}
    )
    paths = build_report("run-9", tmp_path)
    for data in _images(paths.html.read_text()):
        assert_png(data)


# ---------------------------------------------------------------------------- benchmark reports


def _write_benchmark(root, bench_id: str, started: str, name: str = "nightly"):
    folder = root / "benchmarks" / bench_id
    folder.mkdir(parents=True)
    rows = []
    for seed in (0, 1):
        for variant, budget in (("icd", 0.1), ("icd", 0.2), ("student_zero_shot", None)):
            preds = make_predictions(
                run_id=f"{bench_id}-{variant}-{budget}-{seed}", n=64, seed=seed
            )
            acc = float(preds.get_column("score").mean())
            run_dir = write_run(root, preds, SUMMARY | {"accuracy": acc})
            rows.append(
                summary_row(
                    {"dataset": "shapes", "variant": variant, "mode": variant, "budget": budget, "seed": seed},
                    RunSummary.from_json({"run_id": run_dir.name, "run_dir": str(run_dir), "mlflow_run_id": f"ml{seed}",
                     "accuracy": acc, "annotation_rate": budget or 0.0, "samples": 64}),
                )
            )  # fmt: skip
    runs = runs_table(rows)
    runs.write_parquet(folder / RUNS_FILE)
    comparison_table(runs).write_parquet(folder / COMPARISON_FILE)
    info = {"benchmark_id": bench_id, "suite": {"name": name, "limit": 64}, "started": started,
            "parent_mlflow_run_id": "parent-123"}  # fmt: skip
    (folder / BENCHMARK_FILE).write_text(json.dumps(info))
    return folder, comparison_table(runs)


def test_benchmark_report(tmp_path):
    folder, table = _write_benchmark(tmp_path, "nightly-20260101-020000", "2026-01-01T02:00:00")
    paths = build_report("nightly-20260101-020000", tmp_path)
    assert paths.kind == "benchmark" and paths.source == folder
    assert set(paths.plots) == {"accuracy_vs_annotation", "running_shapes"}
    page = paths.html.read_text()
    icd = table.row(0, named=True)
    expected = f"{icd['accuracy_mean'] * 100:.1f} ± {icd['accuracy_std'] * 100:.1f}"
    assert expected in page
    assert "parent-123" in page
    images = _images(page)
    assert len(images) == 2
    for data in images:
        assert_png(data)
    assert paths.summary.equals(table)


def test_resolve_target(tmp_path):
    write_run(tmp_path, make_predictions(run_id="run-1", n=8), SUMMARY)
    old, _ = _write_benchmark(tmp_path, "nightly-a", "2026-01-01T02:00:00")
    new, _ = _write_benchmark(tmp_path, "nightly-b", "2026-01-02T02:00:00")
    assert resolve_target("run-1", tmp_path) == ("run", tmp_path.absolute() / "runs" / "run-1")
    assert resolve_target("nightly-a", tmp_path) == ("benchmark", old)
    assert resolve_target("nightly", tmp_path) == ("benchmark", new)  # suite name: the latest
    assert resolve_target(str(old), tmp_path / "other") == ("benchmark", old)
    with pytest.raises(ReportError, match="no run or benchmark 'nope'.*--root"):
        build_report("nope", tmp_path)


def test_print_summary():
    console = Console(record=True, width=200)
    print_summary(RunSummary.from_json(SUMMARY | {"run_id": "run-7"}), console=console)
    text = console.export_text()
    assert "run-7" in text and "73.44 %" in text and "seconds.embed" in text
    console = Console(record=True, width=250)
    print_summary(comparison_table(_runs()), console=console)
    text = console.export_text()
    assert "60.0 ± 10.0" in text and "student_zero_shot" in text
    console = Console(record=True, width=250)
    print_summary(pl.DataFrame({"run_id": ["a"], "accuracy": [0.5]}), console=console)
    assert "50.00 %" in console.export_text()


def test_prediction_columns_match_contract():
    """The synthetic frames carry exactly the CONTRACTS.md predictions columns."""
    assert list(make_predictions(n=3).columns) == list(PREDICTION_COLUMNS)


def test_cli_report_finds_runs_under_the_configured_root(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from icd.cli import app

    root = tmp_path / "elsewhere"
    write_run(root, make_predictions(run_id="run-9", n=32), SUMMARY, CONFIG)
    monkeypatch.chdir(tmp_path)  # ./.icd holds no such run
    runner = CliRunner()
    missing = runner.invoke(app, ["report", "run-9"])
    assert missing.exit_code == 2 and "no run or benchmark 'run-9'" in missing.output
    found = runner.invoke(app, ["report", "run-9", "--set", f"storage.root={root}"])
    assert found.exit_code == 0, found.output
    assert (root / "runs" / "run-9" / "report" / "report.html").exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage: {{root: {root}}}\n")
    assert runner.invoke(app, ["report", "run-9", "--config", str(cfg)]).exit_code == 0
