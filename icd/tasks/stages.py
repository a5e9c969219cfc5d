"""Prefect tasks: one per pipeline stage, each working on a whole chunk.

Tasks are thin: they load models through the process-level cache in :mod:`icd.models`
(so a worker loads a model once), call the pure method code, and return plain data.
Caching is keyed on what a stage really depends on: the chunk's identity (``chunk_key``,
never the decoded images), the model configs and the config fields it reads. Results are
persisted, so a new process (a resumed run, a re-run) reuses them.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.tasks import exponential_backoff

from icd.config import ModelConfig, PolicyConfig, SelectionConfig, VotingConfig
from icd.data.types import Chunk
from icd.method import policy as policy_mod
from icd.method import selection, steps
from icd.method.prompts import build_prompt
from icd.method.types import Generation
from icd.models import load_embedder, load_student, load_teacher
from icd.models.images import load_image
from icd.storage.pool import DemoPool

# Cache keys: every input except the live chunk object (its identity is `chunk_key`).
CHUNK_CACHE = (INPUTS + TASK_SOURCE) - "chunk"
MODEL_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=0.5),
    "retry_jitter_factor": 0.5,
}


_POOLS: dict[str, DemoPool] = {}


def open_pool(uri: str) -> DemoPool:
    """The process's handle on the pool at ``uri`` (its vector cache is reused across tasks)."""
    if uri not in _POOLS:
        _POOLS[uri] = DemoPool(uri)
    return _POOLS[uri]


def _prompts(chunk: Chunk, task_type: str, class_names: list[str] | None) -> list:
    return [build_prompt(s.question, s.image, [], task_type, class_names) for s in chunk.valid]


@task(name="extract_embeddings", cache_policy=CHUNK_CACHE, persist_result=True, **MODEL_RETRIES)
def extract_embeddings(chunk: Chunk, chunk_key: str, embedder: ModelConfig) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """The student's zero-shot answer (with token statistics) for each valid sample."""
    t0 = time.perf_counter()
    gens = load_student(student).generate(_prompts(chunk, task_type, class_names)) if chunk.valid else []
    return {"generations": gens, "seconds": time.perf_counter() - t0}


@task(name="select_for_annotation")
def select_for_annotation(
    uncertainties: np.ndarray,
    policy_state: dict[str, Any],
    policy: PolicyConfig,
    stream_length: int | None,
) -> tuple[list[bool], dict[str, Any]]:
    """Which samples the teacher labels (sequential policy over the chunk) and the new state."""
    state = policy_mod.PolicyState.from_dict(policy_state)
    mask, new_state = policy_mod.decide_queries(np.asarray(uncertainties), state, policy, stream_length)
    return [bool(m) for m in mask], new_state.to_dict()


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
) -> dict[str, Any]:
    """Label the queried samples: N teacher answers each, aggregated into a vote.

    Every real teacher request is appended to the ``ledger`` file (one JSON line per
    chunk) before the result is persisted, so a run's teacher spend can be audited.
    """
    t0 = time.perf_counter()
    wanted = set(queried_ids)
    samples = [s for s in chunk.valid if s.sample_id in wanted]
    if not samples:
        return {"outcomes": [], "requests": 0, "samples": 0, "seconds": 0.0}
    model = load_teacher(teacher, class_names)
    prompts = [build_prompt(s.question, s.image, [], task_type, class_names) for s in samples]
    annotations = model.annotate(
        samples, prompts, voting.n, voting.temperature, voting.include_greedy, seed
    )
    outcomes = steps.annotations_to_outcomes(
        [s.sample_id for s in samples], annotations, voting, class_names, synonyms
    )
    requests = sum(a.requests for a in annotations)
    returned = sum(len(a.generations) for a in annotations)
    with Path(ledger).open("a") as f:
        f.write(
            json.dumps(
                {"chunk_key": chunk_key, "sample_ids": [s.sample_id for s in samples],
                 "requests": requests, "samples": returned, "time": time.time()}
            )
            + "\n"
        )
    return {
        "outcomes": outcomes,
        "requests": requests,
        "samples": returned,
        "seconds": time.perf_counter() - t0,
    }


@task(name="update_pool", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=0.5))
def update_pool(
    pool_uri: str,
    run_id: str,
    chunk: Chunk,
    outcomes: list[dict[str, Any]],
    image_vecs: np.ndarray,
    uncertainties: np.ndarray,
    teacher_id: str,
    embedder: ModelConfig,
    compact_every: int,
) -> int:
    """Upsert the chunk's accepted annotations (idempotent on the sample id) as one pool
    commit, embedding each label with the embedder's text tower; returns the version."""
    pool = open_pool(pool_uri)
    row_of = {s.sample_id: i for i, s in enumerate(chunk.valid)}
    accepted = [o for o in outcomes if o["accepted"] and o["label"] is not None]
    if not accepted:
        return pool.version()
    label_vecs = load_embedder(embedder).embed_texts([o["label"] for o in accepted])
    now = datetime.now(UTC)
    rows = []
    for o, label_vec in zip(accepted, label_vecs, strict=True):
        i = row_of[o["sample_id"]]
        s = chunk.valid[i]
        rows.append(
            {
                "sample_id": s.sample_id,
                "run_id": run_id,
                "chunk": chunk.index,
                "stream_pos": s.stream_pos,
                "image": s.image_bytes,
                "question": s.question,
                "image_vec": image_vecs[i],
                "label": o["label"],
                "label_vec": label_vec,
                "votes": o["votes"],
                "agreement": o["agreement"],
                "uncertainty": float(uncertainties[i]),
                "teacher": teacher_id,
                "created_at": now,
            }
        )
    version = pool.upsert(rows)
    pool.maybe_compact(compact_every)
    return version


@task(name="predict_icl", cache_policy=CHUNK_CACHE, persist_result=True, **MODEL_RETRIES)
def predict_icl(
    chunk: Chunk,
    chunk_key: str,
    image_vecs: np.ndarray,
    zs_answers: list[str],
    pool_uri: str,
    run_id: str,
    pool_key: str,
    student: ModelConfig,
    embedder: ModelConfig,
    sel: SelectionConfig,
    task_type: str,
    class_names: list[str] | None,
    seed: int,
) -> dict[str, Any]:
    """Choose k demonstrations per sample from the pool as it was before this chunk
    (``pool_key`` fingerprints that view), then answer with them in the prompt."""
    t0 = time.perf_counter()
    view = open_pool(pool_uri).view(run_id, before_chunk=chunk.index)
    valid = chunk.valid
    if not valid:
        return {"generations": [], "demo_ids": [], "demo_labels": [], "seconds": 0.0}
    query_txt = None
    if sel.strategy in ("combined", "cascade") and sel.w_tt != 0 and len(view.ids):
        query_txt = load_embedder(embedder).embed_texts(zs_answers)
    chosen = selection.select_demos(
        image_vecs, query_txt, view.image_vecs, view.label_vecs, view.labels, sel, seed,
        [s.sample_id for s in valid],
    )
    demo_ids = [[str(view.ids[i]) for i in idx] for idx in chosen]
    rows = {r["sample_id"]: r for r in open_pool(pool_uri).fetch(
        sorted({d for ids in demo_ids for d in ids}), run_id)}
    prompts = []
    for s, ids in zip(valid, demo_ids, strict=True):
        demos = [(load_image(rows[d]["image"]), rows[d]["question"], rows[d]["label"]) for d in ids]
        prompts.append(build_prompt(s.question, s.image, demos, task_type, class_names))
    gens: list[Generation] = load_student(student).generate(prompts)
    return {
        "generations": gens,
        "demo_ids": demo_ids,
        "demo_labels": [[rows[d]["label"] for d in ids] for ids in demo_ids],
        "seconds": time.perf_counter() - t0,
    }
