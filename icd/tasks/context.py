"""What a stream run carries from chunk to chunk: its facts (:class:`RunContext`), the
state a resumed run continues from (:class:`ResumeState`) and the teacher work its ledger
records (:class:`Ledger`). The stages' results are typed next to each stage."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, TypedDict

from pydantic import BeforeValidator, PlainSerializer, TypeAdapter

from icd.config import Config
from icd.data.stream import Stream
from icd.method import metrics, modes
from icd.method.accounting import ChunkSums, Made
from icd.method.modes import Plan
from icd.method.policy import PolicyState
from icd.models.base import ServiceCalls
from icd.storage.runstate import RunState, atomic_write_text, resume_fingerprint


def new_run_id(cfg: Config) -> str:
    """A fresh, readable run id: dataset-mode-time-random."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.dataset}-{cfg.method.mode}-{stamp}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RunContext:
    """The facts of one run that every stage reads: the resolved config, the stream's task
    and classes, the run's plan (what its mode runs, decided once), where things live, and
    the cache scope. Plain data (it travels to Dask workers with each task)."""

    cfg: Config
    run_id: str
    run_dir: Path
    plan: Plan
    task_type: str
    class_names: list[str] | None
    synonyms: dict[str, list[str]] | None
    class_groups: dict[str, list[str]]  # classes reported apart (base / novel)
    stream_length: int | None
    pool_uri: str
    ledger: str  # this run's teacher rounds, one JSON line each
    scope: str  # "" when runs share task results (pipeline.cache), else the run id
    cache_dir: Path
    _fingerprints: dict[tuple[str, ...], str] = field(default_factory=dict, compare=False)

    @classmethod
    def create(cls, cfg: Config, stream: Stream, *, run_id: str | None = None) -> RunContext:
        """The context of run ``run_id`` (a new id when None): creates its results folder,
        refuses (``ValueError``, one line) to resume a run made with another config, and
        records the resolved config as ``config.json``."""
        run_id = run_id or cfg.run_id or new_run_id(cfg)
        cfg = cfg.model_copy(update={"run_id": run_id})
        run_dir = cfg.storage.results_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        RunState(run_dir).check_config(resume_fingerprint(cfg))
        atomic_write_text(run_dir / "config.json", cfg.model_dump_json(indent=2))
        return cls(
            cfg=cfg,
            run_id=run_id,
            run_dir=run_dir,
            plan=modes.plan(cfg.method),
            task_type=stream.task,
            class_names=stream.class_names,
            synonyms=stream.synonyms,
            class_groups=stream.class_groups,
            stream_length=stream.length,
            pool_uri=cfg.storage.resolved_pool_uri(),
            ledger=str(run_dir / "teacher_calls.jsonl"),
            scope="" if cfg.pipeline.cache else run_id,
            cache_dir=cfg.storage.resolved_cache_dir(),
        )

    def score(self, answer: str | None, answers: list[str]) -> float:
        """One answer's score against the ground truth, as the run's evaluation scores it."""
        return metrics.score(
            answer,
            answers,
            self.task_type,
            synonyms=self.synonyms,
            class_names=self.class_names,
            fuzzy_threshold=self.cfg.method.voting.fuzzy_threshold,
        )

    @property
    def prompt_classes(self) -> list[str] | None:
        """The class names listed in prompts (``method.list_classes_in_prompt``), or None."""
        return self.class_names if self.cfg.method.list_classes_in_prompt else None

    def memo(self, key: tuple[str, ...], make: Callable[[], str]) -> str:
        """``make()``, computed once per run and key (the identity of a model's local weights
        is part of every stage's cache key: read once, when the run first needs it)."""
        if key not in self._fingerprints:
            self._fingerprints[key] = make()
        return self._fingerprints[key]

    def fingerprint(self, fields: tuple[str, ...]) -> str:
        """A digest of the config ``fields`` and of the stream's task and classes (memoised:
        it is part of every cache key)."""
        if fields not in self._fingerprints:
            facts = json.dumps([self.task_type, self.class_names, self.synonyms], sort_keys=True)
            digest = hashlib.sha256(f"{self.cfg.fingerprint(*fields)}|{facts}".encode())
            self._fingerprints[fields] = digest.hexdigest()[:16]
        return self._fingerprints[fields]


def add_counts(counters: Mapping[str, int], *counts: Mapping[str, int]) -> dict[str, int]:
    """``counters`` with ``counts`` added, by name (a new dict). The stages' counters are
    declared by each stage module (``COUNTERS``) and appear under these names in the
    summary and in MLflow."""
    out = dict(counters)
    for c in counts:
        for name, n in c.items():
            out[name] = out.get(name, 0) + int(n)
    return out


def _sums(data: object) -> object:
    return ChunkSums.from_json(data) if isinstance(data, Mapping) else data


# The run's merged chunk sums, kept in the state file in their JSON form (sums and ratios:
# ``icd runs`` reads a stopped run's accuracy there).
RunningSums = Annotated[
    ChunkSums | None,
    BeforeValidator(_sums),
    PlainSerializer(lambda s: None if s is None else s.to_json()),
]


@dataclass(frozen=True)
class ResumeState:
    """What a run carries from one chunk to the next, committed after each chunk as
    ``state/chunk-NNNNN.json`` (:class:`RunState`): a killed run resumes from the state of
    its last committed chunk. Its fields are that file's keys — :meth:`load` and
    :meth:`commit` both go through one serialiser of this class, so they cannot drift.

    The flow makes each chunk's state from the previous one and the chunk's stage results
    (``icd.flows.stream.advance``); nothing else changes it."""

    chunk: int = -1  # the last committed chunk (-1: none yet)
    policy_state: PolicyState = field(default_factory=PolicyState)  # the query policy's
    icl_gate_state: PolicyState = field(default_factory=PolicyState)  # the ICL gate's
    counters: dict[str, int] = field(default_factory=dict)  # by name, summed over chunks
    running: RunningSums = None  # the committed chunks' sums (kept with their ratios)
    manifest: dict[str, int] = field(default_factory=dict)  # chunk -> pool version
    seconds: dict[str, float] = field(default_factory=dict)  # per stage (the runner's books)
    cached: dict[str, int] = field(default_factory=dict)  # chunks taken from the task cache
    service: ServiceCalls = field(default_factory=ServiceCalls)  # this chunk's remote teacher's
    lineage: str = ""  # hash chain of the committed chunks' content keys (:func:`chain`)
    adapter: str | None = None  # the student's LoRA adapter after the chunk (finetune modes)
    adapt: dict[str, float] = field(default_factory=dict)  # steps, tokens, FLOPs, peak memory
    student_params: int = 0
    pool_size: int = 0  # the run's pool rows left for selection after the chunk
    pool_precision: float | None = None  # their label precision (accounting.pool_precision)
    made: Made = Made()  # the teacher work the run made so far (its ledger)

    @property
    def next_chunk(self) -> int:
        return self.chunk + 1

    @property
    def samples_seen(self) -> int:
        """Stream samples of the committed chunks, skipped ones included."""
        return self.counters.get("samples_seen", 0)

    @classmethod
    def load(cls, ctx: RunContext, *, counters: tuple[str, ...], ledger: Ledger) -> ResumeState:
        """The state after the run's last committed chunk (a fresh one for a new run), its
        ``counters`` starting at 0 and the teacher work it made read from its ``ledger``
        (the ledger is the truth: a round whose chunk was not committed was still paid)."""
        last = RunState(ctx.run_dir).last()
        state = cls() if last is None else _FORMAT.validate_python(last)
        return replace(
            state,
            counters=add_counts(dict.fromkeys(counters, 0), state.counters),
            made=ledger.made,
        )

    @classmethod
    def committed(cls, ctx: RunContext) -> list[ResumeState]:
        """The state after each committed chunk of the run, in order."""
        return [_FORMAT.validate_python(st) for st in RunState(ctx.run_dir).all()]

    def commit(self, ctx: RunContext) -> None:
        """Mark this state's chunk committed (written last, atomically)."""
        RunState(ctx.run_dir).commit(self.chunk, _FORMAT.dump_python(self, mode="json"))


_FORMAT = TypeAdapter(ResumeState)


def chain(lineage: str, chunk_key: str) -> str:
    """The content lineage after one more chunk: a hash chain of the run's chunk keys."""
    return hashlib.sha256(f"{lineage}|{chunk_key}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Ledger:
    """The teacher rounds a run made, read from its ledger file when it starts: the work
    (answers and requests), and the chunks it was made for (a cached label of any other
    chunk was made by another run: reused)."""

    made: Made = Made()
    chunk_keys: frozenset[str] = frozenset()

    @classmethod
    def read(cls, path: str) -> Ledger:
        rounds = read_ledger(path)
        return cls(
            made=Made(
                answers=sum(int(r["samples"]) for r in rounds),
                requests=sum(int(r["requests"]) for r in rounds),
            ),
            chunk_keys=frozenset(r["chunk_key"] for r in rounds),
        )


class LedgerRound(TypedDict):
    """One teacher round of a run, a JSON line of its ledger (written by the annotate
    stage before its result is kept)."""

    chunk_key: str
    sample_ids: list[str]
    requests: int  # requests sent
    samples: int  # answers returned
    time: float


def read_ledger(path: str) -> list[LedgerRound]:
    """The teacher rounds a run made (one JSON line each, written by the annotate stage)."""
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
