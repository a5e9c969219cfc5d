"""The stream flow end to end on the smoke fixtures: outputs, caching, faults, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lancedb
import mlflow
import polars as pl
import pytest

from icd.config import load_config
from icd.flows.stream import stream
from icd.models.base import Annotation, Annotations
from icd.tasks import adapt, annotate, embed, icl, pool, zero_shot

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _run(root: Path, run_id: str, *sets: str, **kw: Any) -> dict[str, Any]:
    cfg = load_config("smoke", overrides=[f"storage.root={root}", *sets])
    return stream(config_json=cfg.model_dump_json(), run_id=run_id, **kw)


def _pool_rows(root: Path, run_id: str) -> pl.DataFrame:
    tbl = lancedb.connect(str(root / "pool")).open_table("demos")
    return pl.from_arrow(tbl.to_arrow()).filter(pl.col("run_id") == run_id)


def _ledger_calls(run_dir: Path) -> Counter:
    path = run_dir / "teacher_calls.jsonl"
    calls: Counter = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            calls.update(json.loads(line)["sample_ids"])
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("e2e")
    summary = _run(
        root,
        "e2e",
        "data.limit=224",
        "pipeline.chunk_size=32",
        "pipeline.cache=false",
        "method.policy.budget=0.1",
    )
    return root, summary


def test_end_to_end_outputs(finished: tuple[Path, dict[str, Any]]) -> None:
    root, summary = finished
    run_dir = root / "runs" / "e2e"
    df = pl.read_parquet(run_dir / "predictions.parquet")
    assert df.height == 224 and df["sample_id"].n_unique() == 224
    assert df["stream_pos"].to_list() == list(range(224))
    # The fixture's corrupt images (every 100th) are recorded as skips, not lost.
    skipped = df.filter(pl.col("skip_reason").is_not_null())
    assert skipped.height == 2 and all(r.startswith("bad_image") for r in skipped["skip_reason"])
    assert summary["skipped"] == 2
    # Budget: at most 10% of the stream, warm-up included — and the teacher was asked.
    assert 0 < summary["queried"] <= int(0.1 * 224)
    assert summary["annotation_rate"] <= 0.1 * 224 / 222 + 1e-9
    assert summary["teacher_calls"] == 5 * summary["queried"]
    # The pool holds exactly the accepted annotations, once each.
    pool = _pool_rows(root, "e2e")
    accepted = df.filter(pl.col("accepted"))
    assert sorted(pool["sample_id"].to_list()) == sorted(accepted["sample_id"].to_list())
    assert pool["sample_id"].n_unique() == pool.height == summary["pool_size"]
    # Demos only ever come from earlier chunks' pool rows.
    chunk_of = dict(zip(pool["sample_id"], pool["chunk"], strict=True))
    for row in df.filter(pl.col("demo_ids").list.len() > 0).iter_rows(named=True):
        assert all(chunk_of[d] < row["chunk"] for d in row["demo_ids"])
    # The student's processed-image cache: every image of its prompts is counted, and each
    # image of an ICL prompt (earlier samples as demos, the query) was already processed
    # in a zero-shot pass, so it is a hit.
    icl = df.filter(pl.col("icl_answer").is_not_null())
    icl_images = int((icl["demo_ids"].list.len() + 1).sum())
    shown = summary["samples"] - summary["skipped"] + icl_images
    hits, misses = summary["student_image_cache_hits"], summary["student_image_cache_misses"]
    assert hits + misses == shown and hits >= icl_images > 0
    assert summary["student_image_cache_hit_rate"] == pytest.approx(hits / shown)
    # MLflow: one run, stepped metrics (step = samples seen), artifacts, dataset input.
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("icd").experiment_id], "tags.`icd.run_id` = 'e2e'"
    )
    assert len(runs) == 1
    run = runs[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "headline/accuracy")]
    assert steps == [32 * (i + 1) for i in range(7)]
    assert run.data.params["method.policy.budget"] == "0.1"
    assert run.data.metrics["student_cost/student_image_cache_hit_rate"] == pytest.approx(
        hits / shown
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "predictions.parquet" in artifacts
    assert run.inputs.dataset_inputs


def test_rerun_of_finished_run_calls_no_model(
    finished: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, summary = finished
    calls = _count_model_calls(monkeypatch)
    again = _run(
        root,
        "e2e",
        "data.limit=224",
        "pipeline.chunk_size=32",
        "pipeline.cache=false",
        "method.policy.budget=0.1",
    )
    assert sum(calls.values()) == 0
    assert again["accuracy"] == summary["accuracy"]
    assert again["queried"] == summary["queried"]


def _count_model_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count model calls per calling task by wrapping the loaders the tasks use."""
    calls: Counter = Counter()

    def wrap(loader: Any) -> Any:
        def load(*args: Any, **kwargs: Any) -> Any:
            model = loader(*args, **kwargs)
            caller = sys._getframe(1).f_code.co_name
            return _Counting(model, caller, calls)

        return load

    for stage in (embed, zero_shot, annotate, pool, icl, adapt):
        for name in ("load_student", "load_embedder", "load_teacher"):
            if hasattr(stage, name):
                monkeypatch.setattr(stage, name, wrap(getattr(stage, name)))
    return calls


class _Counting:
    def __init__(self, model: Any, caller: str, calls: Counter) -> None:
        self._model, self._caller, self._calls = model, caller, calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        if name in ("generate", "annotate", "embed_images", "embed_texts"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self._calls[(self._caller, name)] += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def test_changing_k_recomputes_only_selection_and_prediction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stream order no other test uses: its chunks are new to the task cache.
    sets = ("data.limit=96", "pipeline.chunk_size=32", "seed=7", "data.order_seed=4242")
    first = _count_model_calls(monkeypatch)
    _run(tmp_path, "k2", *sets, "method.selection.k=2")
    assert first[("embed", "embed_images")] == 3
    assert first[("zero_shot", "generate")] == 3
    monkeypatch.undo()
    second = _count_model_calls(monkeypatch)
    _run(tmp_path, "k3", *sets, "method.selection.k=3")
    assert second[("embed", "embed_images")] == 0
    assert second[("zero_shot", "generate")] == 0
    assert second[("annotate", "annotate")] == 0  # same queries: teacher reused
    # Chunk 0 sees an empty pool (same view for any k, so it is reused); later chunks have
    # demos, and k changes their selection and prediction.
    assert second[("icl", "generate")] >= 1


class _FlakyTeacher:
    """Stands in for a teacher service that fails for some samples and, once, for a batch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_id, self.revision = inner.model_id, inner.revision
        self.raised = False

    def annotate(self, samples, prompts, sampling):  # noqa: ANN001
        if not self.raised:
            self.raised = True
            raise ConnectionError("teacher unreachable (transient)")
        out = self.inner.annotate(samples, prompts, sampling)
        return Annotations(
            Annotation([], error="teacher_error: HTTP 500 after 5 retries")
            if int(s.sample_id[-1]) % 2
            else a
            for s, a in zip(samples, out, strict=True)
        )


def test_teacher_faults_fall_back_to_student(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky: dict[str, _FlakyTeacher] = {}
    real = annotate.load_teacher

    def load(cfg: Any, class_names: Any = None) -> _FlakyTeacher:
        if "t" not in flaky:
            flaky["t"] = _FlakyTeacher(real(cfg, class_names))
        return flaky["t"]

    monkeypatch.setattr(annotate, "load_teacher", load)
    summary = _run(
        tmp_path,
        "faults",
        "data.limit=64",
        "pipeline.chunk_size=32",
        "seed=3",
        "method.policy.budget=0.25",
        "pipeline.cache=false",
    )
    df = pl.read_parquet(tmp_path / "runs" / "faults" / "predictions.parquet")
    failed = df.filter(pl.col("teacher_error").is_not_null())
    assert flaky["t"].raised  # the transient batch failure was retried by the task
    assert failed.height >= 1 and summary["teacher_errors"] == failed.height
    assert set(failed["final_source"]) <= {"student_fallback"}
    assert (failed["final_answer"] == failed["icl_answer"].fill_null(failed["zs_answer"])).all()
    assert not failed["accepted"].any()
    assert summary["samples"] == 64


def _adapt_rounds(run_dir: Path) -> list[int]:
    lines = (run_dir / "adapt_calls.jsonl").read_text().splitlines()
    return [json.loads(line)["chunk"] for line in lines if line.strip()]


def kill_and_resume(root: Path, run_id: str, sets: list[str], chunks: int = 10) -> None:
    """Run ``icd run --preset smoke`` with ``sets`` (a stream of ``chunks`` chunks) in a
    process of its own, SIGKILL it after its third committed chunk (before its last), then
    run the same command to the end."""
    cmd = [
        sys.executable,
        "-m",
        "icd.cli",
        "run",
        "--preset",
        "smoke",
        "--run-id",
        run_id,
        "--no-progress",
        *[a for s in [*sets, f"storage.root={root}"] for a in ("--set", s)],
    ]
    state = root / "runs" / run_id / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        done = len(list(state.glob("chunk-*.json"))) if state.exists() else 0
        if done >= 3:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(state.glob("chunk-*.json")))
    assert 1 <= committed < chunks, f"kill landed after {committed} chunks"
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("mode", ["icd", "finetune_lora"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path, mode: str) -> None:
    chunks = 6  # killed after three, three left to resume
    sets = [
        f"data.limit={32 * chunks}",
        "pipeline.chunk_size=32",
        "seed=5",
        "pipeline.cache=false",
        "method.policy.budget=0.1",
        f"method.mode={mode}",
        # ICD with the selective-ICL gate: its state is resumed like the query policy's.
        *(["method.icl_gate.mode=uncertain"] if mode == "icd" else []),
    ]
    reference = _run(tmp_path / "ref", "ref", *sets)
    ref_df = pl.read_parquet(Path(reference["run_dir"]) / "predictions.parquet")

    root = tmp_path / "killed"
    kill_and_resume(root, "victim", sets, chunks)
    df = pl.read_parquet(root / "runs" / "victim" / "predictions.parquet")
    cols = [
        "sample_id",
        "zs_answer",
        "queried",
        "teacher_label",
        "accepted",
        "demo_ids",
        "icl_gated",
        "final_answer",
        "score",
    ]
    assert df.select(cols).equals(ref_df.select(cols))
    if mode == "icd":
        assert 0 < df["icl_gated"].sum() < df.height
    # No teacher call twice, and as many as the uninterrupted run made.
    calls = _ledger_calls(root / "runs" / "victim")
    assert max(calls.values(), default=1) == 1
    assert calls == _ledger_calls(Path(reference["run_dir"]))
    if mode == "finetune_lora":  # the adapter: no chunk trained twice, same rounds
        rounds = _adapt_rounds(root / "runs" / "victim")
        assert rounds == sorted(set(rounds)) == _adapt_rounds(Path(reference["run_dir"]))
        assert len(rounds) == chunks
    pool = _pool_rows(root, "victim")
    assert pool["sample_id"].n_unique() == pool.height == df["accepted"].sum()
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("icd").experiment_id
    runs = client.search_runs([exp], "tags.`icd.run_id` = 'victim'")
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "headline/accuracy")]
    assert steps == sorted(set(steps)) and steps[-1] == 32 * chunks


def test_in_process_runs_skip_heartbeats_and_server_runs_keep_them() -> None:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    from icd.flows.stream import in_process_settings

    default = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    assert default is not None
    with in_process_settings():  # ephemeral server: nothing outlives a crash to act on one
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
    server = temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"})
    with server, in_process_settings():  # entered in order: the API URL is set first
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == default


def test_the_flow_runs_on_the_thread_pool_the_config_asks_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deployment or a benchmark runs the flow with its default task runner; the flow
    reruns itself as a subflow when `pipeline.max_workers` asks for another size."""
    from prefect.context import get_run_context

    from icd.flows import stream as stream_mod
    from icd.method.accounting import RunSummary

    seen: list[int] = []

    def body(cfg: Any, **kw: Any) -> RunSummary:
        seen.append(get_run_context().task_runner._max_workers)
        return RunSummary()

    monkeypatch.setattr(stream_mod, "run_stream", body)
    stream(preset="smoke", overrides=["pipeline.max_workers=3"])
    stream(preset="smoke", overrides=["pipeline.max_workers=2"])
    assert seen == [3, 2]
