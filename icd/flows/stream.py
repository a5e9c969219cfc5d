"""The stream flow (Prefect flow ``icd``, deployment ``icd/stream``): online ICD over one
benchmark stream.

Per chunk (docs/design.md §4)::

    embed ─> score ─> select for annotation ─> teacher (vote) ─┬─> pool update ─┐
                                                               └─> student ICL ─┴─> [adapt] ─> evaluate, log
    (the student's demos come from the pool as it was before this chunk; [adapt]: the LoRA
    modes' training steps on the pool, used by the next chunks' student passes)

Embedding and zero-shot scoring do not depend on the pool (except scoring by an adapting
student), so with ``pipeline.lookahead`` > 0 they are submitted for the next chunks while the current chunk's sequential stages run
(with 0 they run in order, in the flow's thread). The pool update runs in the background
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
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import polars as pl
import torch
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from icd.config import Config, load_config
from icd.data.stream import Stream, open_stream
from icd.data.types import Chunk
from icd.flows import artifacts
from icd.method import metrics, steps
from icd.method.policy import PolicyState
from icd.pipeline.context import ChunkWork, ResumeState, RunContext, read_ledger
from icd.pipeline.runner import Runner, fresh_seconds, is_fresh
from icd.pipeline.stages import (
    adapt_student,
    annotate_with_teacher,
    evaluate_chunk,
    extract_embeddings,
    open_pool,
    pool_key,
    predict_icl,
    score_student,
    update_pool,
)
from icd.report import build_run_report
from icd.storage import results
from icd.storage.pool import DEFAULT_TABLE, PoolError, PoolView
from icd.storage.runstate import RunState, atomic_write_text
from icd.storage.tracking import Tracker

# Called after each committed chunk with (chunks_done, samples_done, total_samples or None);
# the CLI registers a rich progress bar here.
ChunkHook = Callable[[int, int, int | None], None]
CHUNK_HOOKS: list[ChunkHook] = []


@flow(name="icd", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
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
    try:
        runner = get_run_context().task_runner
    except Exception:
        return True
    # ThreadPoolTaskRunner keeps its size in `_max_workers` (Prefect 3.x; no public field).
    workers = getattr(runner, "_max_workers", cfg.pipeline.max_workers)
    return on_dask or workers == cfg.pipeline.max_workers


def _on_dask() -> bool:
    try:
        return type(get_run_context().task_runner).__name__ == "DaskTaskRunner"
    except Exception:
        return False


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
    runner = Runner(ctx, on_dask=_on_dask())
    progress = show_run(ctx=ctx, state=state)  # the Prefect UI: name, tags, progress
    chunks = src.chunks(cfg.pipeline.chunk_size, start_chunk=state.next_chunk)
    for work in runner.window(chunks, start=lambda c: embed_and_score(runner, ctx, chunk=c)):
        zero_shot(runner, ctx, work=work, state=state)  # embeddings, answers, uncertainty
        ask_teacher(runner, ctx, work=work, state=state)  # budgeted policy -> votes
        view = demo_view(ctx, work=work)  # the pool as it was before this chunk
        pooled = add_to_pool(runner, ctx, work=work)  # one pool commit, in the background
        answer_with_demos(runner, ctx, work=work, state=state, view=view)
        record_pool_commit(work=work, state=state, pooled=pooled)
        adapt(runner, ctx, work=work, state=state)  # finetune modes: LoRA steps on the pool
        evaluate_and_commit(ctx, work=work, state=state, tracker=tracker)
        progress.update(state.counters["samples_seen"])
    return finish(ctx, state=state, tracker=tracker)


# ---------------------------------------------------------------------------- the stages
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
        numbers = _accounted(st["running"], st["counters"], ctx.stream_length)
        tracker.log_metrics(_loggable(numbers), step=st["samples_seen"])
    state = ResumeState.load(ctx)
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
            "run %s: mode %s on %s (%s samples)", ctx.run_id, ctx.mode.name, ctx.cfg.data.dataset, n
        )
    return state


def embed_and_score(runner: Runner, ctx: RunContext, *, chunk: Chunk) -> ChunkWork:
    """Start the chunk's pool-independent stages: image embeddings and the student's
    zero-shot answers (they may run ahead of the current chunk; not the answers of a
    student that adapts to the pool, which wait for the previous chunk's adapter)."""
    work = ChunkWork(chunk)
    work.embedded = runner.ahead(extract_embeddings, ctx=ctx, chunk=chunk)
    if ctx.mode.student_zero_shot and not ctx.mode.adapt_student:
        work.scored = runner.ahead(score_student, ctx=ctx, chunk=chunk)
    return work


def zero_shot(runner: Runner, ctx: RunContext, *, work: ChunkWork, state: ResumeState) -> None:
    """Wait for the chunk's embeddings and zero-shot answers (an adapting student answers
    now, with the adapter after the previous chunk); the answers' uncertainty."""
    if ctx.mode.adapt_student and ctx.mode.student_zero_shot:
        work.scored = runner.now(score_student, ctx=ctx, chunk=work.chunk, adapter=state.adapter)
    emb = work.embedded.result()
    work.image_vecs = emb["image_vecs"]
    state.seconds["embed"] += fresh_seconds(work.embedded, emb)
    zs = work.scored.result() if work.scored is not None else None
    if zs is None or not zs["generations"]:  # teacher zero-shot mode: the student is idle
        work.zs_answers = [None] * len(work.valid)
        return
    state.seconds["score"] += fresh_seconds(work.scored, zs)
    _count_image_cache(state, run=work.scored, result=zs)
    state.counters["student_params"] = zs.get("params", 0)
    work.zs_prompt_tokens = [g.prompt_tokens or None for g in zs["generations"]]
    work.student_errors = [g.error for g in zs["generations"]]
    work.zs_answers, work.zs_unc = steps.student_outputs(
        zs["generations"], ctx.cfg.method.uncertainty
    )


def ask_teacher(runner: Runner, ctx: RunContext, *, work: ChunkWork, state: ResumeState) -> None:
    """The policy picks samples (a plain call: microseconds); the teacher answers them N
    times each and the answers are voted."""
    mask, policy = steps.teacher_queries(
        len(work.valid),
        uncertainties=work.zs_unc,
        state=PolicyState.from_dict(state.policy_state),
        cfg=ctx.cfg.method,
        stream_length=ctx.stream_length,
    )
    state.policy_state = policy.to_dict()
    work.queried_ids = [s.sample_id for s, q in zip(work.valid, mask, strict=True) if q]
    if not work.queried_ids:
        return
    t0 = time.perf_counter()
    voting = steps.annotation_voting(ctx.cfg.method)
    run = runner.now(
        annotate_with_teacher,
        ctx=ctx,
        chunk=work.chunk,
        queried_ids=work.queried_ids,
        voting=voting,
    )
    ann = run.result()
    (work.teacher_zs if ctx.mode.teacher_on_all else work.votes).update(ann["votes"])
    work.service = ann.get("service") or {}
    counters = state.counters
    counters["teacher_requests"] += ann["requests"]
    counters["teacher_samples"] += ann["samples"]
    if run.name == "Cached" and work.chunk.key not in state.ledgered:  # another run's answers
        counters["teacher_requests_reused"] += ann["requests"]
        counters["teacher_samples_reused"] += ann["samples"]
    state.seconds["annotate"] += time.perf_counter() - t0


def demo_view(ctx: RunContext, *, work: ChunkWork) -> PoolView | None:
    """The pool as it was before this chunk, when the mode answers with demonstrations
    (taken before this chunk's pool commit, which holds the pool's lock)."""
    if not (ctx.mode.use_icl and work.valid):
        return None
    return open_pool(ctx.pool_uri).view(ctx.run_id, before_chunk=work.chunk.index)


def add_to_pool(runner: Runner, ctx: RunContext, *, work: ChunkWork) -> Any:
    """Start the chunk's pool commit (its admitted annotations) in the background."""
    if not (ctx.mode.use_pool and work.votes):
        return None
    return runner.background(
        update_pool,
        ctx=ctx,
        chunk=work.chunk,
        votes=work.votes,
        image_vecs=work.image_vecs,
        uncertainties=work.zs_unc,
    )


def answer_with_demos(
    runner: Runner, ctx: RunContext, *, work: ChunkWork, state: ResumeState, view: PoolView | None
) -> None:
    """The student answers again, with demonstrations chosen from ``view``, for the samples
    whose final answer needs it."""
    if view is None:
        return
    need = steps.icl_mask([work.votes.get(s.sample_id) for s in work.valid], ctx.cfg.method)
    work.icl_rows = [i for i, n in enumerate(need) if n]
    t0 = time.perf_counter()
    run = runner.now(
        predict_icl,
        ctx=ctx,
        chunk=work.chunk,
        rows=work.icl_rows,
        image_vecs=work.image_vecs,
        zs_answers=work.zs_answers,
        view=view,
        pool_key=pool_key(view, lineage=state.lineage),
        adapter=state.adapter,
    )
    work.icl = run.result()
    _count_image_cache(state, run=run, result=work.icl)
    state.seconds["icl"] += time.perf_counter() - t0


def record_pool_commit(*, work: ChunkWork, state: ResumeState, pooled: Any) -> None:
    """Wait for the chunk's pool commit; its version goes into the run's manifest."""
    if pooled is None:
        return
    out = pooled.result()  # a future, or the final state on Dask
    state.manifest[str(work.chunk.index)] = out["version"]
    state.seconds["pool"] += out["seconds"]


def adapt(runner: Runner, ctx: RunContext, *, work: ChunkWork, state: ResumeState) -> None:
    """In the fine-tuning modes: LoRA steps on the pool as it is after this chunk; the next
    chunks' student passes use the new adapter (committed with the chunk)."""
    if not ctx.mode.adapt_student:
        return
    view = open_pool(ctx.pool_uri).view(ctx.run_id, before_chunk=work.chunk.index + 1)
    lineage = ResumeState.chain(state.lineage, work.chunk.key)
    run = runner.now(
        adapt_student,
        ctx=ctx,
        chunk=work.chunk,
        start=state.adapter,
        view=view,
        pool_key=pool_key(view, lineage=lineage),
    )
    out = run.result()
    state.adapter = out["adapter"]
    state.seconds["adapt"] += fresh_seconds(run, out)
    for k in ("steps", "tokens", "flops"):
        state.adapt[k] = state.adapt.get(k, 0) + out[k]
    state.adapt["peak_rss_mb"] = max(state.adapt.get("peak_rss_mb", 0.0), out["peak_rss_mb"])


def evaluate_and_commit(
    ctx: RunContext, *, work: ChunkWork, state: ResumeState, tracker: Tracker
) -> None:
    """Score the chunk, write its predictions, commit it (the run resumes after it), and
    log its metrics."""
    t0 = time.perf_counter()
    pool_size = open_pool(ctx.pool_uri).count(ctx.run_id) if ctx.mode.use_pool else 0
    chunk_m = evaluate_chunk(ctx=ctx, work=work, pool_size=pool_size)
    counters = state.counters
    state.running = running = metrics.merge_metrics(state.running, chunk_m)
    counters["samples_seen"] += len(work.chunk.samples)
    state.seconds["evaluate"] += time.perf_counter() - t0
    running.update(
        teacher_requests=counters["teacher_requests"], teacher_samples=counters["teacher_samples"]
    )
    state.extend_lineage(work.chunk.key)
    state.commit(ctx, work=work)
    numbers = _accounted(running, counters, ctx.stream_length)
    tracker.log_metrics(_loggable(numbers), step=counters["samples_seen"], background=True)
    accuracy = running.get("accuracy")
    get_run_logger().info(
        "chunk %d: %d samples, %d queried, accuracy so far %s, pool %d",
        work.chunk.index,
        len(work.chunk.samples),
        len(work.queried_ids),
        f"{accuracy:.3f}" if accuracy is not None else "n/a",
        pool_size,
    )
    for hook in CHUNK_HOOKS:
        hook(work.chunk.index + 1, counters["samples_seen"], ctx.stream_length)


def finish(ctx: RunContext, *, state: ResumeState, tracker: Tracker) -> dict[str, Any]:
    """Compact the pool, write the predictions and the summary, log them with the pool
    manifest to MLflow, and return the summary."""
    log = get_run_logger()
    pool = open_pool(ctx.pool_uri)
    if ctx.mode.use_pool and state.manifest:
        # Short runs never reach `compact_every` commits: compact once at the end too.
        try:
            pool.compact()
        except PoolError as e:  # maintenance: the rows are unaffected; the next run retries
            log.warning("pool compaction skipped: %s", e)
    df = results.read_predictions(ctx.run_dir)
    pred_path = ctx.run_dir / "predictions.parquet"
    df.write_parquet(pred_path)
    running = state.running or {}
    summary = results.summarize(
        df,
        {
            "run_id": ctx.run_id,
            "mode": ctx.cfg.method.mode,
            "dataset": ctx.cfg.data.dataset,
            "zs_accuracy": running.get("zs_accuracy"),
            "forward_accuracy": running.get("forward_accuracy"),
            "pool_size": pool.count(ctx.run_id) if ctx.mode.use_pool else 0,
            "seconds": state.seconds,
            "adapt": state.adapt,
            "student_params": state.counters.get("student_params", 0),
        },
        ctx.score,
        groups=ctx.class_groups,
        task=ctx.task_type,  # captioning runs add corpus BLEU / CIDEr
    )
    calls = [st["service"] for st in RunState(ctx.run_dir).all() if st.get("service")]
    if calls:  # remote teacher: retries, failures and latency percentiles of the run
        from icd.models.openai import summarize_stats

        summary.update({f"teacher_{k}": v for k, v in summarize_stats(calls).items()})
    made = read_ledger(ctx.ledger)
    summary.update(_accounted(summary, state.counters, ctx.stream_length))
    summary.update(
        # Generated by this run (its ledger, every attempt of the run) vs reused from the
        # cache; answers used = the two together (a chunk redone after a kill is one use).
        teacher_calls=sum(int(r["samples"]) for r in made),
        teacher_requests=sum(int(r["requests"]) for r in made),
        run_dir=str(ctx.run_dir),
        mlflow_run_id=tracker.mlflow_run_id,
    )
    atomic_write_text(ctx.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    tracker.log_artifact(pred_path)
    tracker.log_artifact(ctx.run_dir / "config.json")  # the resolved config, as run
    tracker.log_table(_preview(df), "predictions_table.json")
    report = build_run_report(ctx.run_dir)  # plots and the HTML page, in MLflow too
    for path in (report.html, *report.plots.values()):
        tracker.log_artifact(path, "report")
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


def _count_image_cache(state: ResumeState, *, run: Any, result: dict[str, Any]) -> None:
    """Add a student stage's image-cache hits and misses to the run's counters (not those
    of a result from the task cache: another run's)."""
    cache = result.get("image_cache") or {}
    if cache and is_fresh(run):
        state.counters["image_cache_hits"] += cache["hits"]
        state.counters["image_cache_misses"] += cache["misses"]


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


def _accounted(
    numbers: dict[str, Any], counters: dict[str, Any], stream_length: int | None
) -> dict[str, Any]:
    """Teacher accounting and the annotation rate as the budget counts them.

    ``teacher_answers_used`` counts every teacher answer behind this run's labels;
    ``teacher_calls_reused`` those that came from the task cache (made by another run), so
    ``teacher_calls`` (made by this run) is the difference. ``annotation_rate`` divides the
    queried samples by the denominator the budget uses: every stream sample, skipped ones
    included, when the stream length is known (``annotation_rate_of``: ``samples``); the
    valid samples seen otherwise (``valid_samples``). ``student_image_cache_hit_rate``
    (with its hits and misses): the share of the images in the hf student's prompts that
    its processed-image cache held (absent without the cache)."""
    out = dict(numbers)
    used = int(counters.get("teacher_samples", 0))
    reused = int(counters.get("teacher_samples_reused", 0))
    out.update(
        teacher_answers_used=used,
        teacher_calls_reused=reused,
        teacher_calls=used - reused,
        teacher_requests_reused=int(counters.get("teacher_requests_reused", 0)),
    )
    hits, misses = (int(counters.get(f"image_cache_{k}", 0)) for k in ("hits", "misses"))
    if hits + misses:  # the hf student's processed-image cache
        out.update(
            student_image_cache_hits=hits,
            student_image_cache_misses=misses,
            student_image_cache_hit_rate=hits / (hits + misses),
        )
    samples = int(numbers.get("samples") or 0)
    valid = samples - int(numbers.get("skipped") or 0)
    denominator, of = (
        (samples, "samples") if stream_length is not None else (valid, "valid_samples")
    )
    queried = int(numbers.get("queried") or 0)
    out["annotation_rate"] = queried / denominator if denominator else 0.0
    out["annotation_rate_of"] = of
    return out


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
