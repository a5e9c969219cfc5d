"""Every run-level number of ICD, defined once (docs/design.md §2.9).

The summary, the metrics logged to MLflow (per chunk and final), the run report, the
benchmark tables and the README all read the numbers made here; nothing else computes a
rate, a count or a gain of a run.

- **Sums** (:class:`ChunkSums`): per chunk, from its prediction rows — counts and score
  sums that add up across chunks exactly (``a + b``), so a run's numbers do not depend on
  how its stream was cut into chunks.
- **Ratios** (:class:`Ratios`, named in :data:`RATIOS`): each is ``numerator /
  denominator`` of two sums (None while the denominator is 0). ``annotation_rate`` divides
  by every stream sample seen, skipped ones included (the budget's denominator: ``budget ×
  stream length``).
- **Counters**: what the stages count as they run (teacher answers used and reused, the
  student's processed-image cache; each stage of :mod:`icd.tasks` declares its own); each
  appears under its own name.
  Teacher answers *made* by the run (``teacher_calls``, ``teacher_requests``) are those in
  its ledger: every round it paid for, across resumes.
- **Gains** (:func:`gains`): ``gain_from_teacher_labels`` = forward − zero-shot accuracy,
  ``gain_from_icl`` = accuracy − forward accuracy, on the same samples.
- **Costs** (:func:`summarize`): prompt tokens, seconds per prompt, FLOPs.

The run summary is a :class:`RunSummary`; its JSON form (:meth:`RunSummary.to_json`,
``summary.json``, the MLflow metric names) is one flat object whose keys are listed in
:meth:`RunSummary.to_json`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import polars as pl

from icd.method.metrics import caption_tokenizer, coco_caption_metrics, score
from icd.method.types import PredictionRow

if TYPE_CHECKING:
    from icd.jsontypes import JSONObject

# Where a sample's final answer came from (icd.method.steps.final_answers).
SOURCES = ("teacher", "student_icl", "pool_vote", "student_zs", "teacher_zs", "student_fallback")

# The stage whose seconds the zero-shot pass costs (its name before: ``score``).
ZERO_SHOT_STAGES = ("zero_shot", "score")


# ---------------------------------------------------------------------------- chunk sums
@dataclass(frozen=True)
class Ratios:
    """The ratios of a run's (or a chunk's) sums; None while the denominator is 0."""

    accuracy: float | None = None
    zs_accuracy: float | None = None
    forward_accuracy: float | None = None
    icl_accuracy: float | None = None
    annotation_rate: float | None = None
    acceptance_rate: float | None = None
    mean_agreement: float | None = None
    demo_accuracy: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# name -> (numerator, denominator), both sums of ChunkSums.
RATIOS: dict[str, tuple[str, str]] = {
    "accuracy": ("score_sum", "scored"),
    "zs_accuracy": ("zs_score_sum", "zs_scored"),
    "forward_accuracy": ("forward_score_sum", "zs_scored"),
    "icl_accuracy": ("icl_score_sum", "icl_scored"),
    "annotation_rate": ("queried", "samples"),
    "acceptance_rate": ("accepted", "queried"),
    "mean_agreement": ("agreement_sum", "agreement_n"),
    "demo_accuracy": ("demo_sum", "demo_n"),
}


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when ``den`` is 0."""
    return num / den if den else None


@dataclass(frozen=True)
class ChunkSums:
    """Sums of a chunk's prediction rows that add up across chunks (``a + b``), and the
    lowest teacher agreement among them. Sums of the score columns are floats, counts ints.

    Its JSON form (:meth:`to_json`: every sum, ``agreement_min``, then the :class:`Ratios`)
    is what a committed chunk's state file keeps as ``running``."""

    samples: int = 0  # stream samples, skipped ones included
    skipped: int = 0
    scored: int = 0  # samples with a score (valid, with ground truth)
    score_sum: float = 0
    zs_scored: int = 0  # samples the student answered zero-shot
    zs_score_sum: float = 0
    forward_score_sum: float = 0  # the teacher's labels where queried, else the zero-shot answer
    icl_scored: int = 0  # samples answered from demonstrations
    icl_score_sum: float = 0
    icl_prompts_saved: int = 0  # samples the ICL gate left with their zero-shot answer
    queried: int = 0
    accepted: int = 0
    teacher_errors: int = 0
    agreement_n: int = 0
    agreement_sum: float = 0
    demo_n: int = 0
    demo_sum: float = 0
    source_teacher: int = 0  # final answers by where they came from (SOURCES)
    source_student_icl: int = 0
    source_pool_vote: int = 0
    source_student_zs: int = 0
    source_teacher_zs: int = 0
    source_student_fallback: int = 0
    agreement_min: float | None = None  # not a sum: the minimum

    @classmethod
    def of_rows(
        cls,
        rows: Iterable[PredictionRow],
        task: str | None,
        *,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        class_names: Sequence[str] | None = None,
        fuzzy_threshold: float = 0.85,
    ) -> ChunkSums:
        """The sums of ``rows``: each row's :meth:`of_row`, added up in order."""
        total = cls()
        for r in rows:
            total = total + cls.of_row(
                r, task, synonyms=synonyms, class_names=class_names, fuzzy_threshold=fuzzy_threshold
            )
        return total

    @classmethod
    def of_row(
        cls,
        r: PredictionRow,
        task: str | None,
        *,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        class_names: Sequence[str] | None = None,
        fuzzy_threshold: float = 0.85,
    ) -> ChunkSums:
        """One prediction row's share of the sums.

        Reads ``skip_reason``, ``answers``, ``score`` (None: unscored), ``zs_answer``,
        ``icl_answer``, ``icl_gated``, ``teacher_label``, ``queried``, ``accepted``,
        ``agreement``, ``teacher_error``, ``demo_accuracy``, ``final_source``. The zero-shot,
        forwarded and ICL scores are the row's ``zs_score``, ``forward_score`` and
        ``icl_score`` when they are set, else :func:`baseline_scores` for ``task`` (None:
        not scored)."""
        if r.get("skip_reason"):
            return cls(samples=1, skipped=1)
        score_ = r.get("score")
        zs, forward, icl = r.get("zs_score"), r.get("forward_score"), r.get("icl_score")
        if (zs is None and r.get("zs_answer") is not None) or (
            icl is None and r.get("icl_answer") is not None
        ):  # not scored when written (older predictions): score now
            zs, forward, icl = baseline_scores(
                r, task, synonyms=synonyms, class_names=class_names, fuzzy_threshold=fuzzy_threshold
            )
        queried = bool(r.get("queried"))
        agreement = r.get("agreement") if queried else None
        demo = r.get("demo_accuracy")
        source = r.get("final_source")
        return cls(
            samples=1,
            scored=int(score_ is not None),
            score_sum=float(score_) if score_ is not None else 0,
            zs_scored=int(zs is not None),
            zs_score_sum=zs if zs is not None else 0,
            forward_score_sum=_forward(zs, forward),
            icl_scored=int(icl is not None),
            icl_score_sum=icl if icl is not None else 0,
            icl_prompts_saved=int(bool(r.get("icl_gated"))),
            queried=int(queried),
            accepted=int(queried and bool(r.get("accepted"))),
            teacher_errors=int(queried and r.get("teacher_error") is not None),
            agreement_n=int(agreement is not None),
            agreement_sum=float(agreement) if agreement is not None else 0,
            agreement_min=float(agreement) if agreement is not None else None,
            demo_n=int(demo is not None),
            demo_sum=float(demo) if demo is not None else 0,
            **{f"source_{s}": int(source == s) for s in SOURCES},
        )

    def __add__(self, other: ChunkSums) -> ChunkSums:
        mins = [x for x in (self.agreement_min, other.agreement_min) if x is not None]
        added = {
            name: getattr(self, name) + getattr(other, name)
            for name in ADDITIVE  # (every field but agreement_min)
        }
        return ChunkSums(**added, agreement_min=min(mins) if mins else None)

    @property
    def ratios(self) -> Ratios:
        return Ratios(
            **{name: ratio(getattr(self, n), getattr(self, d)) for name, (n, d) in RATIOS.items()}
        )

    def to_json(self) -> dict[str, float | None]:
        """Every sum, ``agreement_min``, and every ratio, by name."""
        out: dict[str, float | None] = {name: getattr(self, name) for name in ADDITIVE}
        out["agreement_min"] = self.agreement_min
        out.update(self.ratios.to_json())
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChunkSums:
        """The sums of :meth:`to_json`'s form (ratios are recomputed, not read). A sum
        missing from ``data`` (a state committed by an older version) is 0."""
        sums = {name: data.get(name, 0) for name in ADDITIVE}
        return cls(**sums, agreement_min=data.get("agreement_min"))


# The sums of ChunkSums that add up across chunks (all its fields but agreement_min).
ADDITIVE: tuple[str, ...] = tuple(f.name for f in fields(ChunkSums) if f.name != "agreement_min")


def _forward(zs: float | None, forward: float | None) -> float:
    """A row's forwarded score where it has a zero-shot one (0 where it has none)."""
    if zs is None:
        return 0
    if forward is None:
        raise ValueError("a prediction row with a zero-shot score has no forwarded score")
    return forward


def ratios(sums: ChunkSums | Mapping[str, Any]) -> dict[str, float | None]:
    """Every :data:`RATIOS` entry of ``sums`` (its JSON form accepted), by name."""
    if not isinstance(sums, ChunkSums):
        sums = ChunkSums.from_json(sums)
    return sums.ratios.to_json()


def baseline_scores(
    row: PredictionRow | Mapping[str, Any],
    task: str | None,
    *,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    class_names: Sequence[str] | None = None,
    fuzzy_threshold: float = 0.85,
) -> tuple[float | None, float | None, float | None]:
    """The scores a valid prediction row's same-run baselines get: its zero-shot answer (the
    student alone), the forwarded answer (the teacher's label where queried, else the
    zero-shot answer) and its ICL answer — each None where the row has no such answer or
    ``task`` is None. Scored with :func:`icd.method.metrics.score`, mapped onto
    ``class_names`` as teacher votes are."""
    if task is None:
        return None, None, None
    answers = row.get("answers") or []

    def scored(answer: str) -> float:
        return score(answer, answers, task, synonyms, class_names, fuzzy_threshold)

    zs = forward = icl = None
    zs_answer, icl_answer = row.get("zs_answer"), row.get("icl_answer")
    if zs_answer is not None:
        zs = scored(zs_answer)
        label = row.get("teacher_label") if row.get("queried") else None
        forward = zs if label is None else scored(label)
    if icl_answer is not None:
        icl = scored(icl_answer)
    return zs, forward, icl


# ---------------------------------------------------------------------------- run numbers
@dataclass(frozen=True)
class Made:
    """Teacher work this run generated (its ledger: every round, across resumes)."""

    answers: int = 0
    requests: int = 0


def teacher_numbers(made: Made) -> dict[str, int]:
    """``teacher_calls`` / ``teacher_requests``: the answers and requests the run made (its
    ledger). The counters ``teacher_answers_used`` / ``teacher_calls_reused`` say how many
    answers its labels used and how many of those another run made."""
    return {"teacher_calls": made.answers, "teacher_requests": made.requests}


def cache_hit_rate(counters: Mapping[str, int]) -> float | None:
    """``student_image_cache_hit_rate``: hits / (hits + misses) of the student's
    processed-image cache (None without the cache)."""
    hits = counters.get("student_image_cache_hits", 0)
    return ratio(hits, hits + counters.get("student_image_cache_misses", 0))


def cache_numbers(counters: Mapping[str, int]) -> dict[str, float | None]:
    """:func:`cache_hit_rate` by its name."""
    return {"student_image_cache_hit_rate": cache_hit_rate(counters)}


def pool_precision(scores: Sequence[float]) -> float | None:
    """``pool_precision``: the mean of ``scores``, one per pool row left for selection whose
    sample's true answers are known — its label scored against them as the run scores an
    answer (for classification, the share of selectable demos whose label is the true
    class); None without rows."""
    return sum(scores) / len(scores) if scores else None


def running_numbers(
    running: ChunkSums | Mapping[str, Any],
    *,
    counters: Mapping[str, int],
    made: Made,
    pool_size: int,
    pool_precision: float | None = None,
) -> dict[str, float | None]:
    """The numbers logged after each chunk, by MLflow metric name: the running sums and
    ratios (``running``, or its JSON form as a chunk's state keeps it), the counters, the
    teacher's and the cache's numbers, and the pool's size (rows left for selection) and
    label precision (:func:`pool_precision`). The two gains are running too, so each is a
    curve in MLflow, not one final point."""
    sums = running if isinstance(running, ChunkSums) else ChunkSums.from_json(running)
    r = sums.ratios
    gain = Gains.of(accuracy=r.accuracy, zs=r.zs_accuracy, forward=r.forward_accuracy)
    return {
        **sums.to_json(),
        **{k: v for k, v in gain.to_json().items() if v is not None},
        **counters,
        **teacher_numbers(made),
        **cache_numbers(counters),
        "pool_size": pool_size,
        "pool_precision": pool_precision,
    }


@dataclass(frozen=True)
class Gains:
    """``gain_from_teacher_labels`` (forward − zero-shot accuracy) and ``gain_from_icl``
    (accuracy − forward accuracy); None where either side is."""

    from_teacher_labels: float | None = None
    from_icl: float | None = None

    @classmethod
    def of(cls, *, accuracy: float | None, zs: float | None, forward: float | None) -> Gains:
        return cls(
            from_teacher_labels=forward - zs if forward is not None and zs is not None else None,
            from_icl=accuracy - forward if accuracy is not None and forward is not None else None,
        )

    def to_json(self, suffix: str = "") -> dict[str, float | None]:
        return {
            f"gain_from_teacher_labels{suffix}": self.from_teacher_labels,
            f"gain_from_icl{suffix}": self.from_icl,
        }


def gains(numbers: Mapping[str, float | None], suffix: str = "") -> dict[str, float | None]:
    """:class:`Gains` of ``numbers`` by name (keys with ``suffix``: a class group)."""
    g = Gains.of(
        accuracy=numbers.get(f"accuracy{suffix}"),
        zs=numbers.get(f"zs_accuracy{suffix}"),
        forward=numbers.get(f"forward_accuracy{suffix}"),
    )
    return g.to_json(suffix)


# ---------------------------------------------------------------------------- the summary
@dataclass(frozen=True)
class GroupNumbers:
    """One class group's share of the summary (rows whose first true answer is in it); in
    JSON each key carries the group's name as a suffix (``accuracy_novel``)."""

    samples: int = 0
    accuracy: float | None = None
    accuracy_not_queried: float | None = None
    zs_accuracy: float | None = None
    forward_accuracy: float | None = None
    gains: Gains = Gains()

    def to_json(self, name: str) -> dict[str, float | None]:
        return {
            f"samples_{name}": self.samples,
            f"accuracy_{name}": self.accuracy,
            f"accuracy_not_queried_{name}": self.accuracy_not_queried,
            f"zs_accuracy_{name}": self.zs_accuracy,
            f"forward_accuracy_{name}": self.forward_accuracy,
            **self.gains.to_json(f"_{name}"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str) -> GroupNumbers:
        return cls(
            samples=data.get(f"samples_{name}", 0),
            accuracy=data.get(f"accuracy_{name}"),
            accuracy_not_queried=data.get(f"accuracy_not_queried_{name}"),
            zs_accuracy=data.get(f"zs_accuracy_{name}"),
            forward_accuracy=data.get(f"forward_accuracy_{name}"),
            gains=Gains(
                data.get(f"gain_from_teacher_labels_{name}"), data.get(f"gain_from_icl_{name}")
            ),
        )


@dataclass(frozen=True)
class CaptionScores:
    """The COCO caption evaluation of one set of captions: BLEU-1..4 (×100) and CIDEr-D;
    None where there is nothing to score. ``bleu`` (BLEU-4) is :attr:`bleu4` again."""

    bleu1: float | None = None
    bleu2: float | None = None
    bleu3: float | None = None
    bleu4: float | None = None
    cider: float | None = None

    def to_json(self, prefix: str) -> dict[str, float | None]:
        names = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")
        return {f"{prefix}bleu": self.bleu4, **{f"{prefix}{k}": getattr(self, k) for k in names}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], prefix: str) -> CaptionScores:
        return cls(
            *(data.get(f"{prefix}{k}") for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider"))
        )


@dataclass(frozen=True)
class CaptionMetrics:
    """A captioning run's final captions (``bleu``…) and the student's zero-shot ones
    (``zs_bleu``…), and the PTB tokenizer that made them (``ptb-java`` or ``ptb-python``)."""

    final: CaptionScores
    zero_shot: CaptionScores
    tokenizer: str

    def to_json(self) -> dict[str, float | str | None]:
        return {
            **self.final.to_json(""),
            **self.zero_shot.to_json("zs_"),
            "caption_tokenizer": self.tokenizer,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaptionMetrics | None:
        if "caption_tokenizer" not in data:
            return None
        return cls(
            CaptionScores.from_json(data, ""),
            CaptionScores.from_json(data, "zs_"),
            str(data["caption_tokenizer"]),
        )


@dataclass(frozen=True)
class TeacherServiceStats:
    """A remote teacher's service accounting over a run: HTTP attempts and how they ended,
    tokens, and latency percentiles (ms, over successful attempts; 0 when none). In JSON
    each is ``teacher_NAME``; ``teacher_requests`` and ``teacher_errors`` there are these
    (HTTP attempts; samples whose call finally failed), not the ledger's and the sums'."""

    requests: int = 0  # HTTP attempts, whatever their outcome
    ok: int = 0
    failures: int = 0
    retries: int = 0
    samples: int = 0
    annotations: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    filtered: int = 0
    refused: int = 0
    empty: int = 0
    truncated: int = 0
    no_logprobs: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    latency_max_ms: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {f"teacher_{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TeacherServiceStats | None:
        if "teacher_ok" not in data:  # only the service accounting has it
            return None
        return cls(**{f.name: data[f"teacher_{f.name}"] for f in fields(cls)})


@dataclass(frozen=True)
class Costs:
    """What the student's passes cost: prompt tokens per zero-shot and per ICL prompt
    (mean, and p95 for ICL, whose prompts grow with k), demos per ICL prompt, and seconds
    per prompt of each pass as the run spent them (None when the run computed none of that
    stage's results: they all came from the task cache)."""

    zs_prompt_tokens_mean: float | None = None
    icl_prompt_tokens_mean: float | None = None
    icl_prompt_tokens_p95: float | None = None
    demos_per_icl_prompt: float | None = None
    seconds_per_zs_prompt: float | None = None
    seconds_per_icl_prompt: float | None = None


@dataclass(frozen=True)
class Compute:
    """Compute the run spent on the student: adapting it (LoRA steps, tokens, FLOPs, peak
    memory; the fine-tuning modes) and answering (≈ 2 · N FLOPs per prompt token of every
    student pass, N = ``student_params``)."""

    adapt_steps: int = 0
    adapt_tokens: int = 0
    adapt_flops: float = 0.0
    adapt_seconds: float = 0.0
    adapt_peak_rss_mb: float | None = None
    student_params: int = 0
    student_prompt_tokens: int = 0  # of every student pass, zero-shot and ICL
    inference_flops: float | None = None
    compute_flops: float | None = None


@dataclass(frozen=True)
class RunSummary:
    """The run summary: every number of a finished run, each under its name.

    Made by :func:`summarize` (and completed by the stream flow with the remote teacher's
    :attr:`teacher_service`, :attr:`run_dir` and :attr:`mlflow_run_id`); read by the
    terminal, MLflow, the reports and the benchmark tables. Its JSON form
    (:meth:`to_json`, ``summary.json``) is one flat object: the nested records' fields,
    the :attr:`counters`, the :attr:`groups` (``accuracy_novel``…) and the caption metrics
    all at the top level; only ``seconds`` and ``cached_chunks`` are objects."""

    run_id: str | None = None
    mode: str | None = None
    dataset: str | None = None
    samples: int = 0
    skipped: int = 0
    queried: int = 0
    accepted: int = 0
    teacher_errors: int = 0
    icl_prompts_saved: int = 0
    ratios: Ratios = Ratios()
    accuracy_queried: float | None = None
    accuracy_not_queried: float | None = None
    student_errors: int = 0
    pool_size: int = 0
    pool_precision: float | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)  # per stage
    cached_chunks: Mapping[str, int] = field(default_factory=dict)  # per stage
    chunks_in_flight_peak: int = 0
    counters: Mapping[str, int] = field(default_factory=dict)  # the stages' counters
    teacher_calls: int = 0
    teacher_requests: int = 0
    student_image_cache_hit_rate: float | None = None
    gains: Gains = Gains()
    costs: Costs = Costs()
    compute: Compute = Compute()
    groups: Mapping[str, GroupNumbers] = field(default_factory=dict)  # by class group
    captions: CaptionMetrics | None = None  # captioning runs
    teacher_service: TeacherServiceStats | None = None  # remote teachers
    run_dir: str | None = None  # set once the run is written (then in JSON)
    mlflow_run_id: str | None = None

    # the numbers read most, by their JSON names
    @property
    def accuracy(self) -> float | None:
        return self.ratios.accuracy

    @property
    def zs_accuracy(self) -> float | None:
        return self.ratios.zs_accuracy

    @property
    def forward_accuracy(self) -> float | None:
        return self.ratios.forward_accuracy

    @property
    def icl_accuracy(self) -> float | None:
        return self.ratios.icl_accuracy

    @property
    def annotation_rate(self) -> float | None:
        return self.ratios.annotation_rate

    @property
    def mean_agreement(self) -> float | None:
        return self.ratios.mean_agreement

    @property
    def demo_accuracy(self) -> float | None:
        return self.ratios.demo_accuracy

    @property
    def stage_seconds(self) -> float:
        """Seconds of every stage together."""
        return sum(float(v) for v in self.seconds.values())

    def counter(self, name: str) -> int:
        """A stage counter's value (0 where the run's stages do not count it)."""
        return self.counters.get(name, 0)

    def to_json(self) -> JSONObject:
        """The summary as ``summary.json`` holds it (key order included)."""
        head: JSONObject = {
            "run_id": self.run_id,
            "mode": self.mode,
            "dataset": self.dataset,
            "samples": self.samples,
            "skipped": self.skipped,
            "queried": self.queried,
            "accepted": self.accepted,
            "teacher_errors": self.teacher_errors,
            "icl_prompts_saved": self.icl_prompts_saved,
            **self.ratios.to_json(),
            "accuracy_queried": self.accuracy_queried,
            "accuracy_not_queried": self.accuracy_not_queried,
            "student_errors": self.student_errors,
            "pool_size": self.pool_size,
            "pool_precision": self.pool_precision,
            "seconds": dict(self.seconds),
            "cached_chunks": dict(self.cached_chunks),
            "chunks_in_flight_peak": self.chunks_in_flight_peak,
        }
        out: JSONObject = {
            **head,
            **self.counters,
            "teacher_calls": self.teacher_calls,
            "teacher_requests": self.teacher_requests,
            "student_image_cache_hit_rate": self.student_image_cache_hit_rate,
            **self.gains.to_json(),
            **_fields_json(self.costs),
            **_fields_json(self.compute),
        }
        for name, group in self.groups.items():
            out.update(group.to_json(name))
        if self.captions is not None:
            out.update(self.captions.to_json())
        if self.teacher_service is not None:
            out.update(self.teacher_service.to_json())
        if self.run_dir is not None:
            out.update(run_dir=self.run_dir, mlflow_run_id=self.mlflow_run_id)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        """The summary of its JSON form (``summary.json`` of this or an older version: a
        number missing there is 0 or None). Keys no field claims are counters."""
        groups = {
            k.removeprefix("samples_"): GroupNumbers.from_json(data, k.removeprefix("samples_"))
            for k in data
            if k.startswith("samples_") and f"accuracy_{k.removeprefix('samples_')}" in data
        }
        claimed = _fixed_keys() | {k for name, g in groups.items() for k in g.to_json(name)}
        captions = CaptionMetrics.from_json(data)
        if captions is not None:
            claimed |= set(captions.to_json())
        service = TeacherServiceStats.from_json(data)
        if service is not None:
            claimed |= set(service.to_json())
        counters = {k: v for k, v in data.items() if k not in claimed and isinstance(v, int)}
        return cls(
            **{f.name: data[f.name] for f in fields(cls) if f.name in _PLAIN and f.name in data},
            ratios=Ratios(**{k: data.get(k) for k in RATIOS}),
            seconds=dict(data.get("seconds") or {}),
            cached_chunks=dict(data.get("cached_chunks") or {}),
            counters=counters,
            gains=Gains(data.get("gain_from_teacher_labels"), data.get("gain_from_icl")),
            costs=_fields_from_json(Costs, data),
            compute=_fields_from_json(Compute, data),
            groups=groups,
            captions=captions,
            teacher_service=service,
        )


def as_summary(result: RunSummary | Mapping[str, Any]) -> RunSummary:
    """A stream flow's result as a :class:`RunSummary`: the flow returns the summary's
    JSON form (what travels through Prefect), :func:`icd.flows.stream.run_stream` the
    summary itself."""
    return result if isinstance(result, RunSummary) else RunSummary.from_json(result)


# RunSummary's fields that are one JSON key each, under their own name.
_NESTED = frozenset(
    {"ratios", "seconds", "cached_chunks", "counters", "gains", "costs", "compute", "groups",
     "captions", "teacher_service"}
)  # fmt: skip
_PLAIN = frozenset(f.name for f in fields(RunSummary)) - _NESTED


def _fixed_keys() -> set[str]:
    """The JSON keys of a summary's fixed fields."""
    return set(RunSummary(run_dir="").to_json())


_D = TypeVar("_D", Costs, Compute)


def _fields_json(record: Costs | Compute) -> dict[str, float | None]:
    return {f.name: getattr(record, f.name) for f in fields(record)}


def _fields_from_json(cls: type[_D], data: Mapping[str, Any]) -> _D:
    return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class RunTotals:
    """What a run knows beyond its predictions table: its identity, its counters, the
    teacher work it made, each stage's seconds (0 for results from the task cache) and
    how many chunks' results came from the cache, the student's adaptation cost and size,
    its pool's size and label precision (rows left for selection), and the most chunks it
    had in flight at once."""

    run_id: str | None = None
    mode: str | None = None
    dataset: str | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    made: Made = Made()
    seconds: Mapping[str, float] = field(default_factory=dict)
    cached: Mapping[str, int] = field(default_factory=dict)
    adapt: Mapping[str, float] = field(default_factory=dict)
    student_params: int = 0
    pool_size: int = 0
    pool_precision: float | None = None
    chunks_in_flight_peak: int = 0


def summarize_run(
    df: pl.DataFrame,
    totals: RunTotals | None = None,
    *,
    sums: ChunkSums | None = None,
    score_fn: Callable[[str, list[str]], float] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    task: str | None = None,
) -> RunSummary:
    """The run summary: its predictions table ``df`` with its ``totals``.

    ``sums`` are the run's merged chunk sums; without them they are summed from ``df``'s
    rows (scoring the zero-shot and ICL answers when ``task`` is given). The ratios,
    counters, teacher numbers and gains are those defined above; ``accuracy_queried`` /
    ``accuracy_not_queried`` split ``accuracy`` by whether the teacher labelled the sample.
    With ``groups`` (class groups such as ``base`` / ``novel``, by ground-truth class) and
    ``score_fn``, each group gets its :class:`GroupNumbers`. Costs: :func:`_costs` and
    :func:`_compute`. A captioning run (``task="captioning"``) adds the COCO caption
    evaluation of the final and the zero-shot captions (:func:`_caption_metrics`). A NaN
    among the numbers is None.
    """
    totals = totals or RunTotals()
    if sums is None:  # (the table's rows are prediction rows: it has their schema)
        sums = ChunkSums.of_rows(cast("list[PredictionRow]", df.to_dicts()), task)
    valid = df.filter(pl.col("skip_reason").is_null())
    r = sums.ratios
    summary = RunSummary(
        run_id=totals.run_id if totals.run_id is not None else _first(df, "run_id"),
        mode=totals.mode if totals.mode is not None else _first(df, "mode"),
        dataset=totals.dataset if totals.dataset is not None else _first(df, "dataset"),
        samples=sums.samples,
        skipped=sums.skipped,
        queried=sums.queried,
        accepted=sums.accepted,
        teacher_errors=sums.teacher_errors,
        icl_prompts_saved=sums.icl_prompts_saved,
        ratios=r,
        accuracy_queried=_mean(valid.filter(pl.col("queried"))["score"]),
        accuracy_not_queried=_mean(valid.filter(~pl.col("queried"))["score"]),
        student_errors=int(df["student_error"].is_not_null().sum()) if len(df) else 0,
        pool_size=totals.pool_size,
        pool_precision=totals.pool_precision,
        seconds=dict(totals.seconds),
        cached_chunks=dict(totals.cached),
        chunks_in_flight_peak=totals.chunks_in_flight_peak,
        counters=dict(totals.counters),
        teacher_calls=totals.made.answers,
        teacher_requests=totals.made.requests,
        student_image_cache_hit_rate=cache_hit_rate(totals.counters),
        gains=Gains.of(accuracy=r.accuracy, zs=r.zs_accuracy, forward=r.forward_accuracy),
        costs=_costs(valid, totals.seconds),
        compute=_compute(valid, totals),
        groups={
            name: _group_split(valid, set(classes), score_fn)
            for name, classes in (groups or {}).items()
            if score_fn is not None
        },
        captions=_caption_metrics(valid) if task == "captioning" else None,
    )
    return _without_nan(summary)


_R = TypeVar("_R")


def _without_nan(record: _R) -> _R:
    """``record`` (a dataclass) with each NaN among its optional numbers, and those of the
    records it holds, made None."""
    changes: dict[str, Any] = {}
    for f in fields(record):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        if isinstance(value, float) and math.isnan(value) and "None" in str(f.type):
            changes[f.name] = None
        elif isinstance(value, Ratios | Gains | Costs | Compute | CaptionMetrics | CaptionScores):
            changes[f.name] = _without_nan(value)
        elif f.name == "groups":
            changes[f.name] = {k: _without_nan(g) for k, g in value.items()}
    return replace(record, **changes)  # type: ignore[type-var]


def _first(df: pl.DataFrame, col: str) -> str | None:
    return str(df[col][0]) if len(df) and df[col][0] is not None else None


def _mean(series: pl.Series) -> float | None:
    values = series.drop_nulls()
    values = values.filter(values.is_not_nan()) if values.dtype.is_float() else values
    return float(values.mean()) if len(values) else None  # type: ignore[arg-type]


def _stage_seconds(seconds: Mapping[str, float], names: Sequence[str]) -> float:
    """The seconds of the first of ``names`` (a stage and its older names) ``seconds`` has."""
    return next((float(seconds[n]) for n in names if n in seconds), 0.0)


def _costs(valid: pl.DataFrame, seconds: Mapping[str, float]) -> Costs:
    """:class:`Costs` of the run's valid rows, with the stages' ``seconds``."""

    def tokens(col: str, q: float | None = None) -> float | None:
        values = valid[col].drop_nulls() if col in valid.columns else pl.Series([], dtype=pl.Int64)
        if not len(values):
            return None
        return float(values.mean() if q is None else values.quantile(q, "nearest"))  # type: ignore[arg-type]

    def per_prompt(stages: Sequence[str], col: str) -> float | None:
        n = int(valid[col].is_not_null().sum()) if col in valid.columns else 0
        spent = _stage_seconds(seconds, stages)
        return spent / n if n and spent > 0 else None

    with_demos = valid.filter(pl.col("icl_answer").is_not_null())
    return Costs(
        zs_prompt_tokens_mean=tokens("zs_prompt_tokens"),
        icl_prompt_tokens_mean=tokens("icl_prompt_tokens"),
        icl_prompt_tokens_p95=tokens("icl_prompt_tokens", 0.95),
        demos_per_icl_prompt=(
            float(with_demos["demo_ids"].list.len().mean()) if with_demos.height else None  # type: ignore[arg-type]
        ),
        seconds_per_zs_prompt=per_prompt(ZERO_SHOT_STAGES, "zs_answer"),
        seconds_per_icl_prompt=per_prompt(("icl",), "icl_answer"),
    )


def _compute(valid: pl.DataFrame, totals: RunTotals) -> Compute:
    """:class:`Compute` of the run's valid rows and its adaptation (``totals.adapt``)."""
    adapt = dict(totals.adapt)
    params = float(totals.student_params or 0)
    tokens = sum(
        float(valid[c].sum() or 0)
        for c in ("zs_prompt_tokens", "icl_prompt_tokens")
        if c in valid.columns
    )
    inference = 2.0 * params * tokens if params else None
    adapt_flops = float(adapt.get("flops", 0.0))
    return Compute(
        adapt_steps=int(adapt.get("steps", 0)),
        adapt_tokens=int(adapt.get("tokens", 0)),
        adapt_flops=adapt_flops,
        adapt_seconds=float(totals.seconds.get("adapt", 0.0)),
        adapt_peak_rss_mb=adapt.get("peak_rss_mb"),
        student_params=int(params),
        student_prompt_tokens=int(tokens),
        inference_flops=inference,
        compute_flops=adapt_flops + inference if inference is not None else None,
    )


def _group_split(
    valid: pl.DataFrame, classes: set[str], score_fn: Callable[[str, list[str]], float]
) -> GroupNumbers:
    """One class group's share of the summary (rows whose first true answer is in it)."""
    rows = valid.filter(pl.col("answers").list.first().is_in(list(classes)))
    zs, fwd = [], []
    for r in rows.select("zs_answer", "teacher_label", "queried", "answers").iter_rows(named=True):
        if r["zs_answer"] is None:  # the student did not answer (teacher zero-shot mode)
            continue
        z = score_fn(r["zs_answer"], r["answers"])
        label = r["teacher_label"] if r["queried"] else None
        zs.append(z)
        fwd.append(z if label is None else score_fn(label, r["answers"]))
    accuracy = _mean(rows["score"])
    zs_accuracy = sum(zs) / len(zs) if zs else None
    forward = sum(fwd) / len(fwd) if fwd else None
    return GroupNumbers(
        samples=rows.height,
        accuracy=accuracy,
        accuracy_not_queried=_mean(rows.filter(~pl.col("queried"))["score"]),
        zs_accuracy=zs_accuracy,
        forward_accuracy=forward,
        gains=Gains.of(accuracy=accuracy, zs=zs_accuracy, forward=forward),
    )


def _caption_metrics(valid: pl.DataFrame) -> CaptionMetrics:
    """The COCO caption evaluation (:func:`icd.method.metrics.coco_caption_metrics`) of a
    captioning run's final captions and of the student's zero-shot ones (over the samples
    it answered), and the PTB tokenizer that made them."""
    zs = valid.filter(pl.col("zs_answer").is_not_null())
    tokenizer = caption_tokenizer()

    def scores(rows: pl.DataFrame, column: str) -> CaptionScores:
        preds, refs = rows[column].to_list(), rows["answers"].to_list()
        m = coco_caption_metrics(preds, refs, tokenizer) if rows.height else {}
        return CaptionScores(*(m.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")))

    return CaptionMetrics(scores(valid, "final_answer"), scores(zs, "zs_answer"), tokenizer)
