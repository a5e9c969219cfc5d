"""The stream flow (Prefect flow ``icd``, deployment ``icd/stream``): online ICD over one
benchmark stream.

Per chunk (docs/design.md §4), one stage per module of :mod:`icd.tasks`::

    embed ─> zero_shot ─> annotate (policy, teacher votes) ─┬─> pool ─┐
                                                            └─> icl ──┴─> [adapt] ─> evaluate ─> commit
    (icl: the student's demos come from the pool as it was before this chunk; adapt: the
    LoRA modes' training steps on the pool, used by the next chunks' student passes)

Each stage returns a typed result (image vectors, ``Answers``, ``Labels``,
``Demonstrated``, ``Pooled``, ``Adapted``, the chunk's sums) that the flow passes to the
stages that read it; the run's state after the chunk is made from them in one place
(:func:`advance`) and committed.

Embedding and the zero-shot answers do not depend on the pool (except those of an adapting
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
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict

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
from icd.jsontypes import JSONObject
from icd.method import accounting, steps
from icd.method.accounting import ChunkSums, Made, RunSummary
from icd.report import build_run_report
from icd.storage import results
from icd.storage.locks import atomic_file
from icd.storage.pool import DEFAULT_TABLE, PoolError
from icd.storage.runstate import atomic_write_text
from icd.storage.tracking import Tracker
from icd.tasks import adapt, annotate, embed, evaluate, icl, pool, zero_shot
from icd.tasks.base import open_pool
from icd.tasks.context import Ledger, ResumeState, RunContext, add_counts, chain
from icd.tasks.runner import Books, Pending, Runner

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
) -> JSONObject:
    """Run online ICD over one benchmark stream and return the run summary in its JSON
    form (``summary.json``'s; :meth:`RunSummary.from_json` reads it back): a flow's
    result travels through Prefect, to a parent flow or a deployment's caller.

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
        summary = run_stream(cfg, run_id=run_id, parent_mlflow_run_id=parent_mlflow_run_id)
    return summary.to_json()


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
) -> RunSummary:
    """The body of the stream flow for an already resolved config: set the run up (or
    resume it), run its chunks (:func:`run_chunk`, the diagram above), each followed by
    the run's state after it (:func:`advance`) and its commit, then :func:`finish`."""
    if cfg.pipeline.torch_threads:
        torch.set_num_threads(cfg.pipeline.torch_threads)
    src = open_stream(cfg.data)
    ctx = RunContext.create(cfg, src, run_id=run_id)
    tracker = start_tracking(ctx=ctx, src=src, parent_mlflow_run_id=parent_mlflow_run_id)
    ledger = Ledger.read(ctx.ledger)
    state = resume(ctx=ctx, tracker=tracker, ledger=ledger)
    runner = Runner(
        lookahead=cfg.pipeline.lookahead,
        on_dask=_on_dask(),
        cache_dir=ctx.cache_dir,
        books=Books.resumed(seconds=state.seconds, cached=state.cached),
    )
    grades = PoolGrades.rebuild(ctx, resumed=state.next_chunk > 0)
    progress = show_run(ctx=ctx, state=state)  # the Prefect UI: name, tags, progress
    chunks = src.chunks(cfg.pipeline.chunk_size, start_chunk=state.next_chunk)
    for started in runner.window(chunks, start=lambda c: start_chunk(runner, ctx, chunk=c)):
        chunk = started.chunk
        results = run_chunk(runner, ctx, started=started, state=state, ledger=ledger)
        pool_after = grades.measure(ctx, chunk=chunk, labels=results.labels)
        state = advance(state, chunk=chunk, results=results, books=runner.books, pool=pool_after)
        commit(ctx, chunk=chunk, state=state, labels=results.labels, tracker=tracker)
        progress.update(state.samples_seen)
    return finish(ctx, state=state, books=runner.books, tracker=tracker)


def run_chunk(
    runner: Runner, ctx: RunContext, *, started: StartedChunk, state: ResumeState, ledger: Ledger
) -> ChunkResults:
    """One chunk through the stages (its pool-independent ones ``started`` ahead), with
    the run's ``state`` after the previous chunk: each stage's typed result goes to the
    stages that read it."""
    chunk = started.chunk
    image_vecs = embed.collect(runner, pending=started.embedding)
    answers = zero_shot.collect(
        runner, ctx, chunk=chunk, pending=started.answering, adapter=state.adapter
    )
    labels = annotate.run(  # the budgeted policy picks samples; the teacher votes
        runner,
        ctx,
        chunk=chunk,
        answers=answers,
        policy=state.policy_state,
        ledgered=ledger.chunk_keys,
    )
    view = icl.demo_view(ctx, chunk=chunk)  # the pool as it was before this chunk
    pooling = pool.submit(  # one pool commit, in the background
        runner, ctx, chunk=chunk, labels=labels, image_vecs=image_vecs, answers=answers
    )
    demos = icl.run(
        runner,
        ctx,
        chunk=chunk,
        answers=answers,
        labels=labels,
        image_vecs=image_vecs,
        view=view,
        gate=state.icl_gate_state,
        lineage=state.lineage,
        adapter=state.adapter,
    )
    pooled = pool.collect(runner, pending=pooling)
    adapted = adapt.run(  # finetune modes: LoRA on the pool after the chunk
        runner, ctx, chunk=chunk, start=state.adapter, lineage=state.lineage
    )
    sums = evaluate.run(runner, ctx, chunk=chunk, answers=answers, labels=labels, demos=demos)
    return ChunkResults(answers, labels, demos, pooled, adapted, sums)


@dataclass(frozen=True)
class StartedChunk:
    """A chunk with its pool-independent stages started (they may run ahead of the current
    chunk): its embeddings and (unless the student adapts to the pool) its zero-shot
    answers."""

    chunk: Chunk
    embedding: Pending[embed.Embedded]
    answering: Pending[zero_shot.StudentPass] | None


def start_chunk(runner: Runner, ctx: RunContext, *, chunk: Chunk) -> StartedChunk:
    """Start the chunk's pool-independent stages."""
    return StartedChunk(
        chunk,
        embedding=embed.submit(runner, ctx, chunk=chunk),
        answering=zero_shot.submit(runner, ctx, chunk=chunk),
    )


@dataclass(frozen=True)
class ChunkResults:
    """What a chunk's stages returned."""

    answers: zero_shot.Answers
    labels: annotate.Labels
    demos: icl.Demonstrated
    pooled: pool.Pooled | None
    adapted: adapt.Adapted | None
    sums: ChunkSums


def advance(
    state: ResumeState,
    *,
    chunk: Chunk,
    results: ChunkResults,
    books: Books,
    pool: tuple[int, float | None],
) -> ResumeState:
    """The run's state after ``chunk``: ``state`` moved on by the chunk's stage
    ``results``, the runner's ``books`` and the pool's size and label precision after
    the chunk (``pool``). The one place the run's state changes."""
    r = results
    manifest, adapter, adapted = dict(state.manifest), state.adapter, dict(state.adapt)
    if r.pooled is not None:
        manifest[str(chunk.index)] = r.pooled.version
    if r.adapted is not None:
        adapter = r.adapted.adapter
        a = r.adapted
        for k, v in (("steps", a.steps), ("tokens", a.tokens), ("flops", a.flops)):
            adapted[k] = adapted.get(k, 0) + v
        adapted["peak_rss_mb"] = max(adapted.get("peak_rss_mb", 0.0), a.peak_rss_mb)
    counters = add_counts(
        state.counters,
        r.answers.counts,
        r.labels.counts,
        r.demos.counts,
        r.pooled.counts if r.pooled is not None else {},
        {"samples_seen": len(chunk.samples)},
    )
    made = state.made
    return replace(
        state,
        chunk=chunk.index,
        policy_state=r.labels.policy,
        icl_gate_state=r.demos.gate,
        counters=counters,
        running=r.sums if state.running is None else state.running + r.sums,
        manifest=manifest,
        seconds=dict(books.seconds),
        cached=dict(books.cached),
        service=r.labels.service,
        lineage=chain(state.lineage, chunk.key),
        adapter=adapter,
        adapt=adapted,
        student_params=state.student_params if r.answers.params is None else r.answers.params,
        pool_size=pool[0],
        pool_precision=pool[1],
        made=Made(made.answers + r.labels.made.answers, made.requests + r.labels.made.requests),
    )


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


def resume(*, ctx: RunContext, tracker: Tracker, ledger: Ledger) -> ResumeState:
    """The state after the last committed chunk; committed chunks' metrics are logged again
    (the tracker skips steps it already has, so a kill between commit and log loses none)."""
    log = get_run_logger()
    for st in ResumeState.committed(ctx):
        tracker.log_metrics(_loggable(running_numbers(st)), step=st.samples_seen)
    state = ResumeState.load(ctx, counters=tasks.COUNTERS, ledger=ledger)
    if state.next_chunk:
        log.info(
            "run %s: resuming after chunk %d (%d samples done)",
            ctx.run_id,
            state.chunk,
            state.samples_seen,
        )
    else:
        n = ctx.stream_length if ctx.stream_length is not None else "unknown"
        log.info(
            "run %s: mode %s on %s (%s samples)", ctx.run_id, ctx.plan.mode, ctx.cfg.data.dataset, n
        )
    return state


def running_numbers(state: ResumeState) -> dict[str, float | None]:
    """The numbers logged after a committed chunk (:func:`accounting.running_numbers`)."""
    assert state.running is not None  # every committed chunk has its sums
    return accounting.running_numbers(
        state.running,
        counters=state.counters,
        made=state.made,
        pool_size=state.pool_size,
        pool_precision=state.pool_precision,
    )


def commit(
    ctx: RunContext,
    *,
    chunk: Chunk,
    state: ResumeState,
    labels: annotate.Labels,
    tracker: Tracker,
) -> None:
    """Commit ``chunk`` with the run's ``state`` after it (the run resumes after it) and
    log its running numbers."""
    state.commit(ctx)
    numbers = running_numbers(state)
    tracker.log_metrics(_loggable(numbers), step=state.samples_seen, background=True)
    accuracy = numbers.get("accuracy")
    get_run_logger().info(
        "chunk %d: %d samples, %d queried, accuracy so far %s, pool %d",
        state.chunk,
        len(chunk.samples),
        len(labels.queried_ids),
        f"{accuracy:.3f}" if accuracy is not None else "n/a",
        state.pool_size,
    )
    for hook in CHUNK_HOOKS:
        hook(state.next_chunk, state.samples_seen, ctx.stream_length)


class PoolGrades:
    """The label precision of the run's pool: the true answers of its pooled samples, and
    each pooled label's score (a row's label is fixed within a run: each scored once).
    Not committed: a resumed run rebuilds it from its predictions."""

    def __init__(self, truth: dict[str, list[str]] | None = None) -> None:
        self.truth = truth or {}
        self.scores: dict[str, float] = {}

    @classmethod
    def rebuild(cls, ctx: RunContext, *, resumed: bool) -> PoolGrades:
        """The grades of a run's pool so far (empty for a new run or a plan without one)."""
        if not (ctx.plan.pool and resumed):
            return cls()
        pooled = results.read_predictions(ctx.run_dir).filter(pl.col("accepted"))
        return cls(dict(zip(pooled["sample_id"], pooled["answers"].to_list(), strict=True)))

    def measure(
        self, ctx: RunContext, *, chunk: Chunk, labels: annotate.Labels
    ) -> tuple[int, float | None]:
        """The run's pool after ``chunk`` (whose admitted ``labels`` join it): its rows left
        for selection and their label precision
        (:func:`icd.method.accounting.pool_precision`)."""
        if not ctx.plan.pool:
            return 0, None
        admitted = steps.pool_mask([labels.vote(s.sample_id) for s in chunk.valid])
        for s, pooled in zip(chunk.valid, admitted, strict=True):
            if pooled:
                self.truth[s.sample_id] = list(s.answers)
        live = open_pool(ctx.pool_uri).view(ctx.run_id)
        for sid, label in zip(map(str, live.ids), live.labels, strict=True):
            truth = self.truth.get(sid)
            if truth and sid not in self.scores:
                self.scores[sid] = ctx.score(str(label), list(truth))
        return len(live), accounting.pool_precision(
            [self.scores[k] for k in map(str, live.ids) if k in self.scores]
        )


def finish(ctx: RunContext, *, state: ResumeState, books: Books, tracker: Tracker) -> RunSummary:
    """The end of a run: compact the pool, write the predictions table and the summary,
    log them with the report and the pool manifest to MLflow, publish the headline as
    Prefect artifacts, and return the summary."""
    compact_pool(ctx, state=state)
    df = write_predictions(ctx)
    summary = summarize(ctx, df=df, state=state, books=books, mlflow_run_id=tracker.mlflow_run_id)
    atomic_write_text(
        ctx.run_dir / "summary.json", json.dumps(summary.to_json(), indent=2, default=str)
    )
    log_to_mlflow(ctx, df=df, summary=summary, state=state, tracker=tracker)
    artifacts.publish_run(
        summary,
        mlflow_url=artifacts.mlflow_run_url(
            ctx.cfg.storage.resolved_tracking_uri(),
            experiment_id=getattr(tracker, "experiment_id", None),
            run_id=tracker.mlflow_run_id,
        ),
    )
    cache = summary.student_image_cache_hit_rate
    get_run_logger().info(
        "run %s finished: accuracy %s, annotation rate %.3f, teacher calls %d, pool %d%s",
        ctx.run_id,
        f"{summary.accuracy:.3f}" if summary.accuracy is not None else "n/a",
        summary.annotation_rate or 0.0,
        summary.teacher_calls,
        summary.pool_size,
        "" if cache is None else f", student image cache hits {cache:.0%}",
    )
    return summary


def compact_pool(ctx: RunContext, *, state: ResumeState) -> None:
    """Compact the pool once at the end of a run that wrote to it (short runs never reach
    ``storage.compact_every`` commits). Maintenance: a failure leaves the rows as they are
    and is logged; the next run retries."""
    if not (ctx.plan.pool and state.manifest):
        return
    try:
        open_pool(ctx.pool_uri).compact()
    except PoolError as e:
        get_run_logger().warning("pool compaction skipped: %s", e)


def write_predictions(ctx: RunContext) -> pl.DataFrame:
    """The run's predictions, its chunks' tables as one, written as ``predictions.parquet``
    (atomically: a reader never sees half of it, nor does a resume)."""
    df = results.read_predictions(ctx.run_dir)
    with atomic_file(ctx.run_dir / "predictions.parquet") as tmp:
        df.write_parquet(tmp)
    return df


def summarize(
    ctx: RunContext,
    *,
    df: pl.DataFrame,
    state: ResumeState,
    books: Books,
    mlflow_run_id: str | None,
) -> RunSummary:
    """The run's summary (:func:`icd.method.accounting.summarize_run`) from its predictions
    ``df``, its final ``state`` and the runner's ``books``, with a remote teacher's service
    numbers over every committed chunk, and where the run is stored and tracked."""
    totals = accounting.RunTotals(
        run_id=ctx.run_id,
        mode=ctx.cfg.method.mode,
        dataset=ctx.cfg.data.dataset,
        counters=dict(state.counters),
        made=state.made,
        seconds=books.seconds,
        cached=books.cached,
        adapt=state.adapt,
        student_params=state.student_params,
        pool_size=state.pool_size,
        pool_precision=state.pool_precision,
        chunks_in_flight_peak=books.in_flight_peak,
    )
    summary = accounting.summarize_run(
        df,
        totals,
        sums=state.running,
        score_fn=ctx.score,
        groups=ctx.class_groups,
        task=ctx.task_type,  # captioning runs add corpus BLEU / CIDEr
    )
    service = None
    calls = [st.service for st in ResumeState.committed(ctx) if st.service]
    if calls:  # remote teacher: retries, failures and latency percentiles of the run
        from icd.models.openai import summarize_stats

        stats = {f"teacher_{k}": v for k, v in summarize_stats(calls).items()}
        service = accounting.TeacherServiceStats.from_json(stats)
    return replace(
        summary, teacher_service=service, run_dir=str(ctx.run_dir), mlflow_run_id=mlflow_run_id
    )


def log_to_mlflow(
    ctx: RunContext, *, df: pl.DataFrame, summary: RunSummary, state: ResumeState, tracker: Tracker
) -> None:
    """Log the finished run to its MLflow run: the predictions (and a preview table), the
    resolved config, the run report (its plots and HTML page; the headline plot among the
    run's charts, its bars atop the run's description), the pool manifest and the
    summary; then close the run."""
    tracker.log_artifact(ctx.run_dir / "predictions.parquet")
    tracker.log_artifact(ctx.run_dir / "config.json")  # the resolved config, as run
    tracker.log_table(_preview(df), "predictions_table.json")
    report = build_run_report(ctx.run_dir)
    for path in (report.html, *report.plots.values()):
        tracker.log_artifact(path, REPORT_ARTIFACTS)
    tracker.log_chart(
        report.plots["headline"], key="headline/accuracy_vs_baselines", step=summary.samples
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
    tracker.finish(summary.to_json())


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


def _loggable(running: Mapping[str, float | None]) -> dict[str, float]:
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
        return DaskTaskRunner(cluster_kwargs=dict(dask_cluster_kwargs(cfg)))
    return ThreadPoolTaskRunner(max_workers=cfg.pipeline.max_workers)


# Environment a worker process needs to find and load the same models and data.
WORKER_ENV = ("ICD_FIXTURES", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class LocalClusterOptions(TypedDict):
    """Keyword arguments of ``distributed.LocalCluster``."""

    n_workers: int
    threads_per_worker: int
    processes: bool
    host: str
    dashboard_address: str | None
    env: dict[str, str]


def dask_cluster_kwargs(cfg: Config) -> LocalClusterOptions:
    """Keyword arguments of ``distributed.LocalCluster`` for a local Dask cluster:
    ``dask_workers`` worker processes with one thread each on loopback, no dashboard.
    Workers get this process's fixture and Hugging Face variables and ``torch_threads``
    as their OpenMP/MKL thread count (torch reads it when it starts). Workers of a cluster
    at ``dask_address`` take all of this from their own environment."""
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if cfg.pipeline.torch_threads:
        threads = str(cfg.pipeline.torch_threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return LocalClusterOptions(
        n_workers=cfg.pipeline.dask_workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        env=env,
    )
