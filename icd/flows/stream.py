"""The stream flow (Prefect flow ``icd``, deployment ``icd/stream``): online ICD over one
benchmark stream.

Per chunk (DESIGN §4)::

    embed ─> score ─> select for annotation ─> teacher (vote) ─┬─> pool update ─┐
                                                               └─> student ICL ─┴─> evaluate, log
    (the student's demos come from the pool as it was before this chunk)

Embedding and zero-shot scoring do not depend on the pool, so with ``pipeline.lookahead``
> 0 they are submitted for the next chunks while the current chunk's sequential stages run
(with 0 they run in order, in the flow's thread). The pool update runs in the background
while the student answers with demonstrations, which come from the pool as it was before
the chunk. A chunk is committed (predictions parquet, pool version, policy state) before
the next one starts its sequential stages; a killed run restarts after its last committed
chunk.
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
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from icd.config import Config, load_config
from icd.data.stream import open_stream
from icd.data.types import Chunk
from icd.method import metrics, modes, steps
from icd.method.policy import PolicyState
from icd.method.voting import VoteResult
from icd.storage import results
from icd.storage.pool import PoolError
from icd.storage.runstate import RunState, atomic_write_text, resume_fingerprint
from icd.storage.tracking import Tracker
from icd.tasks.stages import (
    annotate_with_teacher,
    evaluate_chunk,
    extract_embeddings,
    open_pool,
    predict_icl,
    score_student,
    teacher_provenance,
    update_pool,
)

# Called after each committed chunk with (chunks_done, samples_done, total_samples or None);
# the CLI registers a rich progress bar here.
ChunkHook = Callable[[int, int, int | None], None]
CHUNK_HOOKS: list[ChunkHook] = []

STAGES = ("embed", "score", "annotate", "pool", "icl", "evaluate")
# Most chunks that were in flight at once in this process (instrumentation for lookahead).
IN_FLIGHT_PEAK = [0]


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


def _pool_key(ids: Any, labels: list[str], lineage: str) -> str:
    """Fingerprint of a pool view's content: which rows, with which labels, and the content
    of the chunks they came from (``lineage``, see :func:`_chain`), which fixes their
    images and questions."""
    text = "\n".join(f"{i}\t{label}" for i, label in zip(ids, labels, strict=True))
    return hashlib.sha256(f"{lineage}\n{text}".encode()).hexdigest()[:16]


def _chain(lineage: str, chunk_key: str) -> str:
    """The content lineage after one more chunk: a hash chain of the run's chunk keys."""
    return hashlib.sha256(f"{lineage}|{chunk_key}".encode()).hexdigest()[:32]


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
    if cfg.pipeline.task_runner == "dask" and not on_dask:
        # The task runner is part of the flow's options: rerun as a subflow on Dask.
        return stream_flow_for(cfg)(
            config_json=cfg.model_dump_json(),
            run_id=run_id,
            parent_mlflow_run_id=parent_mlflow_run_id,
        )
    with _api_for_workers() if on_dask else nullcontext():
        return run_stream(cfg, run_id=run_id, parent_mlflow_run_id=parent_mlflow_run_id)


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
    """The body of the stream flow for an already resolved config."""
    log = get_run_logger()
    if cfg.pipeline.torch_threads:
        torch.set_num_threads(cfg.pipeline.torch_threads)
    run_id = run_id or cfg.run_id or new_run_id(cfg)
    cfg = cfg.model_copy(update={"run_id": run_id})
    run_dir = cfg.storage.results_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = RunState(run_dir)
    store.check_config(resume_fingerprint(cfg))
    atomic_write_text(run_dir / "config.json", cfg.model_dump_json(indent=2))

    src = open_stream(cfg.data)
    task_type, class_names, synonyms = src.task, src.class_names, src.synonyms
    prompt_classes = class_names if cfg.method.list_classes_in_prompt else None
    mode = modes.mode_spec(cfg.method.mode)
    sel_cfg = modes.selection_config(cfg.method)
    pool_uri = cfg.storage.resolved_pool_uri()
    ledger = str(run_dir / "teacher_calls.jsonl")
    chunk_size = cfg.pipeline.chunk_size
    scope = "" if cfg.pipeline.cache else run_id  # share task results across runs or not
    # Persisted task results (the cache) live under the storage root unless configured.
    cache_dir = cfg.storage.resolved_cache_dir()
    embed_task, score_task, annotate_task, icl_task = (
        t.with_options(result_storage=cache_dir)
        for t in (extract_embeddings, score_student, annotate_with_teacher, predict_icl)
    )

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
    tracker.log_dataset(src.dataset_info())

    # Resume: carry the state of the last committed chunk; re-log committed chunks' metrics
    # (the tracker skips steps it already has, so a kill between commit and log loses none).
    done = store.all()
    for st in done:
        tracker.log_metrics(
            _loggable(_accounted(st["running"], st["counters"], src.length)),
            step=st["samples_seen"],
        )
    last = done[-1] if done else None
    start_chunk = last["chunk"] + 1 if last else 0
    policy_state: dict[str, Any] = last["policy_state"] if last else PolicyState().to_dict()
    counters: dict[str, int] = (
        dict(last["counters"])
        if last
        else dict.fromkeys(("samples_seen", "teacher_requests", "teacher_samples"), 0)
    )
    # Teacher answers used (`teacher_samples`) are either generated by this run (recorded in
    # its ledger, across resumes) or reused from the task cache (another run made them).
    counters.setdefault("teacher_samples_reused", 0)
    counters.setdefault("teacher_requests_reused", 0)
    ledgered = {r["chunk_key"] for r in _read_ledger(ledger)}
    running: dict[str, Any] | None = last["running"] if last else None
    manifest: dict[str, int] = dict(last["manifest"]) if last else {}
    seconds: dict[str, float] = dict(last["seconds"]) if last else dict.fromkeys(STAGES, 0.0)
    lineage: str = last.get("lineage", "") if last else ""
    if last:
        log.info(
            "run %s: resuming after chunk %d (%d samples done)",
            run_id,
            last["chunk"],
            counters["samples_seen"],
        )
    else:
        log.info(
            "run %s: mode %s on %s (%s samples)",
            run_id,
            cfg.method.mode,
            cfg.data.dataset,
            src.length if src.length is not None else "unknown",
        )

    # Bulky task arguments (the chunk with its images, generations, votes) are passed as
    # quote(...): Prefect then hands them over as they are instead of walking every nested
    # object for futures on each call (cache keys are computed on the unquoted values).
    # Not to Dask, which turns tuple subclasses such as quote into plain tuples.
    on_dask = _on_dask()
    ahead = quote if not on_dask else lambda x: x

    def submit_ahead(chunk: Chunk) -> tuple[Chunk, Any, Any]:
        """The chunk's embedding and zero-shot scoring: futures when they run ahead, final
        states when they run here and now (lookahead 0: in order, nothing to overlap)."""
        if cfg.pipeline.lookahead:
            run = lambda t, *args: t.submit(ahead(chunk), *args)  # noqa: E731
        else:
            run = lambda t, *args: t(quote(chunk), *args, return_state=True)  # noqa: E731
        emb = run(embed_task, chunk.key, cfg.models.embedder, scope)
        zs = None
        if mode.student_zero_shot:
            zs = run(score_task, chunk.key, cfg.models.student, task_type, prompt_classes, scope)
        return chunk, emb, zs

    # The pool-independent stages of up to `lookahead` chunks run ahead of the current one.
    # The stream is read once, in one pass: one iterator (a resumed run skips the committed
    # chunks once, without decoding them). Reading is a plain call, not a task: `datasets`
    # retries streamed reads itself, and a task run would cost more than reading a chunk.
    in_flight: deque[tuple[Chunk, Any, Any]] = deque()
    reader = src.chunks(chunk_size, start_chunk=start_chunk)
    exhausted = False
    while True:
        while len(in_flight) <= cfg.pipeline.lookahead and not exhausted:
            chunk = next(reader, None)
            if chunk is None or not chunk.samples:
                exhausted = True
                break
            in_flight.append(submit_ahead(chunk))
        if not in_flight:
            break
        chunk, emb_f, zs_f = in_flight.popleft()
        IN_FLIGHT_PEAK[0] = max(IN_FLIGHT_PEAK[0], len(in_flight) + 1)
        emb = emb_f.result()
        zs = zs_f.result() if zs_f is not None else None
        seconds["embed"] += _fresh_seconds(emb_f, emb)
        seconds["score"] += _fresh_seconds(zs_f, zs) if zs else 0.0
        valid = chunk.valid
        zs_gens = zs["generations"] if zs else []
        if zs_gens:
            zs_answers, zs_unc = steps.student_outputs(zs_gens, cfg.method.uncertainty)
        else:  # teacher zero-shot mode: the student does not answer (nor query, nor pool)
            zs_answers, zs_unc = [None] * len(valid), None

        # Teacher: the budgeted policy picks samples; N answers each are voted.
        votes: dict[str, VoteResult] = {}
        teacher_zs: dict[str, VoteResult] = {}
        queried_ids: list[str] = []
        service: dict[str, Any] = {}  # a remote teacher's request accounting for this chunk
        if mode.teacher_on_all:
            queried_ids = [s.sample_id for s in valid]
        elif mode.query_teacher and valid:
            # The policy runs sample by sample over the chunk (a plain call: microseconds).
            mask, state = steps.select_queries(
                zs_unc, PolicyState.from_dict(policy_state), cfg.method, src.length
            )
            policy_state = state.to_dict()
            queried_ids = [s.sample_id for s, q in zip(valid, mask, strict=True) if q]
        if queried_ids:
            t0 = time.perf_counter()
            voting = cfg.method.voting
            if mode.teacher_on_all:  # one greedy zero-shot answer per sample
                voting = voting.model_copy(
                    update={"n": 1, "temperature": 0.0, "include_greedy": True, "a_min": 0.0}
                )
            ann_state = annotate_task(
                quote(chunk),
                chunk.key,
                queried_ids,
                cfg.models.teacher,
                voting,
                task_type,
                class_names,
                synonyms,
                cfg.seed,
                ledger,
                scope,
                return_state=True,
            )
            ann = ann_state.result()
            (teacher_zs if mode.teacher_on_all else votes).update(ann["votes"])
            counters["teacher_requests"] += ann["requests"]
            counters["teacher_samples"] += ann["samples"]
            if ann_state.name == "Cached" and chunk.key not in ledgered:
                counters["teacher_requests_reused"] += ann["requests"]
                counters["teacher_samples_reused"] += ann["samples"]
            service = ann.get("service") or {}
            seconds["annotate"] += time.perf_counter() - t0

        # Student ICL with demos from the pool as it was before this chunk, while this
        # chunk's accepted annotations go into the pool (one LanceDB commit) in the
        # background (in order on Dask, whose workers would each commit through a handle
        # of their own). The view is taken first: the commit holds the pool's lock.
        icl_rows: list[int] = []
        view = None
        if mode.use_icl and valid:
            need = steps.icl_mask([votes.get(s.sample_id) for s in valid], cfg.method)
            icl_rows = [i for i, n in enumerate(need) if n]
            view = open_pool(pool_uri).view(run_id, before_chunk=chunk.index)
        pool_f = None
        if mode.use_pool and votes:
            pool_args = (
                pool_uri,
                run_id,
                ahead(chunk),
                ahead(votes),
                emb["image_vecs"],
                zs_unc,
                teacher_provenance(cfg.models.teacher),
                cfg.models.embedder,
                cfg.storage.compact_every,
            )
            if on_dask:
                pool_f = update_pool(*pool_args, return_state=True)
            else:
                pool_f = update_pool.submit(*pool_args)
        icl = None
        if view is not None:
            t0 = time.perf_counter()
            icl = icl_task(
                quote(chunk),
                chunk.key,
                icl_rows,
                emb["image_vecs"],
                zs_answers,
                pool_uri,
                run_id,
                quote(view),
                _pool_key(view.ids, list(view.labels), lineage),
                cfg.models.student,
                cfg.models.embedder,
                sel_cfg,
                task_type,
                prompt_classes,
                cfg.seed,
                scope,
            )
            seconds["icl"] += time.perf_counter() - t0
        if pool_f is not None:
            pooled = pool_f.result()  # a future, or the final state on Dask
            manifest[str(chunk.index)] = pooled["version"]
            seconds["pool"] += pooled["seconds"]

        t0 = time.perf_counter()
        pool_size = open_pool(pool_uri).count(run_id) if mode.use_pool else 0
        chunk_m = evaluate_chunk(
            run_dir,
            run_id,
            cfg.data.dataset,
            chunk,
            cfg.method,
            task_type,
            synonyms,
            zs_answers,
            zs_unc,
            votes,
            teacher_zs,
            icl,
            icl_rows,
            pool_size,
            class_names=class_names,
        )
        running = metrics.merge_metrics(running, chunk_m)
        counters["samples_seen"] += len(chunk.samples)
        seconds["evaluate"] += time.perf_counter() - t0
        running.update(
            teacher_requests=counters["teacher_requests"],
            teacher_samples=counters["teacher_samples"],
        )
        lineage = _chain(lineage, chunk.key)
        store.commit(
            chunk.index,
            {
                "samples_seen": counters["samples_seen"],
                "policy_state": policy_state,
                "counters": counters,
                "running": running,
                "manifest": manifest,
                "seconds": seconds,
                "service": service,
                "lineage": lineage,
            },
        )
        tracker.log_metrics(
            _loggable(_accounted(running, counters, src.length)),
            step=counters["samples_seen"],
            background=True,
        )
        log.info(
            "chunk %d: %d samples, %d queried, accuracy so far %s, pool %d",
            chunk.index,
            len(chunk.samples),
            len(queried_ids),
            f"{running['accuracy']:.3f}" if running.get("accuracy") is not None else "n/a",
            pool_size,
        )
        for hook in CHUNK_HOOKS:
            hook(chunk.index + 1, counters["samples_seen"], src.length)

    if mode.use_pool and manifest:
        # Short runs never reach `compact_every` commits: compact once at the end too.
        try:
            open_pool(pool_uri).compact()
        except PoolError as e:  # maintenance: the rows are unaffected; the next run retries
            log.warning("pool compaction skipped: %s", e)

    # Summary, artifacts, lineage.
    df = results.read_predictions(run_dir)
    pred_path = run_dir / "predictions.parquet"
    df.write_parquet(pred_path)
    summary = results.summarize(
        df,
        {
            "run_id": run_id,
            "mode": cfg.method.mode,
            "dataset": cfg.data.dataset,
            "zs_accuracy": (running or {}).get("zs_accuracy"),
            "forward_accuracy": (running or {}).get("forward_accuracy"),
            "pool_size": open_pool(pool_uri).count(run_id) if mode.use_pool else 0,
            "seconds": seconds,
        },
    )
    calls = [st["service"] for st in store.all() if st.get("service")]
    if calls:  # remote teacher: retries, failures and latency percentiles of the run
        from icd.models.openai import summarize_stats

        summary.update({f"teacher_{k}": v for k, v in summarize_stats(calls).items()})
    made = _read_ledger(ledger)
    summary.update(_accounted(summary, counters, src.length))
    summary.update(
        # Generated by this run (its ledger, every attempt of the run) vs reused from the
        # cache; answers used = the two together (a chunk redone after a kill is one use).
        teacher_calls=sum(int(r["samples"]) for r in made),
        teacher_requests=sum(int(r["requests"]) for r in made),
        run_dir=str(run_dir),
        mlflow_run_id=mlflow_run_id,
    )
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    tracker.log_artifact(pred_path)
    tracker.log_pool_manifest({int(k): v for k, v in manifest.items()})
    tracker.finish(summary)
    log.info(
        "run %s finished: accuracy %s, annotation rate %.3f, teacher calls %d, pool %d",
        run_id,
        f"{summary['accuracy']:.3f}" if summary.get("accuracy") is not None else "n/a",
        summary.get("annotation_rate") or 0.0,
        summary.get("teacher_calls", 0),
        summary.get("pool_size", 0),
    )
    return summary


def _read_ledger(path: str) -> list[dict[str, Any]]:
    """The teacher rounds this run made (one JSON line each, written by the annotate task)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    return out


def _accounted(
    numbers: dict[str, Any], counters: dict[str, Any], stream_length: int | None
) -> dict[str, Any]:
    """Teacher accounting and the annotation rate as the budget counts them.

    ``teacher_answers_used`` counts every teacher answer behind this run's labels;
    ``teacher_calls_reused`` those that came from the task cache (made by another run), so
    ``teacher_calls`` (made by this run) is the difference. ``annotation_rate`` divides the
    queried samples by the denominator the budget uses: every stream sample, skipped ones
    included, when the stream length is known (``annotation_rate_of``: ``samples``); the
    valid samples seen otherwise (``valid_samples``)."""
    out = dict(numbers)
    used = int(counters.get("teacher_samples", 0))
    reused = int(counters.get("teacher_samples_reused", 0))
    out.update(
        teacher_answers_used=used,
        teacher_calls_reused=reused,
        teacher_calls=used - reused,
        teacher_requests_reused=int(counters.get("teacher_requests_reused", 0)),
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


def _fresh_seconds(run: Any, result: dict[str, Any]) -> float:
    """Seconds a stage (its future, or its final state) really spent: 0 when its result came
    from the task cache (the persisted result carries the seconds of the run that computed
    it)."""
    state = getattr(run, "state", run)
    return 0.0 if state.name == "Cached" else float(result["seconds"])


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
