"""The run's headline (terminal and Prefect artifact): the same-run baselines with the
difference in points, and only what applies to the mode."""

from __future__ import annotations

from rich.console import Console

from icd.flows.artifacts import artifact_key, headline, mlflow_run_url
from icd.method.accounting import RunSummary
from icd.report import print_headline

ICD = {
    "run_id": "r1", "mode": "icd", "dataset": "shapes", "samples": 512, "skipped": 5,
    "accuracy": 0.42, "zs_accuracy": 0.30, "forward_accuracy": 0.37, "queried": 39,
    "accepted": 35, "teacher_calls": 195, "annotation_rate": 0.076, "demo_accuracy": 0.12,
    "gain_from_icl": 0.05, "gain_from_teacher_labels": 0.07, "seconds": {"icl": 2.0, "score": 1.0},
}  # fmt: skip


def _printed(summary: dict) -> str:
    console = Console(record=True, width=100)
    print_headline(RunSummary.from_json(summary), console=console)
    return console.export_text()


def test_the_terminal_headline_shows_the_baselines_in_points_and_hides_what_does_not_apply():
    text = _printed(ICD)
    assert "42.0%" in text and "30.0%  (+12.0 points)" in text and "37.0%  (+5.0 points)" in text
    assert "39 queried" in text and "3.0 s" in text and "(5 skipped)" in text
    zs = _printed({"run_id": "r2", "mode": "student_zero_shot", "dataset": "shapes",
                   "samples": 512, "accuracy": 0.3, "queried": 0, "demo_accuracy": None})  # fmt: skip
    assert "teacher labelled" not in zs and "demos of" not in zs and "points" not in zs


def test_the_prefect_headline_names_the_baselines_and_links_mlflow_only_for_a_server():
    md = headline(
        RunSummary.from_json(ICD), mlflow_url="http://mlflow:5000/#/experiments/1/runs/abc"
    )
    assert "| **this run (icd)** | **42.0%** |" in md
    assert "| forwarding the teacher's labels, no ICL | 37.0% |" in md
    assert "+5.0 pts" in md and "](http://mlflow:5000/#/experiments/1/runs/abc)" in md
    assert mlflow_run_url("sqlite:///x.db", experiment_id="1", run_id="abc") is None
    assert mlflow_run_url("http://m:5000/", experiment_id="1", run_id="abc") == (
        "http://m:5000/#/experiments/1/runs/abc"
    )
    assert artifact_key("Smoke_Run 1--shapes") == "smoke-run-1--shapes"
