"""What real OpenAI-compatible services send, and what the ``openai`` client makes of it.

A recording server (``tests/openai_server.py::RecordingServer``, real HTTP on loopback)
answers with choices as services write them: ``finish_reason`` ``content_filter`` or
``length``, refusals (``content: null`` plus ``refusal`` text), empty content, ``logprobs:
null``. A filtered, refused or empty answer is never a vote; a sample left without any
usable answer is a ``teacher_error`` that keeps the refusal's text (the sample falls back to
the student); ``length`` answers are counted (``truncated``) and kept or dropped by
``models.*.length_answers``. A student answer without log-probs is a ``student_error`` with
unknown (NaN) uncertainty, never a fully certain answer.
"""

from __future__ import annotations

import io
import logging
import math

import pytest
from PIL import Image

from icd.config import ConfigError, VotingConfig, load_config
from icd.data import shapes
from icd.data.types import Sample
from icd.method import steps
from icd.method.modes import plan
from icd.method.prompts import build_prompt
from icd.models.base import Sampling
from icd.models.openai import OpenAIOptions, OpenAIStudent, OpenAITeacher, summarize_stats
from tests.openai_server import RecordingServer, choice

MODEL = "some-service-model"
REFUSAL = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="module")
def server():
    with RecordingServer(model_name=MODEL) as srv:
        yield srv


@pytest.fixture
def rec(server):
    server.reset_counts()
    return server


def _inputs(n: int = 1) -> tuple[list[Sample], list]:
    images = [Image.open(io.BytesIO(shapes.render_shape(i, 3))).convert("RGB") for i in range(n)]
    samples = [Sample(f"s{i}", i, shapes.QUESTION, ["blue triangle"]) for i in range(n)]
    return samples, [build_prompt(shapes.QUESTION, im) for im in images]


def _options(**kw) -> OpenAIOptions:
    args = dict(api_key_env="ICD_NO_KEY", max_retries=1, backoff_base=0.01, max_tokens=8)
    args.update(kw)
    return OpenAIOptions(**args)


def _teacher(srv: RecordingServer, **kw) -> OpenAITeacher:
    return OpenAITeacher(srv.url, MODEL, _options(**kw))


def _student(srv: RecordingServer, **kw) -> OpenAIStudent:
    return OpenAIStudent(srv.url, MODEL, _options(**kw))


def _annotate(teacher: OpenAITeacher, n: int = 5, include_greedy: bool = False):
    samples, prompts = _inputs()
    return teacher.annotate(samples, prompts, Sampling(n, 0.7, include_greedy, 0))


def test_content_filtered_answers_are_a_teacher_error_never_a_label(rec, caplog) -> None:
    rec.answer_with([choice("red", "content_filter")] * 5)
    teacher = _teacher(rec)
    with caplog.at_level(logging.WARNING, logger="icd.models.openai"):
        anns = _annotate(teacher, include_greedy=True)
    (ann,) = anns
    assert ann.generations == []
    assert ann.error is not None and ann.error.startswith("teacher_error: no usable answer")
    assert "content_filter" in ann.error
    (vote,) = steps.vote_annotations(anns, VotingConfig(), ["red", "blue triangle"])
    assert vote.label is None and not vote.accepted and vote.error == ann.error
    # the sample keeps the student's answer, marked as a fallback (DESIGN §6)
    cfg = load_config("smoke", overrides=["method.final_from_teacher=true"])
    final = steps.final_answers(plan(cfg.method), ["blue triangle"], None, [vote])
    assert final == [("blue triangle", "student_fallback")]
    assert teacher.stats()["filtered"] == 5 and teacher.stats()["errors"] == 1
    assert summarize_stats([anns.service])["filtered"] == 5  # into the run's summary
    assert "content_filter" in caplog.text


def test_a_refusal_is_a_teacher_error_that_keeps_the_refusal_text(rec) -> None:
    rec.answer_with([choice(None, refusal=REFUSAL)] * 5)
    teacher = _teacher(rec)
    (ann,) = _annotate(teacher)
    assert ann.generations == []
    assert ann.error is not None and REFUSAL in ann.error and "refusal" in ann.error
    assert teacher.stats()["refused"] == 5


def test_empty_content_is_no_vote(rec) -> None:
    rec.answer_with([choice("blue triangle")] * 2 + [choice("   "), choice(None)] + [choice("")])
    teacher = _teacher(rec)
    (ann,) = _annotate(teacher)
    assert [g.text for g in ann.generations] == ["blue triangle"] * 2
    assert ann.error is None and teacher.stats()["empty"] == 3


def test_mixed_answers_vote_over_the_usable_ones_and_count_the_rest(rec) -> None:
    rec.answer_with(
        [choice("blue triangle")] * 2
        + [choice("blue triangle", logprobs=False)]  # a teacher without logprobs still votes
        + [choice("red", "content_filter"), choice(None, refusal=REFUSAL)]
    )
    teacher = _teacher(rec)
    anns = _annotate(teacher)
    (ann,) = anns
    assert ann.error is None
    assert [g.text for g in ann.generations] == ["blue triangle"] * 3
    (vote,) = steps.vote_annotations(anns, VotingConfig(), ["red", "blue triangle"])
    assert vote.label == "blue triangle" and vote.agreement == 1.0
    s = teacher.stats()
    assert (s["filtered"], s["refused"], s["samples"], s["errors"]) == (1, 1, 5, 0)


def test_length_answers_are_flagged_and_kept_or_dropped_as_configured(rec) -> None:
    script = [choice("blue triangle")] * 3 + [choice("blue", "length")] * 2
    rec.answer_with(script)
    keep = _teacher(rec)
    (ann,) = _annotate(keep)
    assert [g.text for g in ann.generations] == ["blue triangle"] * 3 + ["blue"] * 2
    assert keep.stats()["truncated"] == 2
    rec.answer_with(script)
    drop = _teacher(rec, length_answers="drop")
    (ann,) = _annotate(drop)
    assert [g.text for g in ann.generations] == ["blue triangle"] * 3
    assert drop.stats()["truncated"] == 2
    rec.answer_with([choice("blue", "length")] * 5)
    (ann,) = _annotate(drop)
    assert ann.error is not None and "length" in ann.error
    cfg = load_config("smoke", overrides=["models.teacher.length_answers=drop"])
    assert cfg.models.teacher.length_answers == "drop"


def test_a_student_answer_without_logprobs_is_a_student_error_not_certain(rec, caplog) -> None:
    rec.answer_with([choice("blue triangle", logprobs=False)])
    student = _student(rec, top_logprobs=20)
    _, prompts = _inputs(3)
    with caplog.at_level(logging.WARNING, logger="icd.models.openai"):
        gens = student.generate(prompts)
    assert rec.requests[0]["logprobs"] is True and rec.requests[0]["top_logprobs"] == 20
    for g in gens:
        assert g.error is not None and g.error.startswith("student_error: no usable answer")
        assert "no logprobs" in g.error and g.text == ""
    answers, unc = steps.student_outputs(gens, "entropy_mean")
    assert all(math.isnan(u) for u in unc)  # unknown: never 0, so never "certain"
    # the policy does not see them (never queried on a made-up certainty)
    import numpy as np

    from icd.config import PolicyConfig
    from icd.method.policy import PolicyState

    queried, _ = steps.teacher_queries(
        3, queries="budget", uncertainties=unc, state=PolicyState(),
        policy=PolicyConfig(), stream_length=None,
    )  # fmt: skip
    assert not np.any(queried)
    assert "no logprobs" in caplog.text
    # its own client: it logs in its role, and is no teacher
    assert "student: sample" in caplog.text and "teacher:" not in caplog.text
    assert not isinstance(student, OpenAITeacher) and student.chat.role == "student"


def test_a_student_refusal_or_filtered_answer_is_a_student_error(rec) -> None:
    _, prompts = _inputs(1)
    rec.answer_with([choice(None, refusal=REFUSAL)])
    (g,) = _student(rec).generate(prompts)
    assert g.error is not None and g.error.startswith("student_error") and REFUSAL in g.error
    rec.answer_with([choice("red", "content_filter")])
    (g,) = _student(rec).generate(prompts)
    assert g.error is not None and "content_filter" in g.error and g.text == ""


def test_top_logprobs_is_bounded_by_the_api_limit() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("smoke", overrides=["models.student.top_logprobs=50"])
    message = str(e.value)
    assert "models.student.top_logprobs" in message and "20" in message
    assert "\n" not in message
    assert load_config("smoke", overrides=["models.student.top_logprobs=20"])
