"""Honest accounting and housekeeping: teacher answers made vs reused, the budget's
denominator, pool provenance, compaction at the end of a run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import polars as pl
import pytest

from icd.storage.pool import DemoPool
from icd.storage.tracking import metric_key
from tests.pipeline.test_stream import _ledger_calls, _pool_rows, _run

pytestmark = pytest.mark.slow

SETS = (
    "data.limit=64",
    "pipeline.chunk_size=16",
    "models.teacher.backend=oracle",
    "models.teacher.noise=0.2",
    "method.policy.budget=0.25",
    "method.voting.n=3",
    "seed=31",
)


def _last(client: mlflow.MlflowClient, root: Path, run_id: str, key: str) -> float:
    exp = client.get_experiment_by_name("icd").experiment_id
    (run,) = client.search_runs([exp], f"tags.`icd.run_id` = '{run_id}'")
    return client.get_metric_history(run.info.run_id, metric_key(key))[-1].value


def test_cached_teacher_answers_are_not_counted_as_calls(tmp_path: Path) -> None:
    first = _run(tmp_path, "first", *SETS)
    second = _run(tmp_path, "second", *SETS)  # same data and config: every stage cached
    assert first["queried"] > 0 and first["queried"] == second["queried"]
    used = 3 * first["queried"]
    assert first["teacher_calls"] == used and first["teacher_calls_reused"] == 0
    assert second["teacher_calls"] == 0 and second["teacher_requests"] == 0
    assert second["teacher_calls_reused"] == second["teacher_answers_used"] == used
    assert sum(_ledger_calls(Path(second["run_dir"])).values()) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _last(client, tmp_path, "second", "teacher_calls") == 0
    assert _last(client, tmp_path, "second", "teacher_calls_reused") == used
    # The annotation rate has the budget's denominator: every stream sample.
    assert second["annotation_rate"] == pytest.approx(second["queried"] / second["samples"])
    assert second["annotation_rate"] <= 0.25
    # Pool rows name the teacher that labelled them; short runs end compacted.
    pool = _pool_rows(tmp_path, "second")
    assert pool.height > 0 and set(pool["teacher"]) == {"oracle(noise=0.2)"}
    assert DemoPool(tmp_path / "pool").fragment_count() == 1


def test_every_number_is_the_same_in_the_summary_mlflow_and_the_report(tmp_path: Path) -> None:
    """One run's numbers, read where users read them: the summary file, the MLflow run (its
    final values and the last point of each running curve) and the HTML report's table."""
    import html
    import json
    import math
    import re

    from icd.report import _flat_summary, _fmt_value

    summary = _run(tmp_path, "same", *SETS)
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(summary["mlflow_run_id"]).data.metrics
    # the run against its same-run baselines, as an image among the run's charts
    images = [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "images")]
    assert any("accuracy_vs_baselines" in p for p in images), images
    flat = _flat_summary(summary)
    numbers = {
        k: v
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
    }
    assert {"accuracy", "annotation_rate", "teacher_calls", "gain_from_icl"} <= numbers.keys()
    for key, value in numbers.items():
        assert logged[metric_key(key)] == pytest.approx(value), key
    # the running curves end on the final numbers (one definition, per chunk and at the end)
    for key in ("accuracy", "zs_accuracy", "annotation_rate", "queried", "teacher_calls"):
        history = client.get_metric_history(summary["mlflow_run_id"], metric_key(key))
        last = max(history, key=lambda m: (m.step, m.timestamp))
        assert last.step == summary["samples"]
        assert last.value == pytest.approx(numbers[key]), key
    page = (run_dir / "report" / "report.html").read_text()
    shown = {
        html.unescape(k): html.unescape(v)
        for k, v in re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    }
    for key, value in flat.items():
        assert shown[key] == _fmt_value(key, value), key
    # a stage's counter reaches all three under its own name
    preds = pl.read_parquet(run_dir / "predictions.parquet")
    sent = preds["icl_prompt_tokens"].is_not_null().sum()
    assert summary["icl_prompts"] == logged["student_cost/icl_prompts"] == sent > 0
    assert shown["icl_prompts"] == str(sent)
