"""The run-level numbers, each defined once: chunk sums that merge exactly, ratios with
their stated denominators, and the summary built from them."""

from __future__ import annotations

import dataclasses
import math

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icd.method.accounting import (
    RATIOS,
    ChunkSums,
    Made,
    RunTotals,
    running_numbers,
    summarize_run,
)
from icd.method.metrics import corpus_bleu, corpus_cider
from icd.storage.results import PREDICTION_SCHEMA, predictions_frame
from tests.storage.test_results import record


def chunk_metrics(rows, task, **mapping):
    """The JSON form of ``rows``' sums, as a committed chunk's state keeps them."""
    return ChunkSums.of_rows(rows, task, **mapping).to_json()


def merge_metrics(running, chunk):
    """Two chunks' sums (JSON form) added up, in JSON form; ``running=None`` starts."""
    if running is None:
        return dict(chunk)
    return (ChunkSums.from_json(running) + ChunkSums.from_json(chunk)).to_json()


def summarize(df, totals=None, *, sums=None, **kw):
    """The summary's JSON form (``summary.json``), ``sums`` given in their JSON form."""
    if sums is not None and not isinstance(sums, ChunkSums):
        sums = ChunkSums.from_json(sums)
    return summarize_run(df, totals, sums=sums, **kw).to_json()


def test_chunk_metrics_score_student_answers_with_the_class_mapping():
    row = {
        "answers": ["red circle"],
        "zs_answer": "a red circle shape",
        "icl_answer": "red circel",
        "score": 1.0,
    }
    m = chunk_metrics([row], "classification", class_names=["red circle", "blue star"])
    assert (m["zs_accuracy"], m["icl_accuracy"]) == (1.0, 1.0)
    unmapped = chunk_metrics([row], "classification")
    assert (unmapped["zs_accuracy"], unmapped["icl_accuracy"]) == (0.0, 0.0)


def row(**kw):
    base = dict(
        skip_reason=None,
        answers=["cat"],
        score=None,
        zs_answer=None,
        icl_answer=None,
        queried=False,
        accepted=False,
        agreement=None,
        teacher_error=None,
        demo_accuracy=None,
        final_source=None,
    )
    base.update(kw)
    return base


def example_rows():
    return [
        row(
            score=1.0,
            zs_answer="dog",
            icl_answer="cat",
            final_source="student_icl",
            demo_accuracy=0.5,
        ),
        row(
            score=1.0,
            zs_answer="cat",
            queried=True,
            accepted=True,
            agreement=0.8,
            teacher_label="cat",
            final_source="teacher",
        ),
        row(
            score=0.0,
            zs_answer="dog",
            queried=True,
            accepted=False,
            agreement=0.4,
            teacher_label="cat",
            final_source="student_zs",
        ),
        row(
            score=0.0,
            zs_answer="dog",
            queried=True,
            teacher_error="timeout",
            final_source="student_fallback",
        ),
        row(skip_reason="bad image"),
        row(score=1.0, final_source="teacher_zs"),
    ]


def test_chunk_metrics_counts():
    m = chunk_metrics(example_rows(), "classification")
    assert m["samples"] == 6 and m["skipped"] == 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["zs_accuracy"] == pytest.approx(1 / 4) and m["icl_accuracy"] == 1.0
    # forwarding: the two teacher labels (both right) replace zero-shot answers dog/cat
    assert m["forward_accuracy"] == pytest.approx(2 / 4)
    assert m["queried"] == 3 and m["accepted"] == 1 and m["teacher_errors"] == 1
    # the budget's denominator: every stream sample, the skipped one included
    assert m["annotation_rate"] == pytest.approx(3 / 6)
    assert m["acceptance_rate"] == pytest.approx(1 / 3)
    assert m["mean_agreement"] == pytest.approx(0.6) and m["agreement_min"] == 0.4
    assert m["demo_accuracy"] == 0.5
    assert m["source_teacher"] == 1 and m["source_student_fallback"] == 1
    empty = chunk_metrics([], "classification")
    assert empty["accuracy"] is None and empty["annotation_rate"] is None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=20), st.integers(0, 20))
def test_merged_chunks_equal_the_whole(picks, cut):
    rows = [example_rows()[i] for i in picks]
    whole = chunk_metrics(rows, "classification")
    a = chunk_metrics(rows[:cut], "classification")
    b = chunk_metrics(rows[cut:], "classification")
    merged = merge_metrics(merge_metrics(None, a), b)
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value), key


def _records(rows):
    """Prediction records for ``rows`` (the table's required columns filled in)."""
    out = []
    for i, r in enumerate(rows):
        rec = {
            "run_id": "r", "mode": "icd", "dataset": "d", "sample_id": f"s{i}", "chunk": 0,
            "stream_pos": i, "question": "q", "answers": r["answers"],
            "skip_reason": r["skip_reason"], "queried": r["queried"],
            "accepted": bool(r["accepted"]), "teacher_votes": [], "demo_ids": [],
            "demo_labels": [],
        }  # fmt: skip
        if r["skip_reason"] is None:
            for k in ("score", "zs_answer", "icl_answer", "agreement", "teacher_error",
                      "demo_accuracy", "final_source", "teacher_label"):  # fmt: skip
                rec[k] = r.get(k)
        out.append(rec)
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=20), st.integers(0, 20))
def test_the_summary_and_the_running_numbers_agree(picks, cut) -> None:
    """The final summary (from the merged chunk sums, or from the predictions table alone)
    and the numbers logged per chunk give every ratio the same value."""
    rows = [example_rows()[i] for i in picks]
    df = predictions_frame(_records(rows))
    running = merge_metrics(
        merge_metrics(None, chunk_metrics(rows[:cut], "classification")),
        chunk_metrics(rows[cut:], "classification"),
    )
    counters = {"teacher_answers_used": 15, "teacher_calls_reused": 5}
    totals = RunTotals(counters=counters, made=Made(answers=10, requests=4), pool_size=3)
    from_sums = summarize(df, totals, sums=running, task="classification")
    from_table = summarize(df, totals, task="classification")
    logged = running_numbers(running, counters=counters, made=totals.made, pool_size=3)
    for name in (*RATIOS, "queried", "accepted", "samples", "skipped", "teacher_calls",
                 "teacher_requests", "teacher_calls_reused", "pool_size"):  # fmt: skip
        assert from_sums[name] == pytest.approx(logged[name]), name
        assert from_table[name] == pytest.approx(logged[name]), name
    assert from_sums["teacher_calls"] == 10 and from_sums["teacher_answers_used"] == 15
    valid = df.filter(pl.col("skip_reason").is_null())
    if valid["score"].is_not_null().any():
        assert from_sums["accuracy"] == pytest.approx(valid["score"].mean())


def test_summary_aggregates_the_table() -> None:
    recs = [
        record(0, queried=True, teacher_votes=["circle"] * 3, teacher_label="circle",
               agreement=1.0, accepted=True, final_source="teacher", demo_accuracy=None),
        record(1, queried=True, teacher_votes=["a", "b"], agreement=0.5, teacher_label="a",
               final_answer="a", score=0.0, final_source="teacher", demo_accuracy=0.5),
        record(2, zs_answer="circle", final_source="student_icl", score=1.0),
        record(3, queried=True, teacher_error="HTTP 503", final_source="student_fallback",
               score=0.0, demo_accuracy=0.0),
        record(4, skip_reason="bad image", zs_answer=None, score=None, final_answer=None,
               final_source=None, demo_ids=[], demo_labels=[], demo_accuracy=None),
    ]  # fmt: skip
    df = predictions_frame(recs)
    totals = RunTotals(made=Made(answers=7, requests=3), pool_size=1, seconds={"embed": 2.0})
    summary = summarize(df, totals, task="classification")
    shown = {k: summary[k] for k in (
        "run_id", "mode", "dataset", "samples", "skipped", "accuracy", "accuracy_queried",
        "accuracy_not_queried", "zs_accuracy", "forward_accuracy", "icl_accuracy",
        "annotation_rate", "acceptance_rate", "queried", "accepted", "teacher_calls",
        "teacher_requests", "teacher_errors", "student_errors", "pool_size", "mean_agreement",
        "demo_accuracy", "seconds", "gain_from_teacher_labels", "gain_from_icl",
        "zs_prompt_tokens_mean", "icl_prompt_tokens_mean", "icl_prompt_tokens_p95",
        "demos_per_icl_prompt", "seconds_per_zs_prompt", "seconds_per_icl_prompt",
        "adapt_steps", "adapt_tokens", "adapt_flops", "adapt_seconds", "adapt_peak_rss_mb",
        "student_params", "inference_flops", "compute_flops",
    )}  # fmt: skip
    assert shown == {
        "run_id": "r",
        "mode": "icd",
        "dataset": "shapes",
        "samples": 5,
        "skipped": 1,
        "accuracy": pytest.approx(2 / 4),
        "accuracy_queried": pytest.approx(1 / 3),
        "accuracy_not_queried": pytest.approx(1.0),
        # zero-shot: only sample 2 said "circle"; forwarding the labels fixes sample 0
        "zs_accuracy": pytest.approx(1 / 4),
        "forward_accuracy": pytest.approx(2 / 4),
        "icl_accuracy": 1.0,
        # the budget's denominator: every stream sample, the skipped one included
        "annotation_rate": pytest.approx(3 / 5),
        "acceptance_rate": pytest.approx(1 / 3),
        "queried": 3,
        "accepted": 1,
        "teacher_calls": 7,
        "teacher_requests": 3,
        "teacher_errors": 1,
        "student_errors": 0,
        "pool_size": 1,
        "mean_agreement": pytest.approx(0.75),
        "demo_accuracy": pytest.approx(1.5 / 3),
        "seconds": {"embed": 2.0},
        "gain_from_teacher_labels": pytest.approx(1 / 4),
        "gain_from_icl": pytest.approx(0.0),
        "zs_prompt_tokens_mean": None,
        "icl_prompt_tokens_mean": None,
        "icl_prompt_tokens_p95": None,
        "demos_per_icl_prompt": 2.0,
        "seconds_per_zs_prompt": None,
        "seconds_per_icl_prompt": None,
        "adapt_steps": 0,
        "adapt_tokens": 0,
        "adapt_flops": 0.0,
        "adapt_seconds": 0.0,
        "adapt_peak_rss_mb": None,
        "student_params": 0,
        "inference_flops": None,
        "compute_flops": None,
    }
    # the run's merged chunk sums, when given, are what the ratios come from
    sums = {**chunk_metrics(df.to_dicts(), "classification"), "zs_score_sum": 3.6}
    assert summarize(df, totals, sums=sums)["zs_accuracy"] == pytest.approx(0.9)


def test_summary_gives_the_cost_of_each_student_pass() -> None:
    recs = [
        record(i, zs_prompt_tokens=10, icl_prompt_tokens=40 + 10 * i, demo_ids=["a"] * (1 + i))
        for i in range(4)
    ]
    recs[3].update(icl_answer=None, icl_prompt_tokens=None, demo_ids=[])
    s = summarize(predictions_frame(recs), RunTotals(seconds={"score": 2.0, "icl": 3.0}))
    assert s["zs_prompt_tokens_mean"] == 10
    assert s["icl_prompt_tokens_mean"] == 50 and s["icl_prompt_tokens_p95"] == 60
    assert s["demos_per_icl_prompt"] == 2.0
    assert s["seconds_per_zs_prompt"] == 0.5 and s["seconds_per_icl_prompt"] == 1.0
    adapt = {"steps": 8, "tokens": 100, "flops": 6e5, "peak_rss_mb": 900.0}
    s = summarize(predictions_frame(recs), RunTotals(student_params=1000, adapt=adapt))
    tokens = 4 * 10 + (40 + 50 + 60)  # every zero-shot and ICL prompt token
    assert s["inference_flops"] == 2 * 1000 * tokens
    assert s["compute_flops"] == 6e5 + 2 * 1000 * tokens
    assert s["adapt_steps"] == 8 and s["adapt_tokens"] == 100


def test_summary_splits_gains_overall_and_per_class_group() -> None:
    # Four samples: ant and bee are base, cat and dog novel. cat is queried and forwarded.
    recs = [
        record(0, answers=["ant"], zs_answer="ant", score=1.0),
        record(1, answers=["bee"], zs_answer="x", score=0.0),
        record(2, answers=["cat"], zs_answer="x", queried=True, teacher_label="cat",
               final_answer="cat", final_source="teacher", score=1.0),
        record(3, answers=["dog"], zs_answer="x", final_answer="dog", score=1.0),
    ]  # fmt: skip
    df = predictions_frame(recs)
    score = lambda pred, answers: float(pred in answers)  # noqa: E731
    s = summarize(
        df,
        score_fn=score,
        groups={"base": ["ant", "bee"], "novel": ["cat", "dog"]},
        task="classification",
    )
    assert (s["zs_accuracy"], s["forward_accuracy"]) == (0.25, 0.5)
    assert s["gain_from_teacher_labels"] == pytest.approx(0.25)
    assert s["gain_from_icl"] == pytest.approx(0.75 - 0.5)
    assert s["samples_base"] == s["samples_novel"] == 2
    assert s["accuracy_base"] == pytest.approx(0.5) and s["accuracy_novel"] == 1.0
    assert s["zs_accuracy_novel"] == 0.0 and s["forward_accuracy_novel"] == 0.5
    assert s["gain_from_teacher_labels_novel"] == 0.5 and s["gain_from_icl_novel"] == 0.5
    assert s["accuracy_not_queried_novel"] == 1.0 and s["gain_from_icl_base"] == 0.0
    # The groups add up to the whole.
    whole = (s["accuracy_base"] * 2 + s["accuracy_novel"] * 2) / 4
    assert whole == pytest.approx(s["accuracy"])


def test_summary_of_an_empty_run() -> None:
    empty = pl.DataFrame(schema=PREDICTION_SCHEMA)
    summary = summarize(empty, RunTotals(run_id="r", mode="icd"))
    assert summary["samples"] == 0 and summary["accuracy"] is None
    assert summary["run_id"] == "r" and summary["annotation_rate"] is None


def test_captioning_summary_adds_corpus_bleu_and_cider() -> None:
    refs = [["a b"], ["c d"], ["e f"]]
    recs = [
        record(0, answers=refs[0], final_answer="a b", zs_answer="a c", score=1.0),
        record(1, answers=refs[1], final_answer="c d", zs_answer="c d", score=1.0),
        record(2, answers=refs[2], final_answer=None, final_source=None, zs_answer=None),
        record(3, answers=["x y"], skip_reason="bad image", final_answer=None, score=None),
    ]
    df = predictions_frame(recs)
    s = summarize(df, task="captioning")
    # CIDEr-D by hand (see tests/method/test_captioning.py): three images whose n-grams
    # occur in one reference each; "a b" and "c d" match exactly: 10 * mean(1, 1, 0, 0) = 5
    # each, the missing caption 0; the skipped sample is left out.
    assert s["cider"] == pytest.approx((5.0 + 5.0 + 0.0) / 3)
    # BLEU-1: 4 of 4 words right, 4 hypothesis words vs 6 reference words: exp(1 - 6/4).
    assert s["bleu1"] == pytest.approx(100 * math.exp(1 - 6 / 4))
    # no 3- or 4-grams: COCO BLEU-4 is near 0 (pycocoevalcap smooths 0/0 precisions)
    assert 0.0 < s["bleu"] < 0.1 and s["bleu4"] == s["bleu"]
    assert s["caption_tokenizer"] in ("ptb-java", "ptb-python")
    # The student's zero-shot captions, over the two samples it answered.
    assert s["zs_cider"] == pytest.approx(corpus_cider(["a c", "c d"], refs[:2]))
    assert s["zs_bleu1"] == pytest.approx(corpus_bleu(["a c", "c d"], refs[:2], max_order=1))
    # Other tasks get none of these.
    assert not {"bleu", "cider", "bleu1", "zs_bleu", "caption_tokenizer"} & set(summarize(df))
    assert not {"bleu", "cider"} & set(summarize(df, task="classification"))


_ratio = st.none() | st.floats(0, 1)
_count = st.integers(0, 10**6)


def _run_summaries():
    from icd.method.accounting import (
        CaptionMetrics,
        CaptionScores,
        Compute,
        Costs,
        Gains,
        GroupNumbers,
        Ratios,
        RunSummary,
    )

    gains = st.builds(Gains, _ratio, _ratio)
    group = st.builds(GroupNumbers, _count, _ratio, _ratio, _ratio, _ratio, gains)
    scores = st.builds(CaptionScores, _ratio, _ratio, _ratio, _ratio, _ratio)
    text = st.none() | st.text(max_size=8)
    return st.builds(
        RunSummary,
        run_id=text,
        mode=text,
        dataset=text,
        samples=_count,
        queried=_count,
        teacher_errors=_count,
        ratios=st.builds(Ratios, *[_ratio] * 8),
        accuracy_queried=_ratio,
        pool_precision=_ratio,
        seconds=st.dictionaries(st.sampled_from(["embed", "zero_shot", "icl"]), st.floats(0, 9)),
        cached_chunks=st.dictionaries(st.sampled_from(["embed", "icl"]), _count),
        counters=st.dictionaries(
            st.sampled_from(["samples_seen", "teacher_answers_used", "pool_evicted"]), _count
        ),
        teacher_calls=_count,
        teacher_requests=_count,
        gains=gains,
        costs=st.builds(Costs, *[_ratio] * 6),
        compute=st.builds(Compute, _count, _count, st.floats(0, 1e12), st.floats(0, 9), _ratio),
        groups=st.dictionaries(st.sampled_from(["base", "novel", "seen_rare"]), group),
        captions=st.none() | st.builds(CaptionMetrics, scores, scores, st.just("ptb-python")),
        run_dir=text,
        mlflow_run_id=text,
    )


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_run_summary_round_trips_through_its_json_form(data) -> None:
    """``summary.json`` gives back the summary it was written from, key for key."""
    import json

    from icd.method.accounting import RunSummary

    summary = data.draw(_run_summaries())
    if summary.run_dir is None:  # an unwritten summary has no location in JSON
        summary = dataclasses.replace(summary, mlflow_run_id=None)
    text = json.dumps(summary.to_json())
    back = RunSummary.from_json(json.loads(text))
    assert back == summary
    assert json.dumps(back.to_json()) == text


def test_a_remote_teachers_numbers_round_trip_under_their_json_names() -> None:
    """The service accounting's ``teacher_requests`` / ``teacher_errors`` replace the
    ledger's and the sums' in JSON (as the summary always wrote them)."""
    from icd.method.accounting import RunSummary, TeacherServiceStats

    service = TeacherServiceStats(requests=7, ok=6, failures=1, errors=1, latency_p50_ms=3.0)
    summary = RunSummary(teacher_requests=5, teacher_errors=0, teacher_service=service)
    data = summary.to_json()
    assert (data["teacher_requests"], data["teacher_errors"], data["teacher_ok"]) == (7, 1, 6)
    assert RunSummary.from_json(data).to_json() == data
    assert RunSummary.from_json(data).teacher_service == service


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=20), st.integers(0, 20))
def test_chunk_sums_add_up_to_the_whole_and_round_trip(picks, cut) -> None:
    from icd.method.accounting import ChunkSums

    rows = [example_rows()[i] for i in picks]
    whole = ChunkSums.of_rows(rows, "classification")
    parts = ChunkSums.of_rows(rows[:cut], "classification") + ChunkSums.of_rows(
        rows[cut:], "classification"
    )
    assert parts.to_json() == pytest.approx(whole.to_json())
    assert ChunkSums.from_json(whole.to_json()) == whole
    assert whole.to_json() == chunk_metrics(rows, "classification")
