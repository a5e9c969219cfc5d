"""ICD's own OpenAI-compatible server (:mod:`icd.models.serve`, ``icd serve``) driven by the
official ``openai`` SDK over real HTTP on loopback, its responses validated with the SDK's
own pydantic models: ``n``, real ``logprobs`` / ``top_logprobs``, images, ``stop``,
``stream``, ``/v1/models``, and an OpenAI-shaped JSON error (never a plain-text 500) for
every malformed request."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import openai
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image

from icd.data import shapes
from icd.method.prompts import build_prompt
from icd.models.openai import to_openai_messages
from icd.models.serve import OpenAIServer
from tests.loopback import REPO, free_port, start, stop, wait_healthy

MODEL = "tiny-teacher"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def hf_teacher():
    from icd.models.fixtures import TEACHER, resolve_model_path
    from icd.models.hf import HFVLM

    return HFVLM(str(resolve_model_path(f"fixtures/{TEACHER}")), max_new_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def server(hf_teacher):
    with OpenAIServer(hf_teacher, model_name=MODEL, max_tokens=MAX_TOKENS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def image(i: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(shapes.render_shape(i, 3))).convert("RGB")


def messages(i: int = 0) -> list[dict]:
    return to_openai_messages(build_prompt(shapes.QUESTION, image(i)))


def raw_create(client: openai.OpenAI, **kw) -> dict:
    """The response body as sent (the SDK's parsed objects skip validation)."""
    resp = client.chat.completions.with_raw_response.create(model=MODEL, **kw)
    return json.loads(resp.http_response.text)


def test_n_logprobs_and_images_validate_against_the_sdk_models(client, hf_teacher) -> None:
    body = raw_create(
        client, messages=messages(1), n=3, temperature=1.0, seed=7, logprobs=True,
        top_logprobs=5, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    done = ChatCompletion.model_validate(body, strict=False)
    assert len(done.choices) == 3 and [c.index for c in done.choices] == [0, 1, 2]
    for raw, c in zip(body["choices"], done.choices, strict=True):
        assert "refusal" in raw["message"] and c.message.refusal is None  # required field
        assert c.finish_reason in ("stop", "length") and c.logprobs is not None
        steps = c.logprobs.content
        assert steps, "an answer with logprobs lists its tokens"
        # the decoded tokens spell the answer, each with as many alternatives as asked
        assert "".join(s.token for s in steps).strip() == c.message.content
        for s in steps:
            assert len(s.top_logprobs) == 5
            assert s.bytes == list(s.token.encode())
            lps = [t.logprob for t in s.top_logprobs]
            assert lps == sorted(lps, reverse=True) and lps[0] <= 0
            assert s.logprob <= lps[0] + 1e-6
            assert not any(t.token.startswith(("t0", "top1")) for t in s.top_logprobs)
    # greedy: the generated token is each step's most likely one, as the model says
    greedy = ChatCompletion.model_validate(
        raw_create(client, messages=messages(1), temperature=0, logprobs=True, top_logprobs=20)
    )
    (g,) = greedy.choices
    ref = hf_teacher.generate([build_prompt(shapes.QUESTION, image(1))])[0]
    assert g.message.content == ref.text
    assert g.logprobs is not None
    for s, lp in zip(g.logprobs.content, ref.token_logprobs.tolist(), strict=True):
        assert len(s.top_logprobs) == 20
        assert s.top_logprobs[0].token == s.token
        assert s.logprob == pytest.approx(lp, abs=1e-4)
    assert greedy.usage is not None and greedy.usage.prompt_tokens > 0


def test_stream_is_served_as_sse_chunks_the_sdk_parses(client) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=messages(2), temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages(2), temperature=0, stream=True, logprobs=True,
        top_logprobs=3, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks, "stream=True yielded no chunk"
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
        assert ch.object == "chat.completion.chunk"
    text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    tokens = [s for ch in chunks for c in ch.choices if c.logprobs for s in c.logprobs.content]
    assert tokens and all(len(s.top_logprobs) == 3 for s in tokens)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_stop_is_honoured(client) -> None:
    full = client.chat.completions.create(model=MODEL, messages=messages(3), temperature=0)
    text = full.choices[0].message.content
    assert text and " " in text, text
    word = text.split()[-1]
    cut = client.chat.completions.create(
        model=MODEL, messages=messages(3), temperature=0, stop=[word], logprobs=True
    )
    (c,) = cut.choices
    assert c.message.content == text[: text.index(word)].strip()
    assert c.finish_reason == "stop"
    assert c.logprobs is not None and word not in "".join(s.token for s in c.logprobs.content)


def test_models_list_is_complete(client) -> None:
    resp = client.models.with_raw_response.list()
    (entry,) = json.loads(resp.http_response.text)["data"]
    m = Model.model_validate(entry, strict=True)
    assert m.id == MODEL and m.object == "model" and m.owned_by and m.created > 0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_message(data: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": shapes.QUESTION}]}]  # fmt: skip


BAD_REQUESTS = {
    "non-image base64": dict(messages=_image_message(b"this is not an image at all")),
    "truncated PNG": dict(messages=_image_message(_png(image())[:60])),
    "max_tokens -5": dict(max_tokens=-5),
    "messages []": dict(messages=[]),
    "n 0": dict(n=0),
    "n -1": dict(n=-1),
    "top_logprobs 25": dict(logprobs=True, top_logprobs=25),
    "context length": dict(messages=[{"role": "user", "content": "red blue " * 3100}]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_requests_get_openai_shaped_400s(client, server, case) -> None:
    kw = {"messages": messages(), "max_tokens": MAX_TOKENS, **BAD_REQUESTS[case]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, **kw)
    assert e.value.status_code == 400
    body = e.value.body
    assert isinstance(body, dict) and body["message"] and body["type"] == "invalid_request_error"
    if case == "context length":
        assert body["code"] == "context_length_exceeded"
        assert "maximum context length is 2048 tokens" in body["message"]
    if case.startswith(("n ", "max_tokens", "top_logprobs")):
        assert body["param"] == case.split()[0]


def test_a_json_array_or_broken_json_body_is_a_400_not_a_plain_500(server) -> None:
    for raw in (b'[{"model": "tiny-teacher"}]', b'{"model": "tiny-teacher", "mess', b"\xff"):
        r = httpx.post(
            f"{server.url}/chat/completions", content=raw,
            headers={"content-type": "application/json"},
        )  # fmt: skip
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_an_oversize_body_is_a_413(hf_teacher) -> None:
    with OpenAIServer(hf_teacher, model_name=MODEL, max_body_mb=1) as srv:
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1_200_000}]}
        r = httpx.post(f"{srv.url}/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the server stops reading at the limit
            yield b'{"model": "tiny-teacher", "messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"x" * 65536
            yield b'"}]}'

        r = httpx.post(f"{srv.url}/chat/completions", content=chunks())
        assert r.status_code == 413
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=MODEL, messages=big["messages"])
        assert e.value.status_code == 413


def test_icd_serve_command_serves_the_sdk(tmp_path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start(
        [sys.executable, "-m", "icd.cli", "serve", "fixtures/tiny-llava", "--name", MODEL,
         "--port", str(port), "--api-key", "sk-local", "--max-tokens", str(MAX_TOKENS)],
        {**__import__("os").environ, "PYTHONPATH": str(REPO)}, log,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-local")
        assert [m.id for m in client.models.list()] == [MODEL]
        out = client.chat.completions.create(model=MODEL, messages=messages(), temperature=0)
        assert out.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="sk-wrong").models.list()
    finally:
        stop(proc)


def test_icd_serve_help_documents_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "icd.cli", "serve", "--help"], capture_output=True, text=True,
        cwd=REPO, env={**__import__("os").environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for option in ("--name", "--port", "--host", "--api-key", "--max-tokens", "--max-body-mb"):
        line = next(ln for ln in out.stdout.splitlines() if option in ln)
        assert len(line.split(option, 1)[1].strip()) > 10, line  # the option has help text
