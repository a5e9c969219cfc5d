"""Stages called with their inputs: each takes the typed results it reads and returns its
own, so a stage is tested without a flow, a chunk record or a task runner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from icd.config import load_config
from icd.data.types import Chunk, Sample
from icd.flows.stream import ChunkResults, advance
from icd.method import modes
from icd.method.accounting import ChunkSums, Made
from icd.method.policy import PolicyState
from icd.method.voting import VoteResult
from icd.storage import results
from icd.tasks import evaluate
from icd.tasks.annotate import Labels
from icd.tasks.context import Ledger, ResumeState, RunContext, chain
from icd.tasks.icl import DemoAnswers, Demonstrated
from icd.tasks.pool import Pooled
from icd.tasks.runner import Books
from icd.tasks.zero_shot import Answers

CLASSES = ["circle", "square", "star"]


def _context(root: Path, mode: str = "icd") -> RunContext:
    cfg = load_config("smoke", overrides=[f"storage.root={root}", f"method.mode={mode}"])
    run_dir = root / "runs" / "unit"
    (run_dir / "predictions").mkdir(parents=True)
    return RunContext(
        cfg=cfg,
        run_id="unit",
        run_dir=run_dir,
        plan=modes.plan(cfg.method),
        task_type="classification",
        class_names=CLASSES,
        synonyms=None,
        class_groups={},
        stream_length=3,
        pool_uri=str(root / "pool"),
        ledger=str(run_dir / "teacher_calls.jsonl"),
        scope="",
        cache_dir=root / "cache",
    )


def _chunk() -> Chunk:
    image = Image.new("RGB", (8, 8))
    return Chunk(
        index=0,
        samples=[
            Sample("a", 0, "What shape?", ["circle"], image, b"a"),
            Sample("bad", 1, "What shape?", ["star"], None, b"", skip_reason="bad_image: x"),
            Sample("b", 2, "What shape?", ["square"], image, b"b"),
        ],
    )


def _results() -> tuple[Answers, Labels, Demonstrated]:
    """The student wrong on "b" (asked the teacher) and unsure of "a" (answered again with
    one demonstration, rightly)."""
    answers = Answers(
        answers=["star", "star"],
        uncertainty=np.array([0.9, 0.8]),
        prompt_tokens=[40, 41],
        errors=[None, None],
        params=1000,
        counts={"student_image_cache_misses": 2},
    )
    vote = VoteResult("square", ["square"] * 4 + ["star"], agreement=0.8, accepted=True)
    labels = Labels(
        queried_ids=["b"],
        votes={"b": vote},
        teacher_answers={},
        policy=PolicyState(seen=2, queried=1, history=[0.9, 0.8]),
        made=Made(5, 1),
        counts={"teacher_answers_used": 5, "teacher_requests_used": 1},
    )
    demos = Demonstrated(
        rows=[0],
        gated=[],
        answered=DemoAnswers([["d1"]], [["circle"]], ["circle"], [0.2], [90], [None]),
        gate=PolicyState(),
        counts={"icl_prompts": 1},
    )
    return answers, labels, demos


def test_evaluate_makes_the_rows_and_sums_of_its_inputs(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    answers, labels, demos = _results()
    sums = evaluate.evaluate(ctx=ctx, chunk=_chunk(), answers=answers, labels=labels, demos=demos)
    df = results.read_predictions(ctx.run_dir).sort("stream_pos")
    assert df["sample_id"].to_list() == ["a", "bad", "b"]
    assert df["final_source"].to_list() == ["student_icl", None, "teacher"]
    assert df["final_answer"].to_list() == ["circle", None, "square"]
    assert df["demo_ids"].to_list() == [["d1"], [], []]
    assert df["icl_answer"].to_list() == ["circle", None, None]
    assert df["icl_score"].to_list() == [1.0, None, None]
    assert df["zs_score"].to_list() == [0.0, None, 0.0]
    assert df.filter(pl.col("sample_id") == "b")["agreement"].item() == 0.8
    assert (sums.samples, sums.skipped, sums.queried, sums.accepted) == (3, 1, 1, 1)
    assert (sums.ratios.accuracy, sums.ratios.zs_accuracy, sums.ratios.forward_accuracy) == (
        1.0,
        0.0,
        0.5,
    )


def test_forwarding_takes_the_teacher_label_and_ignores_demonstrations(tmp_path: Path) -> None:
    ctx = _context(tmp_path, mode="teacher_forward")
    answers, labels, _ = _results()
    none = Demonstrated([], [], None, PolicyState())
    sums = evaluate.evaluate(ctx=ctx, chunk=_chunk(), answers=answers, labels=labels, demos=none)
    df = results.read_predictions(ctx.run_dir).sort("stream_pos")
    assert df["final_answer"].to_list() == ["star", None, "square"]
    assert sums.ratios.accuracy == 0.5


def test_advance_moves_the_state_on_by_the_chunk_results_only(tmp_path: Path) -> None:
    answers, labels, demos = _results()
    sums = ChunkSums(samples=3, skipped=1, scored=2, score_sum=2.0)
    before = ResumeState(counters={"samples_seen": 0, "icl_prompts": 4}, made=Made(10, 2))
    books = Books()
    books.book("icl", seconds=1.5, cached=False)
    after = advance(
        before,
        chunk=_chunk(),
        results=ChunkResults(answers, labels, demos, Pooled(7, 1, evicted=2), None, sums),
        books=books,
        pool=(5, 0.8),
    )
    assert before == ResumeState(counters={"samples_seen": 0, "icl_prompts": 4}, made=Made(10, 2))
    assert (after.chunk, after.next_chunk, after.samples_seen) == (0, 1, 3)
    assert after.counters == {
        "samples_seen": 3,
        "icl_prompts": 5,
        "student_image_cache_misses": 2,
        "teacher_answers_used": 5,
        "teacher_requests_used": 1,
        "pool_evicted": 2,
        "pool_excluded": 0,
    }
    assert after.policy_state == labels.policy and after.made == Made(15, 3)
    assert after.manifest == {"0": 7} and (after.pool_size, after.pool_precision) == (5, 0.8)
    assert after.running == sums and after.student_params == 1000
    assert after.lineage == chain("", _chunk().key) and after.seconds["icl"] == 1.5
    again = advance(after, chunk=replace(_chunk(), index=1), results=ChunkResults(
        answers, labels, demos, None, None, sums), books=books, pool=(5, 0.8))  # fmt: skip
    assert again.running == sums + sums and again.manifest == {"0": 7}


def test_a_committed_state_loads_back_equal(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    answers, labels, demos = _results()
    state = advance(
        ResumeState(),
        chunk=_chunk(),
        results=ChunkResults(answers, labels, demos, Pooled(3, 1), None, ChunkSums(samples=3)),
        books=Books(),
        pool=(1, None),
    )
    state.commit(ctx)
    loaded = ResumeState.load(ctx, counters=tuple(state.counters), ledger=Ledger(made=state.made))
    assert loaded == state
    assert ResumeState.committed(ctx) == [state]


def test_a_damaged_state_file_is_refused_with_what_is_wrong(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    ResumeState(chunk=0, policy_state=PolicyState(seen=4, queried=1)).commit(ctx)
    path = ctx.run_dir / "state" / "chunk-00000.json"
    path.write_text(path.read_text().replace('"queried": 1', '"queried": 9'))
    with pytest.raises(ValueError, match="invalid policy state: counts or sizes out of range"):
        ResumeState.load(ctx, counters=(), ledger=Ledger())
