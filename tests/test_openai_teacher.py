"""The ``openai`` teacher backend against a real local OpenAI-compatible server.

The server (``icd.models.serve``, with the fault injection of ``tests/openai_server.py``)
serves the tiny fixture teacher through the in-process ``hf`` backend over HTTP on
loopback and injects faults on request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from icd.bench.teacher import QUESTION, bench_samples
from icd.config import ModelConfig
from icd.data.types import Sample
from icd.method.types import Prompt
from icd.models.base import Sampling
from icd.models.openai import (
    GREEDY,
    OpenAIOptions,
    OpenAITeacher,
    RateLimiter,
    TeacherConfigError,
    parse_choice,
    parse_retry_after,
    summarize_stats,
    to_openai_messages,
    topk_entropy,
)
from icd.models.serve import to_prompt
from tests.openai_server import FaultyServer

KEY = "sk-test-7f3a9c1e5d2b8a60secret"
KEY_ENV = "ICD_TEST_TEACHER_KEY"
MODEL = "tiny-teacher"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def hf_teacher():
    from icd.models.fixtures import TEACHER, resolve_model_path
    from icd.models.hf import HFVLM

    path = resolve_model_path(f"fixtures/{TEACHER}")
    return HFVLM(str(path), max_new_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def server(hf_teacher):
    with FaultyServer(hf_teacher, model_name=MODEL, api_key=KEY, max_tokens=MAX_TOKENS) as srv:
        yield srv


@pytest.fixture
def srv(server, monkeypatch):
    """The shared server with no faults and zeroed counters; the right key in the env."""
    server.set_faults()
    server.reset_counts()
    monkeypatch.setenv(KEY_ENV, KEY)
    return server


def make_teacher(srv: FaultyServer, **kw) -> OpenAITeacher:
    args = dict(
        api_key_env=KEY_ENV,
        concurrency=4,
        timeout_s=10.0,
        max_retries=5,
        max_tokens=MAX_TOKENS,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    args.update(kw)
    return OpenAITeacher(srv.url, MODEL, OpenAIOptions(**args))


def icl_prompt(seed: int = 0) -> Prompt:
    """Two demonstrations (image, question, answer) then the query: three images."""
    _, prompts = bench_samples(3, seed=seed)
    imgs = [p.images[0] for p in prompts]
    messages = []
    for img_answer in ("red circle", "blue square"):
        messages.append(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        )
        messages.append({"role": "assistant", "content": [{"type": "text", "text": img_answer}]})
    messages.append(
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    )
    return Prompt(messages=messages, images=imgs)


def assert_counts_add_up(teacher: OpenAITeacher, anns, srv: FaultyServer) -> dict:
    s = teacher.stats()
    assert s["requests"] == srv.counts["requests"]  # every attempt reached the server once
    assert s["requests"] == s["ok"] + s["failures"]
    assert s["requests"] == sum(a.requests for a in anns)
    assert s["retries"] == sum(a.retries for a in anns)
    assert s["samples"] == srv.counts["choices"]  # every choice served was received
    # a failed sample's answers are dropped, but still counted as returned samples
    kept = sum(len(a.generations) for a in anns)
    assert s["samples"] >= kept and (s["samples"] == kept or s["errors"] > 0)
    assert s["errors"] == sum(a.error is not None for a in anns)
    assert s["annotations"] == len(anns)
    return s


# -- pure parts ---------------------------------------------------------------------------


def test_messages_interleave_images_and_round_trip_to_the_same_prompt():
    prompt = icl_prompt()
    msgs = to_openai_messages(prompt)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == "red circle"  # assistant turns are plain text
    assert [p["type"] for p in msgs[0]["content"]] == ["image_url", "text"]
    assert msgs[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    back = to_prompt(msgs)
    assert back.messages == prompt.messages
    for a, b in zip(back.images, prompt.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # PNG is lossless


def test_placeholder_count_mismatch_is_rejected():
    prompt = icl_prompt()
    with pytest.raises(ValueError, match="3 image placeholders but 2 images"):
        to_openai_messages(Prompt(prompt.messages, prompt.images[:2]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.001, 1.0), min_size=1, max_size=30),
    st.integers(1, 8),
)
def test_topk_entropy_is_a_lower_bound_exact_when_all_tokens_listed(weights, k):
    p = np.asarray(weights) / np.sum(weights)
    exact = float(-(p * np.log(p)).sum())
    top = np.sort(np.log(p))[::-1][:k]
    approx = topk_entropy(top.tolist())
    assert approx <= exact + 1e-9
    if k >= len(p):
        assert approx == pytest.approx(exact, abs=1e-9)


def test_parse_choice_reads_logprobs_or_falls_back_to_empty_stats():
    choice = {
        "message": {"content": " red circle "},
        "logprobs": {
            "content": [
                {
                    "token": "red",
                    "logprob": math.log(0.6),
                    "top_logprobs": [
                        {"token": "red", "logprob": math.log(0.6)},
                        {"token": "blue", "logprob": math.log(0.3)},
                    ],
                },
                {"token": " circle", "logprob": math.log(0.9), "top_logprobs": []},
            ]
        },
    }
    g = parse_choice(choice)
    assert g.text == "red circle"
    assert g.token_logprobs == pytest.approx([math.log(0.6), math.log(0.9)])
    assert g.first_top2 == pytest.approx((0.6, 0.3))
    assert g.token_entropy[0] > 0 and g.token_entropy[1] == 0.0
    bare = parse_choice({"message": {"content": "cat"}, "logprobs": None})
    assert bare.text == "cat" and bare.token_logprobs.size == 0 and bare.token_entropy.size == 0
    assert bare.first_top2 == (1.0, 0.0)
    with pytest.raises(ValueError):
        parse_choice({"text": "legacy"})


def test_retry_after_header_forms():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert parse_retry_after("soon") is None


def test_rate_limiter_spaces_requests_after_the_burst():
    limiter = RateLimiter(per_minute=600, burst=2)  # 10/s
    waits = [limiter.reserve() for _ in range(5)]
    assert waits[:2] == [0.0, 0.0]
    assert waits[2:] == pytest.approx([0.1, 0.2, 0.3], abs=0.02)


def test_from_config_maps_fields_and_requires_a_base_url():
    cfg = ModelConfig(
        backend="openai",
        model_id="gpt-4o",
        revision="2024-08-06",
        base_url="http://h:1/v1/",
        api_key_env="MY_KEY",
        concurrency=3,
        requests_per_minute=120,
        timeout_s=7,
        max_retries=2,
        max_new_tokens=9,
    )
    t = OpenAITeacher.from_config(cfg)
    assert (t.chat.base_url, t.model_id, t.revision, t.options.api_key_env) == (
        "http://h:1/v1",
        "gpt-4o",
        "2024-08-06",
        "MY_KEY",
    )
    o = t.options
    assert (o.concurrency, o.requests_per_minute, o.timeout_s, o.max_retries, o.max_tokens) == (
        3,
        120,
        7,
        2,
        9,
    )
    with pytest.raises(TeacherConfigError, match="base_url"):
        OpenAITeacher.from_config(ModelConfig(backend="openai", model_id="x"))


# -- against the server -------------------------------------------------------------------


def test_greedy_answers_equal_the_in_process_hf_teacher(srv, hf_teacher):
    samples, prompts = bench_samples(6)
    prompts = [*prompts, icl_prompt(1)]
    samples = [*samples, Sample("icl", 6, QUESTION, ["x"])]
    teacher = make_teacher(srv)
    anns = teacher.annotate(samples, prompts, Sampling(1, 0.7, True, 0))
    local = hf_teacher.generate(prompts, max_new_tokens=MAX_TOKENS)
    for ann, ref in zip(anns, local, strict=True):
        assert ann.error is None and len(ann.generations) == 1
        got = ann.generations[0]
        assert got.text == ref.text.strip()
        np.testing.assert_allclose(got.token_logprobs, ref.token_logprobs, atol=1e-4)
        np.testing.assert_allclose(got.first_top2, ref.first_top2, atol=1e-4)
    s = assert_counts_add_up(teacher, anns, srv)
    assert s["requests"] == len(prompts) and s["retries"] == 0


def test_n_answers_greedy_first_seeded_and_reproducible(srv, hf_teacher):
    samples, prompts = bench_samples(4)
    teacher = make_teacher(srv)
    a1 = teacher.annotate(samples, prompts, Sampling(4, 1.5, True, 3))
    a2 = teacher.annotate(samples, prompts, Sampling(4, 1.5, True, 3))
    greedy = hf_teacher.generate(prompts, max_new_tokens=MAX_TOKENS)
    for x, y, g in zip(a1, a2, greedy, strict=True):
        assert len(x.generations) == 4 and x.requests == 2  # one greedy + one with n=3
        assert x.generations[0].text == g.text.strip()
        assert [gen.text for gen in x.generations] == [gen.text for gen in y.generations]
    assert srv.counts["choices"] == 2 * 4 * len(samples)


def test_server_generation_defaults_cannot_collapse_the_votes(srv):
    # The served checkpoint ships top_k=1 (as Qwen-VL's generation_config.json does): a
    # request that left top_k to the server would get the greedy answer n times.
    srv.set_faults(default_top_k=1)
    samples, prompts = bench_samples(6)
    teacher = make_teacher(srv)
    anns = teacher.annotate(samples, prompts, Sampling(4, 1.5, True, 3))
    texts = [[g.text for g in a.generations] for a in anns]
    assert all(len(t) == 4 for t in texts)
    assert any(len(set(t)) > 1 for t in texts)  # sampled votes differ from the greedy one
    # what the server's default alone gives: every vote the greedy answer
    collapsed = make_teacher(srv, sampling_extensions=False)
    flat = collapsed.annotate(samples, prompts, Sampling(4, 1.5, True, 3))
    assert all(len({g.text for g in a.generations}) == 1 for a in flat)


def test_server_rejecting_sampling_extensions_gets_them_no_more(srv):
    srv.set_faults(reject_extensions=True)
    samples, prompts = bench_samples(3)
    teacher = make_teacher(srv, concurrency=1)
    anns = teacher.annotate(samples, prompts, Sampling(3, 1.0, False, 0))
    assert all(a.error is None and len(a.generations) == 3 for a in anns)
    assert sum(a.retries for a in anns) == 1  # one 400, then never sent again
    assert not teacher.chat._extensions
    assert_counts_add_up(teacher, anns, srv)


def test_payload_pins_every_sampling_parameter():
    local = OpenAITeacher("http://127.0.0.1:1/v1", "m").chat._payload([], 3, 0.7, 11)
    assert (local["top_p"], local["top_k"], local["repetition_penalty"]) == (1.0, -1, 1.0)
    assert (local["frequency_penalty"], local["presence_penalty"], local["seed"]) == (0, 0, 11)
    hosted = OpenAITeacher("https://api.openai.com/v1", "gpt-4o").chat._payload([], 3, 0.7, 11)
    assert hosted["top_p"] == 1.0 and "top_k" not in hosted and "repetition_penalty" not in hosted


def test_server_ignoring_n_is_topped_up_with_single_requests(srv):
    srv.set_faults(ignore_n=True)
    samples, prompts = bench_samples(4)
    teacher = make_teacher(srv, concurrency=1)
    anns = teacher.annotate(samples, prompts, Sampling(3, 1.0, False, 0))
    assert all(len(a.generations) == 3 and a.error is None for a in anns)
    # first sample: n=3 -> 1 choice, then 2 singles; later samples go straight to singles
    assert [a.requests for a in anns] == [3, 3, 3, 3]
    assert_counts_add_up(teacher, anns, srv)


def test_30pct_429_500_faults_every_sample_gets_n_votes_and_counts_add_up(srv, capsys):
    srv.set_faults(rate_429=0.15, rate_500=0.15, retry_after_s=0.02, seed=7)
    samples, prompts = bench_samples(16)
    teacher = make_teacher(srv, max_retries=8)
    anns = teacher.annotate(samples, prompts, Sampling(3, 1.0, True, 0))
    call = anns.service
    assert all(a.error is None and len(a.generations) == 3 for a in anns)
    s = assert_counts_add_up(teacher, anns, srv)
    assert summarize_stats([call]) == s  # a fresh teacher: this call is all of it
    assert len(call["latencies_ms"]) == s["ok"]
    assert s["failures"] == srv.counts["429"] + srv.counts["500"] > 0
    assert s["retries"] == s["failures"]  # every failure was retried
    assert s["ok"] == 2 * len(samples) and s["samples"] == 3 * len(samples)
    with capsys.disabled():
        print(f"\n30% faults: {dict(srv.counts)}; client {s}")


def test_exhausted_retries_mark_teacher_error_and_the_rest_continue(srv, capsys):
    srv.set_faults(rate_500=0.5, seed=1)
    samples, prompts = bench_samples(16)
    teacher = make_teacher(srv, max_retries=1)
    anns = teacher.annotate(samples, prompts, Sampling(3, 1.0, True, 0))
    failed = [a for a in anns if a.error is not None]
    assert failed and len(failed) < len(anns)
    for a in failed:
        assert a.generations == [] and re.fullmatch(r"teacher_error: 500 after 1 retries", a.error)
    for a in anns:
        if a.error is None:
            assert len(a.generations) == 3
    s = assert_counts_add_up(teacher, anns, srv)
    assert s["failures"] == srv.counts["500"]
    with capsys.disabled():
        print(
            f"\n50% 500s, 1 retry: {len(failed)}/16 teacher_error; server {dict(srv.counts)}; client {s}"
        )


def test_retry_after_is_honoured(srv):
    srv.set_faults(script=["429"], retry_after_s=0.6)
    samples, prompts = bench_samples(1)
    teacher = make_teacher(srv)  # backoff alone would wait <= 0.01 s
    (ann,) = teacher.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    assert ann.error is None and (ann.requests, ann.retries) == (2, 1)
    (t429, o1), (tok, o2) = srv.log
    assert (o1, o2) == ("429", "ok")
    assert tok - t429 >= 0.6


def test_timeout_dropped_connection_and_malformed_json_are_retried(srv):
    # The slow answer outlasts the timeout by far; the timeout leaves the real answer (a
    # model call on a machine the rest of the suite keeps busy) time to arrive.
    srv.set_faults(script=["slow", "drop", "malformed"], slow_s=5.0)
    samples, prompts = bench_samples(1)
    teacher = make_teacher(srv, timeout_s=2.0)
    (ann,) = teacher.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    assert ann.error is None and len(ann.generations) == 1
    assert (ann.requests, ann.retries) == (4, 3)
    assert [o for _, o in srv.log] == ["slow", "drop", "malformed", "ok"]
    assert_counts_add_up(teacher, [ann], srv)


def test_timeouts_until_the_limit_give_teacher_error(srv):
    srv.set_faults(rate_slow=1.0, slow_s=2.0)
    samples, prompts = bench_samples(2)
    teacher = make_teacher(srv, timeout_s=0.2, max_retries=1)
    anns = teacher.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    assert [a.error for a in anns] == ["teacher_error: timeout after 1 retries"] * 2


def test_server_rejecting_logprobs_is_retried_without_them(srv):
    srv.set_faults(reject_logprobs=True)
    samples, prompts = bench_samples(2)
    teacher = make_teacher(srv, concurrency=1)
    anns = teacher.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    assert all(a.error is None and a.generations[0].token_logprobs.size == 0 for a in anns)
    assert sorted(a.requests for a in anns) == [1, 2]  # learnt after the first rejection


def test_401_fails_fast_with_one_line_message(srv, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-123")
    samples, prompts = bench_samples(8)
    teacher = make_teacher(srv, concurrency=2)
    with pytest.raises(TeacherConfigError) as info:
        teacher.annotate(samples, prompts, Sampling(3, 1.0, True, 0))
    msg = str(info.value)
    assert msg == f"teacher at {srv.url}: 401 Unauthorized — check {KEY_ENV}"
    assert "\n" not in msg and "sk-wrong-key-123" not in msg
    assert teacher.stats()["retries"] == 0
    assert srv.counts["401"] <= 2  # aborted: at most the in-flight requests were sent


def test_unknown_model_and_unreachable_server_fail_fast(srv):
    samples, prompts = bench_samples(2)
    options = OpenAIOptions(api_key_env=KEY_ENV, backoff_base=0.01)
    wrong = OpenAITeacher(srv.url, "no-such-model", options)
    with pytest.raises(
        TeacherConfigError, match=r"404 Not Found — check base_url and model 'no-such-model'"
    ):
        wrong.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    options = OpenAIOptions(max_retries=1, backoff_base=0.01)
    gone = OpenAITeacher(f"http://127.0.0.1:{port}/v1", MODEL, options)
    with pytest.raises(TeacherConfigError, match="unreachable"):
        gone.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    no_scheme = OpenAITeacher("127.0.0.1:8000/v1", MODEL)
    with pytest.raises(TeacherConfigError, match="not a valid http"):
        no_scheme.annotate(samples, prompts, Sampling(1, 0.0, True, 0))


def test_api_key_never_appears_in_logs_repr_stats_or_errors(srv, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    srv.set_faults(rate_500=0.3, rate_429=0.2, retry_after_s=0.01, seed=3)
    samples, prompts = bench_samples(6)
    teacher = make_teacher(srv, max_retries=2)
    anns = teacher.annotate(samples, prompts, Sampling(2, 1.0, True, 0))
    seen = [
        caplog.text,
        repr(teacher),
        str(teacher.stats()),
        str(vars(teacher)),
        str(vars(teacher.chat)),
    ]
    seen += [a.error or "" for a in anns]
    srv.set_faults()
    monkeypatch.setenv(KEY_ENV, KEY + "x")  # a wrong key: the 401 message must not echo it
    with pytest.raises(TeacherConfigError) as info:
        teacher.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    seen += [str(info.value), repr(info.value), caplog.text]
    assert srv.counts["500"] > 0  # the retry paths (and their logging) ran
    for text in seen:
        assert KEY not in text


def test_annotate_works_inside_a_running_event_loop(srv):
    samples, prompts = bench_samples(2)
    teacher = make_teacher(srv)

    async def caller():
        return teacher.annotate(samples, prompts, Sampling(1, 0.0, True, 0))

    anns = asyncio.run(caller())
    assert all(a.error is None and len(a.generations) == 1 for a in anns)


def test_requests_per_minute_limit_spaces_requests(srv):
    samples, prompts = bench_samples(8)
    teacher = make_teacher(srv, requests_per_minute=240)  # 4/s, bursts of 4
    teacher.annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    times = sorted(t for t, _ in srv.log)
    assert len(times) == 8
    for j in range(4, 8):  # after the burst, one request per 0.25 s at most
        assert times[j] - times[0] >= (j - 3) * 0.25 - 0.05  # (slack: connection set-up)


def test_server_control_routes(srv):
    import httpx

    models = httpx.get(f"{srv.url}/models", headers={"Authorization": f"Bearer {KEY}"})
    assert models.json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{srv.url}/models").status_code == 401
    base = srv.url.removesuffix("/v1")
    set_to = httpx.post(f"{base}/_faults", json={"rate_500": 1.0, "seed": 2}).json()
    assert set_to["rate_500"] == 1.0 and srv.faults.rate_500 == 1.0
    samples, prompts = bench_samples(1)
    (ann,) = make_teacher(srv, max_retries=2).annotate(samples, prompts, Sampling(1, 0.0, True, 0))
    assert ann.error == "teacher_error: 500 after 2 retries"
    assert httpx.get(f"{base}/_stats").json() == {"requests": 3, "500": 3}


def test_images_in_the_wild_are_sent_as_rgb_png(srv):
    rgba = Image.new("RGBA", (40, 20), (10, 200, 30, 128))
    prompt = Prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        [rgba],
    )
    teacher = make_teacher(srv)
    (ann,) = teacher.annotate([Sample("rgba", 0, QUESTION, ["x"])], [prompt], GREEDY)
    assert ann.error is None and len(ann.generations) == 1


# -- the stream flow with `teacher.backend: openai` ---------------------------------------


@pytest.mark.slow
def test_stream_flow_end_to_end_with_the_openai_teacher(srv, tmp_path):
    import mlflow
    import polars as pl

    from icd.config import load_config
    from icd.flows.stream import stream

    srv.set_faults(rate_429=0.15, rate_500=0.15, retry_after_s=0.02, seed=5)
    cfg = load_config(
        "smoke",
        overrides=[
            f"storage.root={tmp_path}",
            "data.limit=32",
            "pipeline.chunk_size=16",
            "pipeline.cache=false",
            "method.policy.budget=0.25",
            "models.teacher.backend=openai",
            f"models.teacher.model_id={MODEL}",
            f"models.teacher.base_url={srv.url}",
            f"models.teacher.api_key_env={KEY_ENV}",
            "models.teacher.concurrency=4",
            "models.teacher.max_retries=8",
        ],
    )
    summary = stream(config_json=cfg.model_dump_json(), run_id="openai-e2e")
    print(
        f"\nflow with 30% faults: server {dict(srv.counts)}; summary queried={summary['queried']} teacher_requests={summary['teacher_requests']} teacher_calls={summary['teacher_calls']}"
    )
    assert summary["queried"] > 0 and summary["teacher_errors"] == 0
    # Every request the server saw is accounted for, and every returned answer voted.
    assert summary["teacher_requests"] == srv.counts["requests"] > srv.counts["ok"]
    assert summary["teacher_calls"] == srv.counts["choices"] == 5 * summary["queried"]
    # The service's accounting reaches the summary (and MLflow's summary metrics).
    assert summary["teacher_retries"] == srv.counts["requests"] - srv.counts["ok"]
    assert summary["teacher_latency_p95_ms"] >= summary["teacher_latency_p50_ms"] > 0
    # Token usage as the server reports it: every served answer's tokens, each request's prompt.
    assert summary["teacher_completion_tokens"] > summary["teacher_calls"] > 0
    assert (
        summary["teacher_prompt_tokens"] > summary["teacher_requests"] - summary["teacher_retries"]
    )
    df = pl.read_parquet(tmp_path / "runs" / "openai-e2e" / "predictions.parquet")
    queried = df.filter(pl.col("queried"))
    assert queried.height == summary["queried"]
    assert all(len(v) == 5 for v in queried["teacher_votes"])
    # The key is in no artifact of the run and in no MLflow param.
    client = mlflow.MlflowClient(cfg.storage.resolved_tracking_uri())
    params = client.get_run(summary["mlflow_run_id"]).data.params
    assert params and not any(KEY in v for v in params.values())
    for path in (tmp_path / "runs" / "openai-e2e").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes()


def test_teacher_bench_table():
    from icd.bench.teacher import print_teacher_bench, run_teacher_bench

    df = run_teacher_bench(samples=4, n=2, concurrency=2, latency_ms=10, max_new_tokens=MAX_TOKENS)
    assert df.height == 6 and df["concurrency"].to_list() == [1, 2] * 3
    assert df["errors"].sum() == 0 and df["requests"].to_list() == [8] * 6
    assert df.filter(df["concurrency"] == 1)["speedup"].to_list() == [1.0] * 3
    print_teacher_bench(df)
