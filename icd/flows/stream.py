"""The stream flow (Prefect flow ``icd``, deployment ``icd/stream``): online ICD over one
benchmark stream.

Per chunk (docs/design.md §4), one stage per module of :mod:`icd.tasks`::

    embed ─> score ─> annotate (policy, teacher votes) ─┬─> pool ─┐
                                                        └─> icl ──┴─> [adapt] ─> evaluate ─> commit
    (icl: the student's demos come from the pool as it was before this chunk; adapt: the
    LoRA modes' training steps on the pool, used by the next chunks' student passes)

Embedding and zero-shot scoring do not depend on the pool (except scoring by an adapting
student), so with ``pipeline.lookahead`` > 0 they are submitted for the next chunks while
the current chunk's sequential stages run (with 0 they run in order, in the flow's
thread). The pool update runs in the background
while the student answers with demonstrations, which come from the pool as it was before
the chunk. A chunk is committed (predictions parquet, pool version, policy state) before
the next one starts its sequential stages; a killed run restarts after its last committed
chunk.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import polars as pl
import torch
from prefect import flow, get_run_logger
from prefect.context import FlowRunContext, get_run_context
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from icd import tasks
from icd.config import Config, load_config
from icd.data.stream import Stream, open_stream
from icd.data.types import Chunk
from icd.flows import artifacts
from icd.method import accounting, steps
from icd.method.accounting import Made
from icd.report import build_run_report
from icd.storage import results
from icd.storage.locks import atomic_file
from icd.storage.pool import DEFAULT_TABLE, PoolError
from icd.storage.runstate import RunState, atomic_write_text
from icd.storage.tracking import Tracker
from icd.tasks import adapt, annotate, embed, evaluate, icl, pool, score
from icd.tasks.base import open_pool
from icd.tasks.context import ChunkWork, ResumeState, RunContext
from icd.tasks.runner import Runner

# Called after each committed chunk with (chunks_done, samples_done, total_samples or None);
# the CLI registers a rich progress bar here.
ChunkHook = Callable[[int, int, int | None], None]
CHUNK_HOOKS: list[ChunkHook] = []


@flow(name="icd", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
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
    on_dask = _on_dask()
    if not _runner_fits(cfg, on_dask=on_dask):
        # The task runner is part of the flow's options (a deployment or a benchmark runs
        # the flow with its default one): rerun as a subflow on the runner `cfg` asks for.
        return stream_flow_for(cfg)(
            config_json=cfg.model_dump_json(),
            run_id=run_id,
            parent_mlflow_run_id=parent_mlflow_run_id,
        )
    with _api_for_workers() if on_dask else nullcontext():
        return run_stream(cfg, run_id=run_id, parent_mlflow_run_id=parent_mlflow_run_id)


def _runner_fits(cfg: Config, *, on_dask: bool) -> bool:
    """Whether this flow run's task runner is the one ``cfg.pipeline`` asks for: Dask, or
    a thread pool of ``max_workers``."""
    if cfg.pipeline.task_runner == "dask":
        return on_dask
    run = FlowRunContext.get()
    if run is None:
        return True
    runner = run.task_runner
    # ThreadPoolTaskRunner keeps its size in `_max_workers` (Prefect 3.x; no public field).
    workers = getattr(runner, "_max_workers", cfg.pipeline.max_workers)
    return on_dask or workers == cfg.pipeline.max_workers


def _on_dask() -> bool:
    run = FlowRunContext.get()
    return run is not None and type(run.task_runner).__name__ == "DaskTaskRunner"


def _api_for_workers() -> AbstractContextManager[Any]:
    """Point the task runs on Dask workers at this flow's Prefect API.

    prefect-dask ships the flow's settings with every task; a worker reports its task runs
    to the API URL in them. In ephemeral mode that URL is empty, and each worker process
    would start a temporary server of its own (tens of seconds, and a second writer on the
    same database): name the flow's server instead. (Ephemeral servers listen on loopback,
    so workers on other machines need a real server: set PREFECT_API_URL.)
    """
    if PREFECT_API_URL.value():
        return nullcontext()
    return temporary_settings({PREFECT_API_URL: str(get_run_context().client.api_url)})


def in_process_settings() -> AbstractContextManager[Any]:
    """Prefect settings for flows run in this process on Prefect's ephemeral server (no
    ``PREFECT_API_URL``): no flow-run heartbeats. That server lives only as long as this
    process, so a missed heartbeat could never be acted on, and stopping the heartbeat
    thread costs every flow run up to a second at its end. With a real server (deployments,
    a configured API URL) nothing changes."""
    if PREFECT_API_URL.value():
        return nullcontext()
    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def stream_flow_for(cfg: Config) -> Any:
    """The ``stream`` flow with the task runner ``cfg.pipeline`` asks for."""
    return stream.with_options(task_runner=task_runner_for(cfg))


def run_stream(
    cfg: Config, run_id: str | None = None, parent_mlflow_run_id: str | None = None
) -> dict[str, Any]:
    """The body of the stream flow for an already resolved config: the diagram above."""
    if cfg.pipeline.torch_threads:
        torch.set_num_threads(cfg.pipeline.torch_threads)
    src = open_stream(cfg.data)
    ctx = RunContext.create(cfg, src, run_id=run_id)
    tracker = start_tracking(ctx=ctx, src=src, parent_mlflow_run_id=parent_mlflow_run_id)
    state = resume(ctx=ctx, tracker=tracker)
    runner = Runner(
        lookahead=cfg.pipeline.lookahead,
        on_dask=_on_dask(),
        cache_dir=ctx.cache_dir,
        books=state.books,
    )
    progress = show_run(ctx=ctx, state=state)  # the Prefect UI: name, tags, progress
    chunks = src.chunks(cfg.pipeline.chunk_size, start_chunk=state.next_chunk)
    for work in runner.window(chunks, start=lambda c: start_chunk(runner, ctx, chunk=c)):
        embed.collect(runner, work=work)
        score.collect(runner, ctx, work=work, state=state)  # answers, uncertainty
        annotate.run(runner, ctx, work=work, state=state)  # budgeted policy -> votes
        view = icl.demo_view(ctx, work=work)  # the pool as it was before this chunk
        pooling = pool.submit(runner, ctx, work=work)  # one pool commit, in the background
        icl.run(runner, ctx, work=work, state=state, view=view)
        pool.collect(runner, work=work, state=state, pending=pooling)
        adapt.run(runner, ctx, work=work, state=state)  # finetune modes: LoRA on the pool
        evaluate.run(runner, ctx, work=work, state=state)
        commit(ctx, work=work, state=state, tracker=tracker)
        progress.update(state.counters["samples_seen"])
    return finish(ctx, state=state, tracker=tracker)


def start_chunk(runner: Runner, ctx: RunContext, *, chunk: Chunk) -> ChunkWork:
    """Start the chunk's pool-independent stages, which may run ahead of the current
    chunk: its embeddings and (unless the student adapts to the pool) its zero-shot
    answers."""
    work = ChunkWork(chunk)
    work.embedding = embed.submit(runner, ctx, chunk=chunk)
    work.scoring = score.submit(runner, ctx, chunk=chunk)
    return work


REPORT_ARTIFACTS = "report"  # the run's plots and HTML report, in its MLflow artifacts


# ---------------------------------------------------------------------------- the run
def start_tracking(*, ctx: RunContext, src: Stream, parent_mlflow_run_id: str | None) -> Tracker:
    """The run's MLflow run (created, or reopened when resuming) with its config, lineage
    tags and dataset."""
    cfg = ctx.cfg
    tracker = Tracker(
        cfg.storage.resolved_tracking_uri(),
        cfg.storage.experiment,
        artifact_root=Path(cfg.storage.root).absolute() / "mlartifacts",
    )
    commit = _git_commit()
    tracker.start(
        ctx.run_id,
        config=cfg.model_dump(mode="json"),
        tags={
            "prefect.flow_run_id": _flow_run_id(),
            "git.commit": commit,
            "icd.mode": cfg.method.mode,
            "icd.dataset": cfg.data.dataset,
            # MLflow's own columns (Source, User) and the run page's description
            "mlflow.source.name": "icd/stream (Prefect flow)",
            "mlflow.source.type": "JOB",
            "mlflow.source.git.commit": commit,
            "mlflow.user": getpass.getuser(),
            "mlflow.note.content": (
                f"ICD run `{ctx.run_id}`: mode `{cfg.method.mode}` on `{cfg.data.dataset}`. "
                f"Prefect flow run `{_flow_run_id()}`. Plots and the HTML report are under "
                "Artifacts → report; `predictions_table.json` previews the predictions."
            ),
        },
        parent_mlflow_run_id=parent_mlflow_run_id,
        # a benchmark cell leads with its setting (dataset--mode--budget--order), not the
        # benchmark id every sibling shares
        run_name=ctx.run_id.split("--", 1)[1]
        if parent_mlflow_run_id and "--" in ctx.run_id
        else None,
    )
    tracker.log_dataset(src.dataset_info())
    return tracker


def show_run(*, ctx: RunContext, state: ResumeState) -> artifacts.Progress:
    """Name the Prefect flow run after the ICD run id, tag it with the mode and dataset,
    and start its progress artifact (where a resumed run stands)."""
    cfg = ctx.cfg
    artifacts.name_flow_run(
        name=ctx.run_id,
        tags=["icd", f"mode:{cfg.method.mode}", f"dataset:{cfg.data.dataset}"],
    )
    progress = artifacts.Progress(run_id=ctx.run_id, total=ctx.stream_length)
    progress.update(state.counters.get("samples_seen", 0))
    return progress


def resume(*, ctx: RunContext, tracker: Tracker) -> ResumeState:
    """The state after the last committed chunk; committed chunks' metrics are logged again
    (the tracker skips steps it already has, so a kill between commit and log loses none)."""
    log = get_run_logger()
    for st in RunState(ctx.run_dir).all():
        made = Made(**st.get("made", {}))
        numbers = accounting.running_numbers(
            st["running"],
            counters=st["counters"],
            made=made,
            pool_size=st.get("pool_size", 0),
            pool_precision=st.get("pool_precision"),
        )
        tracker.log_metrics(_loggable(numbers), step=st["samples_seen"])
    state = ResumeState.load(ctx, counters=tasks.COUNTERS)
    if ctx.plan.pool and state.next_chunk:
        pooled = results.read_predictions(ctx.run_dir).filter(pl.col("accepted"))
        state.pool_truth = dict(zip(pooled["sample_id"], pooled["answers"].to_list(), strict=True))
    if state.next_chunk:
        done = state.counters["samples_seen"]
        log.info(
            "run %s: resuming after chunk %d (%d samples done)",
            ctx.run_id,
            state.next_chunk - 1,
            done,
        )
    else:
        n = ctx.stream_length if ctx.stream_length is not None else "unknown"
        log.info(
            "run %s: mode %s on %s (%s samples)", ctx.run_id, ctx.plan.mode, ctx.cfg.data.dataset, n
        )
    return state


def commit(ctx: RunContext, *, work: ChunkWork, state: ResumeState, tracker: Tracker) -> None:
    """Commit the chunk (the run resumes after it) and log its running numbers."""
    pool_size, state.pool_precision = pool_numbers(ctx, work=work, state=state)
    state.pool_size = pool_size
    state.extend_lineage(work.chunk.key)
    state.commit(ctx, work=work)
    assert state.running is not None
    numbers = accounting.running_numbers(
        state.running,
        counters=state.counters,
        made=state.made,
        pool_size=pool_size,
        pool_precision=state.pool_precision,
    )
    samples = state.counters["samples_seen"]
    tracker.log_metrics(_loggable(numbers), step=samples, background=True)
    accuracy = numbers.get("accuracy")
    get_run_logger().info(
        "chunk %d: %d samples, %d queried, accuracy so far %s, pool %d",
        work.chunk.index,
        len(work.chunk.samples),
        len(work.queried_ids),
        f"{accuracy:.3f}" if accuracy is not None else "n/a",
        pool_size,
    )
    for hook in CHUNK_HOOKS:
        hook(work.chunk.index + 1, samples, ctx.stream_length)


def pool_numbers(
    ctx: RunContext, *, work: ChunkWork, state: ResumeState
) -> tuple[int, float | None]:
    """The run's pool after ``work``'s chunk: its rows left for selection and their label
    precision (:func:`icd.method.accounting.pool_precision`)."""
    if not ctx.plan.pool:
        return 0, None
    admitted = steps.pool_mask([work.votes.get(s.sample_id) for s in work.valid])
    for s, pooled in zip(work.valid, admitted, strict=True):
        if pooled:
            state.pool_truth[s.sample_id] = list(s.answers)
    live = open_pool(ctx.pool_uri).view(ctx.run_id)
    scores = state.pool_scores  # a row's label is fixed within a run: each scored once
    for sid, label in zip(live.ids, live.labels, strict=True):
        truth = state.pool_truth.get(str(sid))
        if truth and str(sid) not in scores:
            scores[str(sid)] = ctx.score(str(label), list(truth))
    return len(live), accounting.pool_precision(
        [scores[k] for k in map(str, live.ids) if k in scores]
    )


def finish(ctx: RunContext, *, state: ResumeState, tracker: Tracker) -> dict[str, Any]:
    """Compact the pool, write the predictions and the summary, log them with the pool
    manifest to MLflow, and return the summary."""
    log = get_run_logger()
    table = open_pool(ctx.pool_uri)
    if ctx.plan.pool and state.manifest:
        # Short runs never reach `compact_every` commits: compact once at the end too.
        try:
            table.compact()
        except PoolError as e:  # maintenance: the rows are unaffected; the next run retries
            log.warning("pool compaction skipped: %s", e)
    df = results.read_predictions(ctx.run_dir)
    pred_path = ctx.run_dir / "predictions.parquet"
    with atomic_file(pred_path) as tmp:  # a reader never sees half of it, nor does a resume
        df.write_parquet(tmp)
    totals = accounting.RunTotals(
        run_id=ctx.run_id,
        mode=ctx.cfg.method.mode,
        dataset=ctx.cfg.data.dataset,
        counters=dict(state.counters),
        made=state.made,
        seconds=state.books.seconds,
        cached=state.books.cached,
        adapt=state.adapt,
        student_params=state.student_params,
        pool_size=state.pool_size,
        pool_precision=state.pool_precision,
        chunks_in_flight_peak=state.books.in_flight_peak,
    )
    summary = accounting.summarize(
        df,
        totals,
        sums=state.running,
        score_fn=ctx.score,
        groups=ctx.class_groups,
        task=ctx.task_type,  # captioning runs add corpus BLEU / CIDEr
    )
    calls = [st["service"] for st in RunState(ctx.run_dir).all() if st.get("service")]
    if calls:  # remote teacher: retries, failures and latency percentiles of the run
        from icd.models.openai import summarize_stats

        summary.update({f"teacher_{k}": v for k, v in summarize_stats(calls).items()})
    summary.update(run_dir=str(ctx.run_dir), mlflow_run_id=tracker.mlflow_run_id)
    atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    tracker.log_artifact(pred_path)
    tracker.log_artifact(ctx.run_dir / "config.json")  # the resolved config, as run
    tracker.log_table(_preview(df), "predictions_table.json")
    report = build_run_report(ctx.run_dir)  # plots and the HTML page, in MLflow too
    for path in (report.html, *report.plots.values()):
        tracker.log_artifact(path, REPORT_ARTIFACTS)
    # The run against its same-run baselines, among the charts of the run's page.
    tracker.log_chart(
        report.plots["headline"], key="headline/accuracy_vs_baselines", step=int(summary["samples"])
    )
    if tracker.mlflow_run_id is not None:  # the page MLflow opens on leads with the comparison
        tracker.client.set_tag(
            tracker.mlflow_run_id,
            "mlflow.note.content",
            artifacts.mlflow_description(
                summary,
                mlflow_run_id=tracker.mlflow_run_id,
                bars=f"{REPORT_ARTIFACTS}/{report.plots['headline_bars'].name}",
                curves=f"{REPORT_ARTIFACTS}/{report.plots['headline'].name}",
            ),
        )
    tracker.log_pool_manifest(
        {int(k): v for k, v in state.manifest.items()},
        pool_uri=ctx.pool_uri,
        table=DEFAULT_TABLE,
    )
    tracker.finish(summary)
    artifacts.publish_run(
        summary,
        mlflow_url=artifacts.mlflow_run_url(
            ctx.cfg.storage.resolved_tracking_uri(),
            experiment_id=getattr(tracker, "experiment_id", None),
            run_id=tracker.mlflow_run_id,
        ),
    )
    accuracy = summary.get("accuracy")
    cache = summary.get("student_image_cache_hit_rate")
    log.info(
        "run %s finished: accuracy %s, annotation rate %.3f, teacher calls %d, pool %d%s",
        ctx.run_id,
        f"{accuracy:.3f}" if accuracy is not None else "n/a",
        summary.get("annotation_rate") or 0.0,
        summary.get("teacher_calls", 0),
        summary.get("pool_size", 0),
        "" if cache is None else f", student image cache hits {cache:.0%}",
    )
    return summary


# ---------------------------------------------------------------------------- helpers
_PREVIEW = ("sample_id", "stream_pos", "question", "answers", "zs_answer", "queried",
            "teacher_label", "agreement", "demo_labels", "final_answer", "final_source",
            "score", "skip_reason")  # fmt: skip


def _preview(df: pl.DataFrame) -> pl.DataFrame:
    """The predictions' columns a reader scans first, lists joined into text (MLflow's
    table view shows them as cells)."""
    cols = [c for c in _PREVIEW if c in df.columns]
    return df.select(cols).with_columns(
        pl.col(c).list.join(" | ") for c in cols if isinstance(df.schema[c], pl.List)
    )


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
    run = FlowRunContext.get()
    return str(run.flow_run.id) if run is not None and run.flow_run is not None else "none"


def _loggable(running: dict[str, Any]) -> dict[str, float]:
    """The numeric running metrics worth a curve in MLflow."""
    return {
        k: float(v)
        for k, v in running.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_sum")
    }


def task_runner_for(cfg: Config) -> Any:
    """The Prefect task runner the config asks for: a thread pool of ``max_workers``, or
    Dask — the scheduler at ``dask_address``, else a local cluster the flow starts and
    closes (see :func:`dask_cluster_kwargs`)."""
    if cfg.pipeline.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.pipeline.dask_address:
            return DaskTaskRunner(address=cfg.pipeline.dask_address)
        return DaskTaskRunner(cluster_kwargs=dask_cluster_kwargs(cfg))
    return ThreadPoolTaskRunner(max_workers=cfg.pipeline.max_workers)


# Environment a worker process needs to find and load the same models and data.
WORKER_ENV = ("ICD_FIXTURES", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def dask_cluster_kwargs(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of ``distributed.LocalCluster`` for a local Dask cluster:
    ``dask_workers`` worker processes with one thread each on loopback, no dashboard.
    Workers get this process's fixture and Hugging Face variables and ``torch_threads``
    as their OpenMP/MKL thread count (torch reads it when it starts). Workers of a cluster
    at ``dask_address`` take all of this from their own environment."""
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if cfg.pipeline.torch_threads:
        threads = str(cfg.pipeline.torch_threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return {
        "n_workers": cfg.pipeline.dask_workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "env": env,
    }
