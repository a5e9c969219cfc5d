"""Stage ``annotate``: the budgeted query policy picks samples (a plain call:
microseconds), and the teacher answers each of them N times; the answers are voted."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from icd.config import VotingConfig
from icd.data.types import Chunk
from icd.method import steps
from icd.method.accounting import Made
from icd.method.policy import PolicyState
from icd.method.voting import VoteResult
from icd.models import load_teacher
from icd.models.base import Sampling, ServiceCalls
from icd.tasks.base import MODEL_RETRIES, TaskParameters, stage, stage_cache, zero_shot_prompts
from icd.tasks.context import LedgerRound, RunContext
from icd.tasks.runner import Runner
from icd.tasks.zero_shot import Answers

COUNTERS = (
    "teacher_answers_used",  # answers behind this run's labels
    "teacher_requests_used",
    "teacher_calls_reused",  # of those, answers another run made (the task cache)
    "teacher_requests_reused",
)


@dataclass(frozen=True)
class Annotated:
    votes: dict[str, VoteResult]  # by sample id
    answers: int  # teacher answers returned
    requests: int  # requests sent (a request may return several answers)
    service: ServiceCalls = field(default_factory=ServiceCalls)  # a remote teacher's


def _annotate_inputs(p: TaskParameters) -> object:
    return [p["queried_ids"], p["voting"].model_dump(mode="json")]


@stage(
    "annotate",
    cache_policy=stage_cache("models.teacher", "seed", inputs=_annotate_inputs),
    **MODEL_RETRIES,
)
def annotate(
    *, ctx: RunContext, chunk: Chunk, queried_ids: list[str], voting: VotingConfig
) -> Annotated:
    """Label the queried samples: N teacher answers each, aggregated into one vote each.

    Each real teacher round is appended to the run's ledger file (one JSON line) before the
    result is persisted, so a run's teacher spend can be audited across resumes.
    """
    wanted = set(queried_ids)
    samples = [s for s in chunk.valid if s.sample_id in wanted]
    if not samples:
        return Annotated({}, 0, 0)
    model = load_teacher(ctx.cfg.models.teacher, ctx.class_names)
    prompts = zero_shot_prompts(samples, task_type=ctx.task_type, class_names=None)
    sampling = Sampling(voting.n, voting.temperature, voting.include_greedy, ctx.cfg.seed)
    anns = model.annotate(samples, prompts, sampling)
    service = anns.service  # a remote teacher's retries and latency
    votes = steps.vote_annotations(anns, voting, ctx.class_names, ctx.synonyms, task=ctx.task_type)
    requests = sum(a.requests for a in anns)
    returned = sum(len(a.generations) for a in anns)
    record = LedgerRound(
        chunk_key=chunk.key,
        sample_ids=[s.sample_id for s in samples],
        requests=requests,
        samples=returned,
        time=time.time(),
    )
    with Path(ctx.ledger).open("a") as f:
        f.write(json.dumps(record) + "\n")
    votes_by_id = {s.sample_id: v for s, v in zip(samples, votes, strict=True)}
    return Annotated(votes_by_id, returned, requests, service)


@dataclass(frozen=True)
class Labels:
    """The teacher's side of a chunk: the samples the policy picked, their voted labels
    (``votes``; in the ask-all modes the teacher's answer on every sample is
    ``teacher_answers`` instead), the policy after the chunk, a remote teacher's
    accounting, the teacher work this run made for the chunk (none when its labels came
    from the task cache) and this stage's counters."""

    queried_ids: list[str]
    votes: dict[str, VoteResult]
    teacher_answers: dict[str, VoteResult]
    policy: PolicyState
    service: ServiceCalls = field(default_factory=ServiceCalls)
    made: Made = Made()
    counts: dict[str, int] = field(default_factory=dict)

    def vote(self, sample_id: str) -> VoteResult | None:
        """The budgeted label of ``sample_id`` (None: not queried)."""
        return self.votes.get(sample_id)


def run(
    runner: Runner,
    ctx: RunContext,
    *,
    chunk: Chunk,
    answers: Answers,
    policy: PolicyState,
    ledgered: frozenset[str],
) -> Labels:
    """Pick the chunk's samples for the teacher (the plan's ``queries``; the budgeted
    policy reads the zero-shot ``answers``' uncertainty and its state ``policy``), have
    them labelled, and count the teacher answers used, reused (labels another run made:
    cached, for a chunk not in this run's ``ledgered`` chunks) and made."""
    valid = chunk.valid
    mask, policy = steps.teacher_queries(
        len(valid),
        queries=ctx.plan.queries,
        uncertainties=answers.uncertainty,
        state=policy,
        policy=ctx.cfg.method.policy,
        stream_length=ctx.stream_length,
    )
    queried = [s.sample_id for s, q in zip(valid, mask, strict=True) if q]
    if not queried:
        return Labels(queried, {}, {}, policy)
    done = runner.now(annotate, ctx=ctx, chunk=chunk, queried_ids=queried, voting=ctx.plan.voting)
    ann = done.value
    counts = {"teacher_answers_used": ann.answers, "teacher_requests_used": ann.requests}
    made = Made()
    if not done.cached:  # this run's round, in its ledger
        made = Made(ann.answers, ann.requests)
    elif chunk.key not in ledgered:  # another run's answers
        counts.update(teacher_calls_reused=ann.answers, teacher_requests_reused=ann.requests)
    ask_all = ctx.plan.queries == "all"
    return Labels(
        queried_ids=queried,
        votes={} if ask_all else ann.votes,
        teacher_answers=ann.votes if ask_all else {},
        policy=policy,
        service=ann.service,
        made=made,
        counts=counts,
    )
