"""MLflow lineage: params, stepped metrics, dataset input, artifacts, resume, secrets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from icd.config import Config
from icd.storage.tracking import Tracker, TrackingError, flatten, is_secret


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (a new store takes seconds to migrate)."""
    root = tmp_path_factory.mktemp("mlflow")
    Tracker(f"sqlite:///{root / 'mlflow.db'}", "icd")
    return f"sqlite:///{root / 'mlflow.db'}"


def config(**overrides: object) -> dict:
    cfg = Config(run_id="x").model_dump(mode="json")
    cfg["models"]["teacher"]["api_key"] = "sk-live-abcdefghijklmnopqrstuvwxyz"
    cfg["models"]["teacher"]["backend"] = "openai"
    cfg.update(overrides)
    return cfg


def test_run_has_params_metrics_dataset_models_and_artifacts(store: str, tmp_path: Path) -> None:
    tracker = Tracker(store, "icd")
    mlflow_id = tracker.start(
        "run-a", config(), {"prefect.flow_run_id": "fr-1", "git.commit": "abc123"}
    )
    for step in (64, 128, 192):
        assert tracker.log_metrics({"accuracy": step / 256, "pool_size": step // 8}, step) == 2
    tracker.log_dataset(
        {"name": "shapes", "source": "fixture:shapes", "digest": "d" * 40, "split": "train"},
        pl.DataFrame({"sample_id": ["a", "b"], "label": ["circle", "square"]}),
    )
    preds = tmp_path / "predictions.parquet"
    pl.DataFrame({"x": [1, 2]}).write_parquet(preds)
    tracker.log_artifact(preds, "predictions")
    tracker.log_pool_manifest({0: 2, 1: 3, 2: 5}, pool_uri="/pool", table="demos")
    tracker.finish(
        {
            "samples": 192,
            "accuracy": np.float64(0.75),
            "seconds": {"embed": 1.5},
            "mode": "icd",
            "run_dir": tmp_path,
        }
    )

    client = tracker.client
    run = client.get_run(mlflow_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["icd.run_id"] == "run-a"
    assert run.data.tags["prefect.flow_run_id"] == "fr-1"
    assert run.data.tags["git.commit"] == "abc123"
    params = run.data.params
    assert params["method.selection.strategy"] == "combined"
    assert params["pipeline.chunk_size"] == "64"
    assert params["models.student.model_id"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert params["models.teacher.api_key_env"] == "OPENAI_API_KEY"
    history = client.get_metric_history(mlflow_id, "headline/accuracy")
    assert sorted(m.step for m in history) == [64, 128, 192]
    # the summary's numbers are final points of their own series, no summary.* copies
    assert sorted(m.step for m in client.get_metric_history(mlflow_id, "headline/accuracy")) == [
        64,
        128,
        192,
    ]
    assert run.data.metrics["stage_seconds/embed"] == 1.5  # a section of the UI's charts
    assert not any(k.startswith("summary.") for k in run.data.metrics)

    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "shapes" and inp.dataset.digest == "d" * 36
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "stream" and tags["split"] == "train"
    assert "fixture:shapes" in inp.dataset.source

    assert run.data.tags["icd.model.student"] == "HuggingFaceTB/SmolVLM-256M-Instruct@main"
    model = client.get_logged_model(run.data.tags["icd.model.teacher.id"])
    assert model.source_run_id == mlflow_id and model.params["model_id"].startswith("Qwen/")
    assert "api_key" not in model.params

    files = {a.path for a in client.list_artifacts(mlflow_id)}
    assert {"predictions", "pool", "summary.json"} <= files
    assert [a.path for a in client.list_artifacts(mlflow_id, "predictions")] == [
        "predictions/predictions.parquet"
    ]
    manifest = client.download_artifacts(mlflow_id, "pool/manifest.json", str(tmp_path))
    assert json.loads(Path(manifest).read_text())["versions"] == {"0": 2, "1": 3, "2": 5}
    summary = client.download_artifacts(mlflow_id, "summary.json", str(tmp_path))
    assert json.loads(Path(summary).read_text())["accuracy"] == 0.75
    assert "/mlartifacts/icd/" in run.info.artifact_uri  # beside the store, not ./mlruns


def test_secrets_are_never_logged(store: str) -> None:
    tracker = Tracker(store, "icd")
    cfg = config()
    cfg["extra"] = {
        "hf_token": "hf_abcdefghijklmnop",
        "password": "hunter2",
        "note": "sk-abcdefghijk",
    }
    mlflow_id = tracker.start("run-secret", cfg, {"OPENAI_API_KEY": "sk-xyz1234567890"})
    run = tracker.client.get_run(mlflow_id)
    logged = json.dumps([run.data.params, run.data.tags])
    for secret in ("sk-live", "hf_abcdefghijklmnop", "hunter2", "sk-abcdefghijk", "sk-xyz"):
        assert secret not in logged
    assert "models.teacher.api_key" not in run.data.params
    assert run.data.params["models.teacher.api_key_env"] == "OPENAI_API_KEY"


def test_resume_continues_the_same_run_without_duplicate_steps(store: str) -> None:
    first = Tracker(store, "icd")
    mlflow_id = first.start("run-resume", config(), {"prefect.flow_run_id": "fr-1"})
    first.log_metrics({"accuracy": 0.5, "queried": 3.0}, 64)
    first.log_metrics({"accuracy": 0.6, "queried": 5.0}, 128)
    first.finish(status="KILLED")

    again = Tracker(store, "icd")
    assert again.start("run-resume", config(seed=7), {"prefect.flow_run_id": "fr-2"}) == mlflow_id
    assert again.resumed
    assert again.log_metrics({"accuracy": 0.99, "queried": 9.0}, 128) == 0  # already there
    assert again.log_metrics({"accuracy": 0.7, "queried": 6.0}, 192) == 2
    again.finish({"samples": 192})

    client = again.client
    runs = client.search_runs([again.experiment_id], "tags.`icd.run_id` = 'run-resume'")
    assert len(runs) == 1
    history = client.get_metric_history(mlflow_id, "headline/accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (64, 0.5),
        (128, 0.6),
        (192, 0.7),
    ]
    run = client.get_run(mlflow_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "0"  # the first value stays
    assert run.data.tags["icd.param_changed.seed"] == "7"
    assert run.data.tags["icd.resumes"] == "1"
    assert run.data.tags["prefect.flow_run_id"] == "fr-2"
    models = client.search_logged_models([again.experiment_id], f"source_run_id = '{mlflow_id}'")
    assert sorted(m.name for m in models) == ["embedder", "student", "teacher"]  # once each


def test_child_runs_nest_under_the_parent(store: str) -> None:
    suite = Tracker(store, "icd")
    parent = suite.start("suite-1", {"suite": "smoke"}, {})
    kids = []
    for m in ("icd", "rices"):
        kid = Tracker(store, "icd")
        kid.start(f"suite-1-{m}", config(), {"mode": m}, parent_mlflow_run_id=parent)
        kids.append(kid)
    for kid in kids:
        assert kid.client.get_run(kid.mlflow_run_id).data.tags["mlflow.parentRunId"] == parent
        kid.finish({"samples": 10, "accuracy": 0.5})
    again = Tracker(store, "icd")
    again.start("suite-1-icd", config(), parent_mlflow_run_id=parent)
    assert again.mlflow_run_id == kids[0].mlflow_run_id and again.resumed


def test_flatten_and_secret_rules() -> None:
    flat = flatten({"a": {"b": 1, "c": [1, 2], "api_key": "x", "api_key_env": "K"}, "d": None})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "a.api_key_env": "K", "d": "None"}
    assert is_secret("models.teacher.api_key")
    assert is_secret("auth_token") and is_secret("x", "sk-abcdefghijklmn")
    assert not is_secret("models.student.max_new_tokens") and not is_secret("api_key_env")


def test_unusable_store_is_a_one_line_error(store: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="tracking store") as err:
        Tracker(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}", "icd")
    assert "\n" not in str(err.value)
    with pytest.raises(TrackingError, match="no quotes"):
        Tracker(store, "icd").start("it's", {})


def test_background_metrics_are_all_stored_by_finish_and_failures_surface(store: str) -> None:
    tracker = Tracker(store, "icd")
    mlflow_id = tracker.start("run-background", config(), {})
    for step in range(64, 64 * 21, 64):
        assert tracker.log_metrics({"accuracy": step / 2000}, step, background=True) == 1
    tracker.finish({"samples": 64 * 20})  # waits for the queued writes
    history = tracker.client.get_metric_history(mlflow_id, "headline/accuracy")
    assert sorted((m.step, m.value) for m in history) == [
        (step, step / 2000) for step in range(64, 64 * 21, 64)
    ]

    broken = Tracker(store, "icd")
    broken.start("run-background-broken", config(), {})
    broken.log_metrics({"bad\x00key": 1.0}, 64, background=True)  # MLflow rejects the name
    with pytest.raises(Exception, match="bad"):
        broken.flush()


def test_a_hub_dataset_lineage_carries_the_commit_read(store: str) -> None:
    tracker = Tracker(store, "icd")
    mlflow_id = tracker.start("run-rev", config(), {})
    commit = "3ae0e4e94e37c610c26df758ec3255fa90d80e67"
    tracker.log_dataset(
        {
            "name": "aircraft",
            "source": "hf:mteb/FGVCAircraft",
            "revision": commit,
            "revision_status": "pinned",
            "split": "test",
            "digest": "e" * 32,
        }
    )
    (inp,) = tracker.client.get_run(mlflow_id).inputs.dataset_inputs
    source = json.loads(inp.dataset.source)
    assert source["path"] == "mteb/FGVCAircraft"
    assert source["revision"] == commit and source["split"] == "test"
    tags = {t.key: t.value for t in inp.tags}
    assert tags["revision"] == commit and tags["revision_status"] == "pinned"
    tracker.finish({})


def test_metric_keys_put_the_headline_section_first_and_never_collide() -> None:
    """MLflow shows one chart section per key prefix, in name order: the headline numbers
    come first, every other summary number sits in a later section, and no two numbers share
    a key."""
    from icd.method.accounting import ADDITIVE, RATIOS
    from icd.storage.tracking import metric_key

    headline = ["accuracy", "zs_accuracy", "forward_accuracy", "gain_from_icl",
                "annotation_rate", "teacher_calls", "pool_size"]  # fmt: skip
    assert [metric_key(k) for k in headline] == [f"headline/{k}" for k in headline]
    names = [*ADDITIVE, *RATIOS, "seconds.embed", "cached_chunks.icl", "accuracy_novel",
             "gain_from_icl_base", "icl_prompts", "teacher_requests", "mean_agreement"]  # fmt: skip
    keys = [metric_key(n) for n in names]
    assert len(set(keys)) == len(set(names))
    sections = {k.split("/")[0] for k in keys if "/" in k}
    assert min(sections) == "headline" and len(sections) >= 6
    assert metric_key("seconds.embed") == "stage_seconds/embed"
    assert metric_key("shapes.icd.b0.08.accuracy") == "shapes.icd.b0.08.accuracy"  # parent's
