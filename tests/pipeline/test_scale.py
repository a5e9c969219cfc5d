"""Scale-out: pipelined stages (lookahead) and a real local Dask cluster give exactly the
sequential flow's predictions, pool and teacher calls."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import distributed
import lancedb
import mlflow
import polars as pl
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from icd.config import load_config
from icd.flows.stream import dask_cluster_kwargs, stream

pytestmark = pytest.mark.slow

# 6 chunks of 16: enough chunks for lookahead 3 to fill up. A data order no other test uses.
SETS = (
    "data.limit=96",
    "pipeline.chunk_size=16",
    "pipeline.cache=false",
    "seed=21",
    "data.order_seed=2121",
)
N_CHUNKS = 6


def _run(root: Path, run_id: str, *sets: str) -> tuple[dict[str, Any], int]:
    """Run the flow in this process; return its summary and the most chunks in flight."""
    cfg = load_config("smoke", overrides=[f"storage.root={root}", *SETS, *sets])
    summary = stream(config_json=cfg.model_dump_json(), run_id=run_id)
    return summary, summary["chunks_in_flight_peak"]


def _outcome(root: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Everything about a run that must not depend on how its stages were scheduled."""
    run_id, run_dir = summary["run_id"], Path(summary["run_dir"])
    preds = pl.read_parquet(run_dir / "predictions.parquet").drop("run_id")
    tbl = lancedb.connect(str(root / "pool")).open_table("demos")
    pool = (
        pl.from_arrow(tbl.to_arrow())
        .filter(pl.col("run_id") == run_id)
        .select(
            "sample_id",
            "chunk",
            "stream_pos",
            "label",
            "votes",
            "agreement",
            "uncertainty",
            "image_vec",
            "label_vec",
        )
        .sort("sample_id")
    )
    ledger = [
        (r["chunk_key"], r["sample_ids"], r["requests"], r["samples"])
        for r in map(json.loads, (run_dir / "teacher_calls.jsonl").read_text().splitlines())
    ]
    counts = {
        k: summary[k]
        for k in ("samples", "queried", "accepted", "teacher_calls", "teacher_requests")
    }
    return {"preds": preds, "pool": pool, "ledger": ledger, "counts": counts}


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["preds"].equals(b["preds"])
    assert a["pool"].equals(b["pool"])
    assert a["ledger"] == b["ledger"]
    assert a["counts"] == b["counts"]


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The reference: thread runner, no lookahead (each chunk's stages one after another)."""
    root = tmp_path_factory.mktemp("scale")
    summary, peak = _run(root, "seq", "pipeline.lookahead=0")
    assert peak == 1
    out = _outcome(root, summary)
    # A run that exercises every stage: teacher calls, a pool, demos in prompts.
    assert out["ledger"] and out["pool"].height >= 2
    assert out["preds"].height == 96 and (out["preds"]["demo_ids"].list.len() > 0).any()
    return root, out


@pytest.mark.parametrize("lookahead", [1, 3])
def test_lookahead_gives_identical_results_and_bounded_in_flight(
    sequential: tuple[Path, dict[str, Any]], lookahead: int
) -> None:
    root, reference = sequential
    summary, peak = _run(root, f"ahead{lookahead}", f"pipeline.lookahead={lookahead}")
    _assert_same(_outcome(root, summary), reference)
    # The current chunk plus `lookahead` chunks whose embedding/scoring run ahead: really
    # that many (the stream has more chunks), and never more.
    assert peak == min(lookahead + 1, N_CHUNKS)


def _worker_facts() -> dict[str, Any]:
    """Runs on a Dask worker: what this worker process loaded and how it is set up."""
    import torch

    import icd.models

    return {
        "pid": os.getpid(),
        "models": sorted(key[1] for key in icd.models._CACHE),
        "torch_threads": torch.get_num_threads(),
        "fixtures": os.environ.get("ICD_FIXTURES"),
        # a worker that could not reach the flow's API would have started a server here
        "own_prefect_server": "prefect.server.api.server" in sys.modules,
    }


def test_dask_cluster_matches_sequential(sequential: tuple[Path, dict[str, Any]]) -> None:
    root, reference = sequential
    cfg = load_config("smoke", overrides=list(SETS))
    with distributed.LocalCluster(**dask_cluster_kwargs(cfg)) as cluster:
        assert len(cluster.workers) == 2 and cluster.scheduler_address.startswith("tcp://127.0.0.1")
        summary, peak = _run(
            root,
            "dask",
            "pipeline.task_runner=dask",
            f"pipeline.dask_address={cluster.scheduler_address}",
            "pipeline.lookahead=2",
        )
        with distributed.Client(cluster) as client:
            facts = list(client.run(_worker_facts).values())
    _assert_same(_outcome(root, summary), reference)
    assert peak == 3

    # Embedding and zero-shot scoring ran in the worker processes, each loading the embedder
    # and the student once (the teacher stays with the flow); one torch thread each, the
    # flow's fixture folder, and no Prefect server of their own.
    assert all(f["pid"] != os.getpid() for f in facts)
    loaded = {m for f in facts for m in f["models"]}
    assert loaded == {"fixtures/tiny-clip", "fixtures/tiny-idefics3"}
    assert all(f["torch_threads"] == 1 for f in facts)
    assert all(f["fixtures"] == os.environ["ICD_FIXTURES"] for f in facts)
    assert not any(f["own_prefect_server"] for f in facts)

    # The workers' task runs were reported to the flow's Prefect API.
    tracking = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = tracking.get_experiment_by_name("icd").experiment_id
    (run,) = tracking.search_runs([exp], "tags.`icd.run_id` = 'dask'")
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    done = [t.name for t in task_runs if t.state is not None and t.state.is_completed()]
    assert sum(n.startswith("embed-") for n in done) == N_CHUNKS
    assert sum(n.startswith("zero_shot-") for n in done) == N_CHUNKS
