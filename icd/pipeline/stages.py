"""The stream's stages as Prefect tasks, each working on a whole chunk, and the chunk's
evaluation (a plain call: a task run would cost more than its work, and a retry would fix
nothing). Reading a chunk and the annotation policy are plain calls in the flow too.

Stages are thin: they load models through the process-level cache in :mod:`icd.models`
(so a worker loads a model once), call the pure method code in :mod:`icd.method` for every
rule, and do the I/O. Each takes the run's :class:`RunContext` and its chunk by keyword.

Each stage's cache key is declared once, next to it (:func:`stage_cache`): the config
fields it reads (``RunContext.fingerprint``), the identity of locally stored weights of the
models among them, the chunk's content digest (``Chunk.key``: every sample's image bytes,
question, answers and skip reason; never decoded images, row positions or object
identity), the stage's own inputs named there, the cache scope and the task's source.
Results are persisted (under ``storage.cache_dir``, by default ``ROOT/cache``), so a new
process (a resumed run, a re-run) reuses them; the other stages never reuse results (they
are cheap, or they write).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.tasks import exponential_backoff

from icd.config import ModelConfig, VotingConfig
from icd.data.images import image_id, load_image
from icd.data.stream import files_digest
from icd.data.types import Chunk
from icd.method import metrics, steps
from icd.method.prompts import build_prompt
from icd.method.types import Prompt
from icd.method.voting import VoteResult
from icd.models import counting_image_cache, load_embedder, load_student, load_teacher
from icd.models.finetune import parameter_count
from icd.pipeline.context import ChunkWork, RunContext
from icd.storage import results
from icd.storage.pool import DemoPool, PoolView


def stage_cache(
    *fields: str, inputs: Callable[[dict[str, Any]], Any] = lambda p: None
) -> CachePolicy:
    """The cache policy of a stage that reads the config ``fields`` (dotted paths; model
    sections add the identity of their local weights, :func:`weights_identity`) and whose
    own inputs beyond the run and the chunk are ``inputs(parameters)`` (JSON-able)."""
    models = [f for f in fields if f.startswith("models.")]

    def key(context: Any, parameters: dict[str, Any]) -> str:
        ctx: RunContext = parameters["ctx"]
        chunk: Chunk = parameters["chunk"]
        weights = [weights_identity(getattr(ctx.cfg.models, f.split(".")[1])) for f in models]
        own = json.dumps(inputs(parameters), sort_keys=True, default=str)
        text = "|".join([ctx.fingerprint(fields), *weights, chunk.key, own, ctx.scope])
        return hashlib.sha256(text.encode()).hexdigest()

    return TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=key)


# A model config names a model (backend, id, revision); where the id is a local folder
# (a ``fixtures/`` model, a path) the weights can change under the same name, so the key
# also covers a digest of the folder's files.
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


def zero_shot_prompts(
    samples: list[Any], *, task_type: str, class_names: list[str] | None
) -> list[Prompt]:
    """The query-only prompt of each sample."""
    return [
        build_prompt(
            s.question, s.image, task=task_type, class_names=class_names,
            image_ids=[image_id(s.sample_id, s.image_bytes)],
        )
        for s in samples
    ]  # fmt: skip


@task(
    name="extract_embeddings",
    task_run_name="extract_embeddings-chunk{chunk.index}",
    cache_policy=stage_cache("models.embedder"),
    persist_result=True,
    **MODEL_RETRIES,
)
def extract_embeddings(*, ctx: RunContext, chunk: Chunk) -> dict[str, Any]:
    """Image embeddings of the chunk's valid samples, rows in ``chunk.valid`` order."""
    t0 = time.perf_counter()
    model = load_embedder(ctx.cfg.models.embedder)
    images = [s.image for s in chunk.valid]
    vecs = model.embed_images(images) if images else np.zeros((0, model.dim), np.float32)
    return {"image_vecs": vecs, "seconds": time.perf_counter() - t0}


def _adapter_input(p: dict[str, Any]) -> Any:
    return p.get("adapter")


@task(
    name="score_student",
    task_run_name="score_student-chunk{chunk.index}",
    cache_policy=stage_cache(
        "models.student", "method.list_classes_in_prompt", inputs=_adapter_input
    ),
    persist_result=True,
    **MODEL_RETRIES,
)
def score_student(*, ctx: RunContext, chunk: Chunk, adapter: str | None = None) -> dict[str, Any]:
    """The student's zero-shot answer (with token statistics) for each valid sample, with
    the LoRA ``adapter`` merged in when given; ``params`` counts the student's weights."""
    t0 = time.perf_counter()
    prompts = zero_shot_prompts(
        chunk.valid, task_type=ctx.task_type, class_names=ctx.prompt_classes
    )
    student = load_student(ctx.cfg.models.student, adapter)
    with counting_image_cache(student) as cache:
        gens = student.generate(prompts) if prompts else []
    return {
        "generations": gens,
        "params": parameter_count(student),
        "image_cache": cache,
        "seconds": time.perf_counter() - t0,
    }


def _annotate_inputs(p: dict[str, Any]) -> Any:
    return [p["queried_ids"], p["voting"].model_dump(mode="json")]


@task(
    name="annotate_with_teacher",
    task_run_name="annotate_with_teacher-chunk{chunk.index}",
    cache_policy=stage_cache("models.teacher", "seed", inputs=_annotate_inputs),
    persist_result=True,
    **MODEL_RETRIES,
)
def annotate_with_teacher(
    *, ctx: RunContext, chunk: Chunk, queried_ids: list[str], voting: VotingConfig
) -> dict[str, Any]:
    """Label the queried samples: N teacher answers each, aggregated into one vote each.

    Each real teacher round is appended to the run's ledger file (one JSON line) before the
    result is persisted, so a run's teacher spend can be audited across resumes.
    """
    t0 = time.perf_counter()
    wanted = set(queried_ids)
    samples = [s for s in chunk.valid if s.sample_id in wanted]
    if not samples:
        return {"votes": {}, "service": {}, "requests": 0, "samples": 0, "seconds": 0.0}
    model = load_teacher(ctx.cfg.models.teacher, ctx.class_names)
    prompts = zero_shot_prompts(samples, task_type=ctx.task_type, class_names=None)
    args = (samples, prompts, voting.n, voting.temperature, voting.include_greedy, ctx.cfg.seed)
    anns = model.annotate(*args)
    service = getattr(anns, "service", {})  # a remote teacher's retries and latency
    votes = steps.vote_annotations(anns, voting, ctx.class_names, ctx.synonyms, task=ctx.task_type)
    requests = sum(a.requests for a in anns)
    returned = sum(len(a.generations) for a in anns)
    record = {
        "chunk_key": chunk.key,
        "sample_ids": [s.sample_id for s in samples],
        "requests": requests,
        "samples": returned,
        "time": time.time(),
    }
    with Path(ctx.ledger).open("a") as f:
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
    task_run_name="update_pool-chunk{chunk.index}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=0.5),
    cache_policy=NO_CACHE,  # it writes; an upsert is idempotent on the sample id
)
def update_pool(
    *,
    ctx: RunContext,
    chunk: Chunk,
    votes: dict[str, VoteResult],
    image_vecs: np.ndarray,
    uncertainties: np.ndarray,
) -> dict[str, Any]:
    """Upsert the chunk's annotations that the method admits to the pool
    (:func:`icd.method.steps.pool_mask`) as one pool commit, embedding each label with the
    embedder's text tower and recording the teacher (:func:`teacher_provenance`) as each
    row's provenance. Returns the pool ``version`` and the ``seconds`` it took."""
    t0 = time.perf_counter()
    pool = open_pool(ctx.pool_uri)
    valid = chunk.valid
    admit = steps.pool_mask([votes.get(s.sample_id) for s in valid], ctx.cfg.method)
    accepted = [(int(i), votes[valid[i].sample_id]) for i in np.flatnonzero(admit)]
    if not accepted:
        return {"version": pool.version(), "seconds": time.perf_counter() - t0}
    label_vecs = load_embedder(ctx.cfg.models.embedder).embed_texts([v.label for _, v in accepted])
    now = datetime.now(UTC)
    teacher = teacher_provenance(ctx.cfg.models.teacher)
    rows = [
        {
            "sample_id": valid[i].sample_id,
            "run_id": ctx.run_id,
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
            "teacher": teacher,
            "created_at": now,
        }
        for (i, v), label_vec in zip(accepted, label_vecs, strict=True)
    ]
    version = pool.upsert(rows)
    pool.maybe_compact(ctx.cfg.storage.compact_every)
    return {"version": version, "seconds": time.perf_counter() - t0}


def pool_key(view: PoolView, *, lineage: str) -> str:
    """Fingerprint of a pool view's content: which rows, with which labels, and the content
    of the chunks they came from (``lineage``, the hash chain of the run's chunk keys),
    which fixes their images and questions."""
    text = "\n".join(f"{i}\t{label}" for i, label in zip(view.ids, list(view.labels), strict=True))
    return hashlib.sha256(f"{lineage}\n{text}".encode()).hexdigest()[:16]


def _icl_inputs(p: dict[str, Any]) -> Any:
    return [p["rows"], p["pool_key"], p.get("adapter")]


@task(
    name="predict_icl",
    task_run_name="predict_icl-chunk{chunk.index}",
    cache_policy=stage_cache(
        "models.student",
        "models.embedder",
        "method.mode",
        "method.selection",
        "method.list_classes_in_prompt",
        "seed",
        inputs=_icl_inputs,
    ),
    persist_result=True,
    **MODEL_RETRIES,
)
def predict_icl(
    *,
    ctx: RunContext,
    chunk: Chunk,
    rows: list[int],
    image_vecs: np.ndarray,
    zs_answers: list[str | None],
    view: PoolView,
    pool_key: str,
    adapter: str | None = None,
) -> dict[str, Any]:
    """For the valid samples at ``rows``: choose demonstrations from ``view``, the pool as it
    was before this chunk (``pool_key`` fingerprints its content and stands for it in the
    cache key), then answer with them (the student with its LoRA ``adapter`` when given)."""
    t0 = time.perf_counter()
    valid = [chunk.valid[i] for i in rows]
    if not valid:
        return {"generations": [], "demo_ids": [], "demo_labels": [], "seconds": 0.0}
    query_txt = None
    if steps.needs_query_text(ctx.selection, pool_size=len(view)):
        embedder = load_embedder(ctx.cfg.models.embedder)
        query_txt = embedder.embed_texts([zs_answers[i] or "" for i in rows])
    chosen = steps.choose_demos(
        query_img=image_vecs[rows],
        query_txt=query_txt,
        pool_img=view.image_vecs,
        pool_txt=view.label_vecs,
        pool_labels=view.labels,
        cfg=ctx.cfg.method,
        seed=ctx.cfg.seed,
        query_ids=[s.sample_id for s in valid],
    )
    demo_ids = [[str(view.ids[j]) for j in idx] for idx in chosen]
    if ctx.mode.demo_vote:  # the demos' majority label answers; no student pass
        labels = [[str(view.labels[j]) for j in idx] for idx in chosen]
        last = ctx.selection.most_similar_last
        return {
            "generations": [],
            "answers": [steps.demo_vote(ls, most_similar_last=last) for ls in labels],
            "demo_ids": demo_ids,
            "demo_labels": labels,
            "seconds": time.perf_counter() - t0,
        }
    needed = sorted({d for ids in demo_ids for d in ids})
    pool = open_pool(ctx.pool_uri)
    by_id = {r["sample_id"]: r for r in pool.fetch(needed, ctx.run_id)} if needed else {}
    images = {d: load_image(r["image"]) for d, r in by_id.items()}
    names = {d: image_id(d, r["image"]) for d, r in by_id.items()}
    prompts = [
        build_prompt(
            s.question,
            s.image,
            [(images[d], by_id[d]["question"] or s.question, by_id[d]["label"]) for d in ids],
            task=ctx.task_type,
            class_names=ctx.prompt_classes,
            image_ids=[*(names[d] for d in ids), image_id(s.sample_id, s.image_bytes)],
        )
        for s, ids in zip(valid, demo_ids, strict=True)
    ]
    student = load_student(ctx.cfg.models.student, adapter)
    with counting_image_cache(student) as cache:
        gens = student.generate(prompts)
    return {
        "generations": gens,
        "image_cache": cache,
        "demo_ids": demo_ids,
        "demo_labels": [[by_id[d]["label"] for d in ids] for ids in demo_ids],
        "seconds": time.perf_counter() - t0,
    }


def _adapt_inputs(p: dict[str, Any]) -> Any:
    return [p["ctx"].run_id, p["pool_key"], p["start"]]


@task(
    name="adapt_student",
    task_run_name="adapt_student-chunk{chunk.index}",
    cache_policy=stage_cache("models.student", "method.finetune", "seed", inputs=_adapt_inputs),
    persist_result=True,
    **MODEL_RETRIES,
)
def adapt_student(
    *, ctx: RunContext, chunk: Chunk, start: str | None, view: PoolView, pool_key: str
) -> dict[str, Any]:
    """LoRA steps on ``view``, the run's pool after this chunk's commit (all its rows, or the
    latest ``method.finetune.window``; ``pool_key`` stands for it in the cache key), starting
    from the adapter at ``start``; the adapter is saved
    under the run's ``adapters/chunk-NNNNN``. Each training round is appended to the run's
    adaptation ledger (``adapt_calls.jsonl``), so a resumed run can show it trained no chunk
    twice. Returns the adapter's path and the round's cost (:func:`train_adapter`)."""
    from icd.models.finetune import train_adapter

    fcfg = ctx.cfg.method.finetune
    pool = open_pool(ctx.pool_uri)
    ids = [str(i) for i in view.ids]
    if fcfg.replay == "window":
        ids = ids[-fcfg.window :]
    rows = pool.fetch(sorted(ids), ctx.run_id) if ids else []
    examples = [
        (
            build_prompt(
                r["question"], load_image(r["image"]), task=ctx.task_type,
                class_names=ctx.prompt_classes,
            ),
            r["label"],
        )
        for r in rows
    ]  # fmt: skip
    out = ctx.run_dir / "adapters" / f"chunk-{chunk.index:05d}"
    student = load_student(ctx.cfg.models.student)
    cost = train_adapter(
        vlm=student,
        examples=examples,
        start=Path(start) if start else None,
        out=out,
        cfg=fcfg,
        seed=ctx.cfg.seed * 100_003 + chunk.index,
    )
    with (ctx.run_dir / "adapt_calls.jsonl").open("a") as f:
        f.write(json.dumps({"chunk": chunk.index, "chunk_key": chunk.key, **cost}) + "\n")
    return {"adapter": str(out), **cost}


def evaluate_chunk(*, ctx: RunContext, work: ChunkWork, pool_size: int) -> dict[str, Any]:
    """Build the chunk's prediction rows (every sample, skipped ones too), write them as the
    chunk's parquet file, and return the chunk's metrics."""
    method = ctx.cfg.method
    icl = _icl_columns(work, uncertainty=method.uncertainty)
    votes = [work.votes.get(s.sample_id) for s in work.valid]
    teacher_zs = [work.teacher_zs.get(s.sample_id) for s in work.valid]
    finals = steps.final_answers(
        method, work.zs_answers, icl_answers=icl["icl_answer"], votes=votes, teacher_zs=teacher_zs
    )
    fuzzy = method.voting.fuzzy_threshold  # answers map onto classes as teacher votes do
    records: list[dict[str, Any]] = []
    valid = iter(range(len(work.valid)))
    for s in work.chunk.samples:
        rec: dict[str, Any] = {
            "run_id": ctx.run_id,
            "mode": method.mode,
            "dataset": ctx.cfg.data.dataset,
            "sample_id": s.sample_id,
            "chunk": work.chunk.index,
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
            i = next(valid)
            vote, v = votes[i], votes[i] or teacher_zs[i]
            final, source = finals[i]
            rec.update(
                zs_answer=work.zs_answers[i],
                zs_uncertainty=_number(work.zs_unc[i]) if work.zs_unc is not None else None,
                zs_prompt_tokens=work.zs_prompt_tokens[i] if work.zs_prompt_tokens else None,
                queried=vote is not None,
                teacher_votes=list(v.votes) if v else [],
                teacher_label=v.label if v else None,
                agreement=v.agreement if v else None,
                accepted=bool(vote is not None and vote.accepted),
                teacher_error=v.error if v else None,
                demo_ids=icl["demo_ids"][i],
                demo_labels=icl["demo_labels"][i],
                demo_accuracy=_demo_accuracy(ctx, icl["demo_labels"][i], s.answers),
                icl_answer=icl["icl_answer"][i],
                icl_uncertainty=icl["icl_uncertainty"][i],
                icl_prompt_tokens=icl["icl_prompt_tokens"][i],
                student_error=(work.student_errors[i] if work.student_errors else None)
                or icl["icl_error"][i],
                final_answer=final,
                final_source=source,
                score=ctx.score(final, s.answers) if s.answers else None,
            )
        records.append(rec)
    results.write_chunk_predictions(ctx.run_dir, work.chunk.index, records)
    return metrics.chunk_metrics(
        records,
        ctx.task_type,
        n_votes=method.voting.n,
        pool_size=pool_size,
        synonyms=ctx.synonyms,
        class_names=ctx.class_names,
        fuzzy_threshold=fuzzy,
    )


def _icl_columns(work: ChunkWork, *, uncertainty: str) -> dict[str, list[Any]]:
    """The answer from demonstrations (the student's ICL answer, or in ``pool_vote`` the
    demos' majority label, without an uncertainty), its uncertainty and the demos of each
    valid sample (None / [] where no answer came from demonstrations)."""
    n = len(work.valid)
    cols: dict[str, list[Any]] = {
        "demo_ids": [[] for _ in range(n)],
        "demo_labels": [[] for _ in range(n)],
        "icl_answer": [None] * n,
        "icl_uncertainty": [None] * n,
        "icl_prompt_tokens": [None] * n,
        "icl_error": [None] * n,
    }
    icl = work.icl or {"generations": []}
    if icl.get("answers") is not None:  # pool_vote: the demos' majority labels
        answers, unc = icl["answers"], [None] * len(icl["answers"])
        tokens: list[int | None] = [None] * len(answers)
    elif icl["generations"]:
        answers, u = steps.student_outputs(icl["generations"], uncertainty)
        unc = [_number(x) for x in u]
        tokens = [g.prompt_tokens or None for g in icl["generations"]]
        for j, g in enumerate(icl["generations"]):
            cols["icl_error"][work.icl_rows[j]] = g.error
    else:
        return cols
    for j, i in enumerate(work.icl_rows):
        cols["icl_answer"][i], cols["icl_uncertainty"][i] = answers[j], unc[j]
        cols["icl_prompt_tokens"][i] = tokens[j]
        cols["demo_ids"][i] = icl["demo_ids"][j]
        cols["demo_labels"][i] = icl["demo_labels"][j]
    return cols


def _number(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _demo_accuracy(ctx: RunContext, demo_labels: list[str], answers: list[str]) -> float | None:
    """Share of a classification sample's demos that carry its true class (None otherwise)."""
    truth = answers[0] if answers else None
    if not (demo_labels and truth and ctx.task_type == "classification"):
        return None
    return metrics.demo_accuracy(demo_labels, truth, ctx.synonyms)
