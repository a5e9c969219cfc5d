"""Honest accounting and housekeeping: teacher answers made vs reused, the budget's
denominator, pool provenance, compaction at the end of a run."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from icd.storage.pool import DemoPool
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
    return client.get_metric_history(run.info.run_id, key)[-1].value


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
