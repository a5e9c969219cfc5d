"""The student over an OpenAI-compatible API (``models.student.backend: openai``), against
the local server (:mod:`icd.models.serve`) serving the mini-world student over real HTTP on
loopback: the same answers as the in-process model, uncertainty from the returned
log-probs, faults recovered, failures marked ``student_error``, and the whole flow."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from scipy.stats import spearmanr

from icd.data import shapes
from icd.method.prompts import build_prompt
from icd.method.uncertainty import uncertainty
from icd.models.openai import OpenAIOptions, OpenAIStudent
from tests.openai_server import FaultyServer

MODEL = "tiny-student"
TEACHER_MODEL = "tiny-teacher"
MAX_TOKENS = 6
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_student():
    from icd.models.fixtures import STUDENT, resolve_model_path
    from icd.models.hf import HFVLM

    return HFVLM(str(resolve_model_path(f"fixtures/{STUDENT}")), max_new_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def server(hf_student):
    with FaultyServer(hf_student, model_name=MODEL, max_tokens=MAX_TOKENS) as srv:
        yield srv


@pytest.fixture
def srv(server):
    server.set_faults()
    server.reset_counts()
    return server


def _prompts(n: int) -> list:
    images = [Image.open(io.BytesIO(shapes.render_shape(i, 3))).convert("RGB") for i in range(n)]
    return [build_prompt(shapes.QUESTION, im) for im in images]


def _query_id(image_ids: list) -> str | None:
    """The sample id of a request's query image (the last image; ids are SAMPLE_ID-HEX12)."""
    return image_ids[-1].rsplit("-", 1)[0] if image_ids and image_ids[-1] else None


def _student(srv: FaultyServer, **kw) -> OpenAIStudent:
    args = dict(concurrency=4, timeout_s=10.0, max_retries=6, max_tokens=MAX_TOKENS,
                backoff_base=0.01, top_logprobs=20)  # fmt: skip
    args.update(kw)
    return OpenAIStudent(srv.url, MODEL, OpenAIOptions(**args))


def test_answers_and_uncertainty_match_the_model_behind_the_api(srv, hf_student) -> None:
    prompts = _prompts(48)
    local = hf_student.generate(prompts)
    remote = _student(srv).generate(prompts)
    assert [g.text for g in remote] == [g.text for g in local]
    # nll_mean and margin are exact; entropy from the top-20 is a lower bound that ranks
    # samples as the exact one does.
    for measure in ("nll_mean", "margin"):
        np.testing.assert_allclose(
            uncertainty(remote, measure), uncertainty(local, measure), atol=1e-4
        )
    exact, top20 = uncertainty(local, "entropy_mean"), uncertainty(remote, "entropy_mean")
    assert np.all(top20 <= exact + 1e-4)
    rho = spearmanr(exact, top20).statistic
    print(f"\nentropy_mean: exact vs top-20 estimate, Spearman rho = {rho:.3f}")
    assert rho > 0.8  # measured 0.86 on the mini-world student (vocabulary 640)


def test_faults_recover_and_a_failed_request_is_a_student_error(srv) -> None:
    prompts = _prompts(16)
    srv.set_faults(rate_429=0.15, rate_500=0.15, retry_after_s=0.01, seed=2)
    gens = _student(srv).generate(prompts)
    assert all(g.error is None and g.text for g in gens)
    assert srv.counts["requests"] > srv.counts["ok"] == 16
    srv.set_faults(script=["500"] * 3)  # a first attempt and both retries fail
    student = _student(srv, max_retries=2)
    (failed,) = student.generate(prompts[:1])
    assert failed.error.startswith("student_error: 500 after 2 retries") and failed.text == ""
    (ok,) = student.generate(prompts[1:2])  # the next request is served
    assert ok.error is None and ok.text


def test_image_ids_are_sent_as_uuids_and_dropped_for_a_server_rejecting_them(srv) -> None:
    demo, query = _prompts(2)
    prompt = build_prompt(
        shapes.QUESTION, query.images[0], [(demo.images[0], shapes.QUESTION, "red star")],
        image_ids=["demo-7-abc", "query-3-def"],
    )  # fmt: skip
    student = _student(srv)
    (first,) = student.generate([prompt])
    assert srv.answered == [["demo-7-abc", "query-3-def"]]
    srv.reset_counts()
    srv.set_faults(reject_image_ids=True)
    (again,) = _student(srv).generate([prompt])  # a server that does not know the field
    assert again.error is None and again.text == first.text
    assert srv.answered == [[None, None]] and srv.counts["requests"] == 2  # one 400, no more


@pytest.fixture(scope="module")
def teacher_server():
    from icd.models.fixtures import TEACHER, resolve_model_path
    from icd.models.hf import HFVLM

    teacher = HFVLM(str(resolve_model_path(f"fixtures/{TEACHER}")), max_new_tokens=MAX_TOKENS)
    with FaultyServer(teacher, model_name=TEACHER_MODEL, max_tokens=MAX_TOKENS) as srv:
        yield srv


@pytest.mark.slow
def test_sigkill_then_resume_sends_no_request_twice_for_a_committed_chunk(
    srv, teacher_server, tmp_path
) -> None:
    """Student and teacher both over HTTP: the run is killed (SIGKILL) after some chunks
    commit; the resumed run asks neither server anything about those chunks' samples."""
    teacher_server.reset_counts()
    chunk_size, limit = 32, 128  # four chunks: killed after two, two left to resume
    sets = [
        f"storage.root={tmp_path}", f"data.limit={limit}", f"pipeline.chunk_size={chunk_size}",
        "method.policy.budget=0.15", "pipeline.cache=false",
        "models.student.backend=openai", f"models.student.model_id={MODEL}",
        f"models.student.base_url={srv.url}", "models.student.concurrency=4",
        "models.teacher.backend=openai", f"models.teacher.model_id={TEACHER_MODEL}",
        f"models.teacher.base_url={teacher_server.url}", "models.teacher.concurrency=4",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "icd.cli", "run", "--preset", "smoke", "--run-id", "victim",
           "--no-progress", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    state = tmp_path / "runs" / "victim" / "state"
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if state.exists() and len(list(state.glob("chunk-*.json"))) >= 2:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = {int(p.stem.split("-")[1]) for p in state.glob("chunk-*.json")}
    assert 1 <= len(committed) < limit // chunk_size, f"kill landed after {committed}"
    before = {name: len(s.answered) for name, s in (("student", srv), ("teacher", teacher_server))}

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    df = pl.read_parquet(tmp_path / "runs" / "victim" / "predictions.parquet")
    assert df.height == limit and df["student_error"].null_count() == limit
    done = set(df.filter((pl.col("stream_pos") // chunk_size).is_in(committed))["sample_id"])
    assert len(done) == chunk_size * len(committed)
    for name, server in (("student", srv), ("teacher", teacher_server)):
        first, second = server.answered[: before[name]], server.answered[before[name] :]
        assert all(_query_id(ids) for ids in server.answered)  # every request names its query
        asked_first = {_query_id(ids) for ids in first}
        asked_again = {_query_id(ids) for ids in second}
        assert done <= asked_first if name == "student" else asked_first & done
        assert not asked_again & done, f"{name}: asked again about committed samples"
        assert asked_again  # the resumed run did ask about the rest


@pytest.mark.slow
def test_stream_flow_end_to_end_with_the_openai_student(srv, tmp_path, monkeypatch) -> None:
    import dataclasses

    from icd.config import load_config
    from icd.flows.stream import stream

    # Retries wait as in the client's own tests (10 ms, not 0.5 s, doubling): the injected
    # faults are retried just the same, in a fraction of the wall time.
    options = OpenAIOptions.from_config
    monkeypatch.setattr(
        OpenAIOptions,
        "from_config",
        classmethod(lambda cls, cfg: dataclasses.replace(options(cfg), backoff_base=0.01)),
    )

    def run(run_id: str) -> dict:
        cfg = load_config(
            "smoke",
            overrides=[
                f"storage.root={tmp_path}", "data.limit=64", "pipeline.chunk_size=32",
                "method.policy.budget=0.15", "models.student.backend=openai",
                f"models.student.model_id={MODEL}", f"models.student.base_url={srv.url}",
                "models.student.max_retries=8", "models.student.concurrency=4",
            ],
        )  # fmt: skip
        return stream(config_json=cfg.model_dump_json(), run_id=run_id)

    srv.set_faults(rate_429=0.15, rate_500=0.15, retry_after_s=0.01, seed=7)
    summary = run("openai-student")
    df = pl.read_parquet(tmp_path / "runs" / "openai-student" / "predictions.parquet")
    assert summary["queried"] > 0 and summary["pool_size"] > 0
    assert summary["student_errors"] == 0 and df["zs_answer"].null_count() == 0
    icl = df.filter(pl.col("icl_answer").is_not_null())
    assert (
        icl.height > 0 and (icl["icl_prompt_tokens"].is_null()).all()
    )  # the API's count is not read
    assert summary["accuracy"] > summary["zs_accuracy"]
    # MLflow as with the HF student: the backend in the params, the curve, the summary.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlrun = client.get_run(summary["mlflow_run_id"])
    assert mlrun.data.params["models.student.backend"] == "openai"
    steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "headline/accuracy")]
    assert steps == [32, 64] and mlrun.data.metrics["headline/accuracy"] == pytest.approx(
        summary["accuracy"]
    )
    # A rerun of the finished run sends no student request: every chunk is committed.
    before = srv.counts["requests"]
    run("openai-student")
    assert srv.counts["requests"] == before
