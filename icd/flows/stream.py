"""The ``stream`` flow (deployment ``icd/stream``): online ICD over one benchmark stream.

Per chunk (DESIGN §4)::

    embed ─┐
           ├─> select for annotation ─> teacher annotate (vote) ─> pool update
    score ─┘                                                          │
                      select demos (pool before this chunk) ─> student ICL ─> evaluate ─> log

Embedding and zero-shot scoring do not depend on the pool, so with ``pipeline.lookahead``
> 0 they are submitted for the next chunks while the current chunk's sequential stages run.
A chunk is committed (predictions parquet, pool version, policy state) before the next
one starts its sequential stages; a killed run restarts after its last committed chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from icd.config import Config, load_config
from icd.data.stream import open_stream
from icd.data.types import Chunk
from icd.method import modes, steps
from icd.method.policy import PolicyState
from icd.method.uncertainty import uncertainty
from icd.storage import results
from icd.storage.runstate import RunState, atomic_write_text
from icd.storage.tracking import Tracker
from icd.tasks.stages import (
    annotate_with_teacher,
    evaluate_chunk,
    extract_embeddings,
    open_pool,
    predict_icl,
    score_student,
    select_for_annotation,
    update_pool,
)

# Called after each committed chunk with (chunks_done, samples_done, total_samples or None);
# the CLI registers a rich progress bar here.
ChunkHook = Callable[[int, int, int | None], None]
CHUNK_HOOKS: list[ChunkHook] = []

STAGES = ("embed", "score", "annotate", "pool", "icl", "evaluate")


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:
        return "none"


def new_run_id(cfg: Config) -> str:
    """A fresh, readable run id: dataset-mode-time-random."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.dataset}-{cfg.method.mode}-{stamp}-{uuid.uuid4().hex[:6]}"


def _pool_key(ids: np.ndarray) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


@flow(name="stream", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def stream(
    preset: str | None = "smoke",
    overrides: list[str] | None = None,
    config_file: str | None = None,
    run_id: str | None = None,
    parent_mlflow_run_id: str | None = None,
    config_json: str | None = None,
) -> dict[str, Any]:
    """Run online ICD over one benchmark stream and return the run summary.

    ``preset`` names a shipped preset, ``config_file`` a YAML file layered on top, and
    ``overrides`` are ``key.path=value`` strings applied last (``config_json``, a fully
    resolved config, replaces all three). Re-running with the same ``run_id`` resumes the
    run after its last committed chunk.
    """
    if config_json is not None:
        cfg = Config.model_validate_json(config_json)
    else:
        cfg = load_config(preset, config_file, overrides)
    if cfg.pipeline.task_runner == "dask" and not _on_dask():
        # The task runner is part of the flow's options: rerun as a subflow on Dask.
        return stream_flow_for(cfg)(
            config_json=cfg.model_dump_json(),
            run_id=run_id,
            parent_mlflow_run_id=parent_mlflow_run_id,
        )
    return run_stream(cfg, run_id=run_id, parent_mlflow_run_id=parent_mlflow_run_id)


def _on_dask() -> bool:
    try:
        return type(get_run_context().task_runner).__name__ == "DaskTaskRunner"
    except Exception:
        return False


def stream_flow_for(cfg: Config) -> Any:
    """The ``stream`` flow with the task runner ``cfg.pipeline`` asks for."""
    return stream.with_options(task_runner=task_runner_for(cfg))


def run_stream(
    cfg: Config, run_id: str | None = None, parent_mlflow_run_id: str | None = None
) -> dict[str, Any]:
    """The body of the ``stream`` flow for an already resolved config."""
    log = get_run_logger()
    run_id = run_id or cfg.run_id or new_run_id(cfg)
    cfg = cfg.model_copy(update={"run_id": run_id})
    run_dir = cfg.storage.results_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_store = RunState(run_dir)
    state_store.check_config(cfg.fingerprint("seed", "data", "models", "method", "pipeline.chunk_size"))
    atomic_write_text(run_dir / "config.json", cfg.model_dump_json(indent=2))

    src = open_stream(cfg.data)
    spec = src.spec
    mode = modes.mode_spec(cfg.method.mode)
    sel_cfg = cfg.method.selection
    if mode.strategy is not None:
        sel_cfg = sel_cfg.model_copy(update={"strategy": mode.strategy})
    class_names = src.class_names
    prompt_classes = class_names if cfg.method.list_classes_in_prompt else None
    pool_uri = cfg.storage.resolved_pool_uri()
    ledger = str(run_dir / "teacher_calls.jsonl")

    tracker = Tracker(
        cfg.storage.resolved_tracking_uri(),
        cfg.storage.experiment,
        artifact_root=Path(cfg.storage.root).absolute() / "mlartifacts",
    )
    mlflow_run_id = tracker.start(
        run_id,
        config=cfg.model_dump(mode="json"),
        tags={
            "prefect.flow_run_id": _flow_run_id(),
            "git.commit": _git_commit(),
            "icd.mode": cfg.method.mode,
            "icd.dataset": cfg.data.dataset,
        },
        parent_mlflow_run_id=parent_mlflow_run_id,
    )
    tracker.log_dataset(src.dataset_info(), None)

    # Resume point and carried state.
    done = state_store.all()
    for st in done:  # re-log metrics of committed chunks; the tracker skips logged steps
        tracker.log_metrics(st["metrics"], step=st["samples_seen"])
    last = done[-1] if done else None
    start_chunk = last["chunk"] + 1 if last else 0
    policy_state: dict[str, Any] = last["policy_state"] if last else PolicyState().to_dict()
    counters: dict[str, Any] = (
        dict(last["counters"])
        if last
        else {"teacher_requests": 0, "teacher_samples": 0, "samples_seen": 0}
    )
    manifest: dict[str, int] = dict(last["manifest"]) if last else {}
    seconds: dict[str, float] = dict(last["seconds"]) if last else dict.fromkeys(STAGES, 0.0)
    if last:
        log.info("run %s: resuming after chunk %d", run_id, last["chunk"])
    else:
        log.info("run %s: starting (mode=%s, dataset=%s)", run_id, cfg.method.mode, cfg.data.dataset)

    total = src.length
    lookahead = cfg.pipeline.lookahead

    def submit_ahead(chunk: Chunk) -> tuple[Chunk, Any, Any]:
        key = chunk.key
        emb = extract_embeddings.submit(chunk, key, cfg.models.embedder)
        zs = score_student.submit(chunk, key, cfg.models.student, spec.task, prompt_classes)
        return chunk, emb, zs

    in_flight: deque[tuple[Chunk, Any, Any]] = deque()
    chunk_iter = src.chunks(cfg.pipeline.chunk_size, start_chunk=start_chunk)
    exhausted = False
    while True:
        while not exhausted and len(in_flight) <= lookahead:
            nxt = next(chunk_iter, None)
            if nxt is None:
                exhausted = True
            else:
                in_flight.append(submit_ahead(nxt))
        if not in_flight:
            break
        chunk, emb_f, zs_f = in_flight.popleft()
        emb, zs = emb_f.result(), zs_f.result()
        seconds["embed"] += emb["seconds"]
        seconds["score"] += zs["seconds"]
        valid = chunk.valid
        zs_gens = zs["generations"]
        zs_unc = uncertainty(zs_gens, cfg.method.uncertainty) if zs_gens else np.zeros(0)

        # Teacher: who is asked, and what it says.
        queried = [False] * len(valid)
        if mode.teacher_on_all:
            queried = [True] * len(valid)
        elif mode.query_teacher:
            queried, policy_state = select_for_annotation(
                zs_unc, policy_state, cfg.method.policy, total
            )
        queried_ids = [s.sample_id for s, q in zip(valid, queried, strict=True) if q]
        outcomes: list[dict[str, Any]] = []
        if queried_ids:
            voting = cfg.method.voting
            if mode.teacher_on_all:
                voting = voting.model_copy(update={"n": 1, "temperature": 0.0, "a_min": 0.0})
            ann = annotate_with_teacher(
                chunk, chunk.key, queried_ids, cfg.models.teacher, voting, spec.task,
                prompt_classes if prompt_classes else class_names, src.synonyms, cfg.seed, ledger,
            )
            outcomes = ann["outcomes"]
            counters["teacher_requests"] += ann["requests"]
            counters["teacher_samples"] += ann["samples"]
            seconds["annotate"] += ann["seconds"]

        # Pool: the accepted annotations, committed as one LanceDB version.
        t0 = time.perf_counter()
        if mode.use_pool:
            manifest[str(chunk.index)] = update_pool(
                pool_uri, run_id, chunk, outcomes, emb["image_vecs"], zs_unc,
                cfg.models.teacher.model_id, cfg.models.embedder, cfg.storage.compact_every,
            )
        seconds["pool"] += time.perf_counter() - t0

        # Student with demonstrations from the pool as it was before this chunk.
        icl: dict[str, Any] | None = None
        if mode.use_icl and valid:
            view_ids = open_pool(pool_uri).view(run_id, before_chunk=chunk.index).ids
            icl = predict_icl(
                chunk, chunk.key, emb["image_vecs"], [g.text for g in zs_gens], pool_uri, run_id,
                _pool_key(view_ids), cfg.models.student, cfg.models.embedder, sel_cfg, spec.task,
                prompt_classes, cfg.seed,
            )
            seconds["icl"] += icl["seconds"]

        t0 = time.perf_counter()
        metrics = evaluate_chunk(
            run_dir, run_id, cfg.method.mode, cfg.data.dataset, chunk, zs_gens, zs_unc,
            queried, outcomes, icl, cfg.method, spec.task, src.synonyms,
            uncertainty_fn_measure=cfg.method.uncertainty,
        )
        counters["samples_seen"] += len(chunk.samples)
        seconds["evaluate"] += time.perf_counter() - t0
        metrics.update(
            teacher_requests=counters["teacher_requests"],
            teacher_samples=counters["teacher_samples"],
            pool_size=open_pool(pool_uri).count(run_id) if mode.use_pool else 0,
        )
        state_store.commit(
            chunk.index,
            {
                "samples_seen": counters["samples_seen"],
                "policy_state": policy_state,
                "counters": counters,
                "manifest": manifest,
                "seconds": seconds,
                "metrics": metrics,
            },
        )
        tracker.log_metrics(metrics, step=counters["samples_seen"])
        for hook in CHUNK_HOOKS:
            hook(chunk.index + 1, counters["samples_seen"], total)

    # Summary, artifacts, lineage.
    df = results.read_predictions(run_dir)
    pred_path = run_dir / "predictions.parquet"
    df.write_parquet(pred_path)
    summary = results.summarize(
        df,
        {
            "teacher_calls": counters["teacher_samples"],
            "teacher_requests": counters["teacher_requests"],
            "pool_size": open_pool(pool_uri).count(run_id) if mode.use_pool else 0,
            "seconds": seconds,
        },
    )
    summary.update(run_id=run_id, run_dir=str(run_dir), mlflow_run_id=mlflow_run_id)

    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    tracker.log_artifact(pred_path)
    tracker.log_pool_manifest({int(k): v for k, v in manifest.items()})
    tracker.finish(summary)
    log.info(
        "run %s finished: accuracy %.3f, annotation rate %.3f, teacher calls %d, pool %d",
        run_id,
        summary.get("accuracy") or 0.0,
        summary.get("annotation_rate") or 0.0,
        summary.get("teacher_calls", 0),
        summary.get("pool_size", 0),
    )
    return summary


def task_runner_for(cfg: Config) -> Any:
    """The Prefect task runner the config asks for."""
    if cfg.pipeline.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.pipeline.dask_address:
            return DaskTaskRunner(address=cfg.pipeline.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": cfg.pipeline.dask_workers, "threads_per_worker": 1,
                            "processes": True, "dashboard_address": None}
        )
    return ThreadPoolTaskRunner(max_workers=cfg.pipeline.max_workers)

