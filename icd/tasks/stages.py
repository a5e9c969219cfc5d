"""Prefect tasks: one per pipeline stage that calls a model or writes the pool, each working
on a whole chunk. Reading a chunk, the annotation policy and the evaluation are plain calls
in the flow: a task run would cost more than their work, and a retry would fix nothing.

Tasks are thin: they load models through the process-level cache in :mod:`icd.models`
(so a worker loads a model once), call the pure method code in :mod:`icd.method`, and do
the I/O. Caching is keyed on what a stage really depends on: the chunk's content
(``chunk_key``, a digest of every sample's image bytes, question, answers and skip reason;
never the decoded images, row positions or object identity), the model configs plus the
identity of locally stored weights, and the config fields it reads. Results are persisted
(under ``storage.cache_dir``, by default ``ROOT/cache``), so a new process (a resumed run,
a re-run) reuses them.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.tasks import exponential_backoff

from icd.config import MethodConfig, ModelConfig, SelectionConfig, VotingConfig
from icd.data.images import load_image
from icd.data.stream import files_digest
from icd.data.types import Chunk
from icd.method import metrics, steps
from icd.method.prompts import build_prompt
from icd.method.selection import select_demos
from icd.method.types import Prompt
from icd.method.voting import VoteResult
from icd.models import load_embedder, load_student, load_teacher
from icd.storage import results
from icd.storage.pool import DemoPool, PoolView

# Cache keys: every input except the live chunk object (its identity is `chunk_key`), and
# except where results go (`ledger`) and which run asks (`run_id`; a pool's content is
# keyed by `pool_key`), so another run over the same chunks reuses the results. `scope`
# is "" when runs share results (pipeline.cache) and the run id when they must not; within
# a run results are always reused, which is what makes a resumed run call no model twice.
#
# A model config names a model (backend, id, revision); where the id is a local folder
# (a ``fixtures/`` model, a path) the weights can change under the same name, so the key
# also covers a digest of the folder's files (`weights_identity`).


def _weights_key(ctx: Any, inputs: dict[str, Any]) -> str:
    return "|".join(weights_identity(v) for v in inputs.values() if isinstance(v, ModelConfig))


CHUNK_CACHE = (INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_weights_key)) - "chunk"
CHUNK_CACHE = CHUNK_CACHE - "ledger" - "run_id"
# The other stages never reuse results (they are cheap, or they write): NO_CACHE, so Prefect
# does not hash their inputs (a whole chunk, the stream) on every call.


_WEIGHTS: dict[tuple[Any, ...], str] = {}
_WEIGHTS_LOCK = threading.Lock()


def weights_identity(cfg: ModelConfig) -> str:
    """A digest of the files of a model stored in a local folder (``fixtures/...`` ids and
    paths): names, sizes, and the first and last MiB of each file. "" for a hub id (its
    revision names the weights) and for backends without weights. Memoised per process on
    the files' sizes and modification times."""
    if cfg.backend != "hf":
        return ""
    try:
        from icd.models.fixtures import resolve_model_path

        folder = resolve_model_path(cfg.model_id)
    except Exception:  # an unknown id fails where the model is loaded, with its own message
        return ""
    if folder is None:
        return ""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    stats = tuple((str(p), *_stat(p)) for p in files)
    with _WEIGHTS_LOCK:
        if stats not in _WEIGHTS:
            _WEIGHTS[stats] = files_digest([p for p, _, _ in stats], str(folder))
        return _WEIGHTS[stats]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed model stage unless the failure is a configuration mistake (bad model
    id, wrong API key or URL), which no retry can fix."""
    from icd.models import ModelLoadError, ModelOOMError
    from icd.models.openai import TeacherConfigError

    try:
        state.result()
    except (ModelLoadError, ModelOOMError, TeacherConfigError, ValueError):
        return False
    except Exception:
        return True
    return True


MODEL_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=0.5),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": _transient,
}

_POOLS: dict[str, DemoPool] = {}


def open_pool(uri: str) -> DemoPool:
    """This process's handle on the pool at ``uri`` (its vector cache is reused by tasks)."""
    if uri not in _POOLS:
        _POOLS[uri] = DemoPool(uri)
    return _POOLS[uri]


def teacher_provenance(cfg: ModelConfig) -> str:
    """Who labels a pool row: ``oracle(noise=0.1)`` for the ground-truth oracle,
    ``MODEL_ID@REVISION`` for a Hugging Face teacher, ``openai:MODEL_ID@BASE_URL`` for an
    OpenAI-compatible endpoint."""
    if cfg.backend == "oracle":
        from icd.models.oracle import provenance

        return provenance(cfg.noise)
    if cfg.backend == "openai":
        return f"openai:{cfg.model_id}@{cfg.base_url or 'https://api.openai.com/v1'}"
    return f"{cfg.model_id}@{cfg.revision}"


def zero_shot_prompts(chunk: Chunk, task_type: str, class_names: list[str] | None) -> list[Prompt]:
    """The query-only prompt of each valid sample."""
    return [build_prompt(s.question, s.image, [], task_type, class_names) for s in chunk.valid]


@task(name="extract_embeddings", cache_policy=CHUNK_CACHE, persist_result=True, **MODEL_RETRIES)
def extract_embeddings(
    chunk: Chunk, chunk_key: str, embedder: ModelConfig, scope: str = ""
) -> dict[str, Any]:
    """Image embeddings of the chunk's valid samples, rows in ``chunk.valid`` order."""
    t0 = time.perf_counter()
    model = load_embedder(embedder)
    images = [s.image for s in chunk.valid]
    vecs = model.embed_images(images) if images else np.zeros((0, model.dim), np.float32)
    return {"image_vecs": vecs, "seconds": time.perf_counter() - t0}


@task(name="score_student", cache_policy=CHUNK_CACHE, persist_result=True, **MODEL_RETRIES)
def score_student(
    chunk: Chunk,
    chunk_key: str,
    student: ModelConfig,
    task_type: str,
    class_names: list[str] | None,
    scope: str = "",
) -> dict[str, Any]:
    """The student's zero-shot answer (with token statistics) for each valid sample."""
    t0 = time.perf_counter()
    prompts = zero_shot_prompts(chunk, task_type, class_names)
    gens = load_student(student).generate(prompts) if prompts else []
    return {"generations": gens, "seconds": time.perf_counter() - t0}


@task(name="annotate_with_teacher", cache_policy=CHUNK_CACHE, persist_result=True, **MODEL_RETRIES)
def annotate_with_teacher(
    chunk: Chunk,
    chunk_key: str,
    queried_ids: list[str],
    teacher: ModelConfig,
    voting: VotingConfig,
    task_type: str,
    class_names: list[str] | None,
    synonyms: dict[str, list[str]] | None,
    seed: int,
    ledger: str,
    scope: str = "",
) -> dict[str, Any]:
    """Label the queried samples: N teacher answers each, aggregated into one vote each.

    Each real teacher round is appended to the ``ledger`` file (one JSON line) before the
    result is persisted, so a run's teacher spend can be audited across resumes.
    """
    t0 = time.perf_counter()
    wanted = set(queried_ids)
    samples = [s for s in chunk.valid if s.sample_id in wanted]
    if not samples:
        return {"votes": {}, "service": {}, "requests": 0, "samples": 0, "seconds": 0.0}
    model = load_teacher(teacher, class_names)
    prompts = [build_prompt(s.question, s.image, [], task_type, None) for s in samples]
    args = (samples, prompts, voting.n, voting.temperature, voting.include_greedy, seed)
    anns = model.annotate(*args)
    service = getattr(anns, "service", {})  # a remote teacher's retries and latency
    votes = steps.vote_annotations(anns, voting, class_names, synonyms)
    requests = sum(a.requests for a in anns)
    returned = sum(len(a.generations) for a in anns)
    record = {
        "chunk_key": chunk_key,
        "sample_ids": [s.sample_id for s in samples],
        "requests": requests,
        "samples": returned,
        "time": time.time(),
    }
    with Path(ledger).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return {
        "votes": {s.sample_id: v for s, v in zip(samples, votes, strict=True)},
        "service": service,
        "requests": requests,
        "samples": returned,
        "seconds": time.perf_counter() - t0,
    }


@task(
    name="update_pool",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=0.5),
    cache_policy=NO_CACHE,
)
def update_pool(
    pool_uri: str,
    run_id: str,
    chunk: Chunk,
    votes: dict[str, VoteResult],
    image_vecs: np.ndarray,
    uncertainties: np.ndarray,
    teacher_id: str,
    embedder: ModelConfig,
    compact_every: int,
) -> dict[str, Any]:
    """Upsert the chunk's accepted annotations as one pool commit (idempotent on the sample
    id), embedding each label with the embedder's text tower; ``teacher_id`` is recorded as
    each row's provenance (:func:`teacher_provenance`). Returns the pool ``version`` and the
    ``seconds`` it took."""
    t0 = time.perf_counter()
    pool = open_pool(pool_uri)
    valid = chunk.valid
    accepted = [
        (i, votes[s.sample_id])
        for i, s in enumerate(valid)
        if s.sample_id in votes and votes[s.sample_id].accepted and votes[s.sample_id].label
    ]
    if not accepted:
        return {"version": pool.version(), "seconds": time.perf_counter() - t0}
    label_vecs = load_embedder(embedder).embed_texts([v.label for _, v in accepted])
    now = datetime.now(UTC)
    rows = [
        {
            "sample_id": valid[i].sample_id,
            "run_id": run_id,
            "chunk": chunk.index,
            "stream_pos": valid[i].stream_pos,
            "image": valid[i].image_bytes,
            "question": valid[i].question,
            "image_vec": image_vecs[i],
            "label": v.label,
            "label_vec": label_vec,
            "votes": v.votes,
            "agreement": v.agreement,
            "uncertainty": float(uncertainties[i]) if len(uncertainties) else None,
            "teacher": teacher_id,
            "created_at": now,
        }
        for (i, v), label_vec in zip(accepted, label_vecs, strict=True)
    ]
    version = pool.upsert(rows)
    pool.maybe_compact(compact_every)
    return {"version": version, "seconds": time.perf_counter() - t0}


@task(name="predict_icl", cache_policy=CHUNK_CACHE - "view", persist_result=True, **MODEL_RETRIES)
def predict_icl(
    chunk: Chunk,
    chunk_key: str,
    rows: list[int],
    image_vecs: np.ndarray,
    zs_answers: list[str],
    pool_uri: str,
    run_id: str,
    view: PoolView,
    pool_key: str,
    student: ModelConfig,
    embedder: ModelConfig,
    sel: SelectionConfig,
    task_type: str,
    class_names: list[str] | None,
    seed: int,
    scope: str = "",
) -> dict[str, Any]:
    """For the valid samples at ``rows``: choose demonstrations from ``view``, the pool as it
    was before this chunk (``pool_key`` fingerprints its content and stands for it in the
    cache key), then answer with them."""
    t0 = time.perf_counter()
    valid = [chunk.valid[i] for i in rows]
    if not valid:
        return {"generations": [], "demo_ids": [], "demo_labels": [], "seconds": 0.0}
    pool = open_pool(pool_uri)
    query_txt = None
    if sel.w_tt != 0 and sel.strategy in ("combined", "cascade") and len(view):
        query_txt = load_embedder(embedder).embed_texts([zs_answers[i] for i in rows])
    chosen = select_demos(
        image_vecs[rows],
        query_txt,
        view.image_vecs,
        view.label_vecs,
        view.labels,
        sel,
        seed,
        [s.sample_id for s in valid],
    )
    demo_ids = [[str(view.ids[j]) for j in idx] for idx in chosen]
    needed = sorted({d for ids in demo_ids for d in ids})
    by_id = {r["sample_id"]: r for r in pool.fetch(needed, run_id)} if needed else {}
    images = {d: load_image(r["image"]) for d, r in by_id.items()}
    prompts = [
        build_prompt(
            s.question,
            s.image,
            [(images[d], by_id[d]["question"] or s.question, by_id[d]["label"]) for d in ids],
            task_type,
            class_names,
        )
        for s, ids in zip(valid, demo_ids, strict=True)
    ]
    gens = load_student(student).generate(prompts)
    return {
        "generations": gens,
        "demo_ids": demo_ids,
        "demo_labels": [[by_id[d]["label"] for d in ids] for ids in demo_ids],
        "seconds": time.perf_counter() - t0,
    }


def evaluate_chunk(
    run_dir: Path,
    run_id: str,
    dataset: str,
    chunk: Chunk,
    method: MethodConfig,
    task_type: str,
    synonyms: dict[str, list[str]] | None,
    zs_answers: list[str | None],
    zs_unc: np.ndarray | None,
    votes: dict[str, VoteResult],
    teacher_zs: dict[str, VoteResult],
    icl: dict[str, Any] | None,
    icl_rows: list[int],
    pool_size: int,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Build the chunk's prediction rows (every sample, skipped ones too), write them as the
    chunk's parquet file, and return the chunk's metrics.

    A plain function the flow calls, not a task: no model, nothing worth caching, and a
    failed write is not something a retry fixes (a task run would cost more than the work).
    """
    valid = chunk.valid
    n = len(valid)
    icl_answers: list[str | None] = [None] * n
    icl_unc: list[float | None] = [None] * n
    demo_ids: list[list[str]] = [[] for _ in range(n)]
    demo_labels: list[list[str]] = [[] for _ in range(n)]
    if icl and icl["generations"]:
        answers, unc = steps.student_outputs(icl["generations"], method.uncertainty)
        for j, i in enumerate(icl_rows):
            icl_answers[i], icl_unc[i] = answers[j], float(unc[j])
            demo_ids[i], demo_labels[i] = icl["demo_ids"][j], icl["demo_labels"][j]
    v_list = [votes.get(s.sample_id) for s in valid]
    t_list = [teacher_zs.get(s.sample_id) for s in valid]
    finals = steps.final_answers(method, zs_answers, icl_answers, v_list, t_list)
    fuzzy = method.voting.fuzzy_threshold  # answers map onto classes as teacher votes do

    records: list[dict[str, Any]] = []
    i = 0
    for s in chunk.samples:
        rec: dict[str, Any] = {
            "run_id": run_id,
            "mode": method.mode,
            "dataset": dataset,
            "sample_id": s.sample_id,
            "chunk": chunk.index,
            "stream_pos": s.stream_pos,
            "question": s.question,
            "answers": list(s.answers),
            "skip_reason": s.skip_reason,
            "queried": False,
            "accepted": False,
            "teacher_votes": [],
            "demo_ids": [],
            "demo_labels": [],
        }
        if s.skip_reason is None:
            v = v_list[i] or t_list[i]
            final, source = finals[i]
            truth = s.answers[0] if s.answers else None
            rec.update(
                zs_answer=zs_answers[i],
                zs_uncertainty=float(zs_unc[i]) if zs_unc is not None else None,
                queried=v_list[i] is not None,
                teacher_votes=list(v.votes) if v else [],
                teacher_label=v.label if v else None,
                agreement=v.agreement if v else None,
                accepted=bool(v_list[i] is not None and v_list[i].accepted),
                teacher_error=v.error if v else None,
                demo_ids=demo_ids[i],
                demo_labels=demo_labels[i],
                demo_accuracy=(
                    metrics.demo_accuracy(demo_labels[i], truth, synonyms)
                    if demo_labels[i] and truth and task_type == "classification"
                    else None
                ),
                icl_answer=icl_answers[i],
                icl_uncertainty=icl_unc[i],
                final_answer=final,
                final_source=source,
                score=(
                    metrics.score(final, s.answers, task_type, synonyms, class_names, fuzzy)
                    if s.answers
                    else None
                ),
            )
            i += 1
        records.append(rec)
    results.write_chunk_predictions(run_dir, chunk.index, records)
    n_votes = method.voting.n
    return metrics.chunk_metrics(
        records, task_type, n_votes, pool_size, synonyms, class_names, fuzzy
    )
