"""What a stream run carries from chunk to chunk: its facts (:class:`RunContext`), the work
of one chunk (:class:`ChunkWork`) and the state a resumed run continues from
(:class:`ResumeState`)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from icd.config import Config
from icd.data.stream import Stream
from icd.data.types import Chunk, Sample
from icd.method import metrics, modes
from icd.method.accounting import Made
from icd.method.modes import Plan
from icd.method.policy import PolicyState
from icd.method.voting import VoteResult
from icd.storage.runstate import RunState, atomic_write_text, resume_fingerprint
from icd.tasks.runner import Books, Pending

if TYPE_CHECKING:
    from icd.tasks.embed import Embedded
    from icd.tasks.icl import Demonstrated
    from icd.tasks.score import Scored


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


@dataclass
class ChunkWork:
    """One chunk on its way through the stages; each stage fills in its part. Rows of the
    arrays and lists follow ``chunk.valid``."""

    chunk: Chunk
    embedding: Pending[Embedded] | None = None  # submitted ahead of the sequential stages
    scoring: Pending[Scored] | None = None  # likewise (None: the student answers later)
    image_vecs: np.ndarray | None = None
    zs_answers: list[str | None] = field(default_factory=list)
    zs_unc: np.ndarray | None = None
    zs_prompt_tokens: list[int | None] = field(default_factory=list)
    student_errors: list[str | None] = field(default_factory=list)  # a remote student's
    queried_ids: list[str] = field(default_factory=list)
    votes: dict[str, VoteResult] = field(default_factory=dict)  # budgeted teacher labels
    teacher_zs: dict[str, VoteResult] = field(default_factory=dict)  # the teacher on all
    service: dict[str, Any] = field(default_factory=dict)  # a remote teacher's accounting
    icl_rows: list[int] = field(default_factory=list)
    icl_gated: list[int] = field(default_factory=list)  # kept their zero-shot answer (the gate)
    icl: Demonstrated | None = None

    @property
    def valid(self) -> list[Sample]:
        return self.chunk.valid


class Counters(dict[str, int]):
    """The stages' counters by name (each stage module declares its own in ``COUNTERS``);
    they appear under these names in the summary and in MLflow."""

    def add(self, name: str, n: int) -> None:
        self[name] = self.get(name, 0) + int(n)


@dataclass
class ResumeState:
    """Everything a run carries across chunks, committed after each one: a killed run
    resumes from the state of its last committed chunk (:class:`RunState` on disk)."""

    next_chunk: int = 0
    policy: PolicyState = field(default_factory=PolicyState)
    icl_gate: PolicyState = field(default_factory=PolicyState)  # the selective-ICL gate's
    counters: Counters = field(default_factory=Counters)
    running: dict[str, Any] | None = None  # merged sums and ratios of the committed chunks
    manifest: dict[str, int] = field(default_factory=dict)  # chunk -> pool version
    books: Books = field(default_factory=Books)  # seconds and cache hits per stage
    lineage: str = ""  # hash chain of the committed chunks' content keys
    adapter: str | None = None  # the student's LoRA adapter after the last chunk (finetune modes)
    # What adapting the student cost so far: steps, tokens, FLOPs, peak memory.
    adapt: dict[str, float] = field(default_factory=dict)
    student_params: int = 0
    pool_size: int = 0  # the run's pool rows left for selection after the last committed chunk
    pool_precision: float | None = None  # their label precision (accounting.pool_precision)
    # The true answers of the run's pooled samples (not committed: rebuilt from the
    # predictions when a run resumes), which the pool's label precision is scored against.
    pool_truth: dict[str, list[str]] = field(default_factory=dict)
    pool_scores: dict[str, float] = field(default_factory=dict)  # their labels' scores, memo
    # Read from the run's teacher ledger when it starts (the ledger is the truth; ``made``
    # is also committed with each chunk so a resumed run can re-log that chunk's numbers):
    # the teacher work the run made, and the chunks it made it for (cache reuse accounting).
    made: Made = Made()
    ledgered: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, ctx: RunContext, *, counters: tuple[str, ...]) -> ResumeState:
        """The state after the run's last committed chunk (a fresh one for a new run), its
        ``counters`` starting at 0."""
        rounds = read_ledger(ctx.ledger)
        state = cls(
            counters=Counters(dict.fromkeys(counters, 0)),
            made=Made(
                answers=sum(int(r["samples"]) for r in rounds),
                requests=sum(int(r["requests"]) for r in rounds),
            ),
            ledgered={r["chunk_key"] for r in rounds},
        )
        last = RunState(ctx.run_dir).last()
        if last is None:
            return state
        state.counters.update(last["counters"])
        state.next_chunk = last["chunk"] + 1
        state.policy = PolicyState.from_dict(last["policy_state"])
        if "icl_gate_state" in last:
            state.icl_gate = PolicyState.from_dict(last["icl_gate_state"])
        state.running = last["running"]
        state.manifest = dict(last["manifest"])
        state.books.seconds.update(last["seconds"])
        state.books.cached.update(last.get("cached", {}))
        state.lineage = last.get("lineage", "")
        state.adapter = last.get("adapter")
        state.adapt = dict(last.get("adapt", {}))
        state.student_params = int(last.get("student_params", 0))
        state.pool_size = int(last.get("pool_size", 0))
        state.pool_precision = last.get("pool_precision")
        return state

    def commit(self, ctx: RunContext, *, work: ChunkWork) -> None:
        """Mark ``work``'s chunk committed with this state (written last, atomically)."""
        self.next_chunk = work.chunk.index + 1
        RunState(ctx.run_dir).commit(
            work.chunk.index,
            {
                "samples_seen": self.counters["samples_seen"],
                "policy_state": self.policy.to_dict(),
                "icl_gate_state": self.icl_gate.to_dict(),
                "counters": dict(self.counters),
                "running": self.running,
                "manifest": self.manifest,
                "seconds": self.books.seconds,
                "cached": self.books.cached,
                "service": work.service,
                "lineage": self.lineage,
                "adapter": self.adapter,
                "adapt": self.adapt,
                "student_params": self.student_params,
                "pool_size": self.pool_size,
                "pool_precision": self.pool_precision,
                "made": {"answers": self.made.answers, "requests": self.made.requests},
            },
        )

    def extend_lineage(self, chunk_key: str) -> None:
        """Add one more chunk to the content lineage (:meth:`chain`)."""
        self.lineage = self.chain(self.lineage, chunk_key)

    @staticmethod
    def chain(lineage: str, chunk_key: str) -> str:
        """The content lineage after one more chunk: a hash chain of the run's chunk keys."""
        return hashlib.sha256(f"{lineage}|{chunk_key}".encode()).hexdigest()[:32]


def read_ledger(path: str) -> list[dict[str, Any]]:
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
