"""Serve a local VLM over an OpenAI-compatible chat-completions API, with logprobs.

The inverse of the ``openai`` teacher backend (:mod:`icd.models.openai`): it lets that
backend be tried offline, against a model on this machine, over the same wire protocol
vLLM/SGLang speak. Run it with::

    icd serve fixtures/tiny-llava --name teacher --port 8000

(or ``python -m icd.models.serve ...``, the same options) and point ``models.teacher`` at it
(``backend: openai``, ``base_url: http://127.0.0.1:8000/v1``, ``model_id: teacher``). The
benches and the tests start it in-process instead (``with OpenAIServer(model) as srv:
srv.url``).

- ``POST /v1/chat/completions``: data-URL images are decoded and the chat is rebuilt as an
  :class:`icd.method.types.Prompt`; temperature 0 (or ``top_k=1``) answers greedily,
  temperature > 0 samples ``n`` answers with the request's ``seed``. ``logprobs`` /
  ``top_logprobs`` (at most 20) are the model's: each step's generated token, decoded, with
  its log-prob and the step's ``top_logprobs`` most likely tokens; the tokens spell the
  answer. ``stop`` (a string or up to 4) cuts the answer before the first stop string
  (``finish_reason: "stop"``); an answer that reaches ``max_tokens`` ends with ``"length"``.
  ``stream: true`` is answered as server-sent events (``chat.completion.chunk`` objects, a
  usage chunk with ``stream_options.include_usage``, then ``data: [DONE]``).
- Malformed requests get OpenAI-shaped JSON errors, never a plain-text 500: 400 for a body
  that is not a JSON object, invalid fields (``messages`` empty, ``n`` < 1, ``max_tokens``
  < 1, ``top_logprobs`` > 20, ...), an image that does not decode, or a prompt longer than
  the model's context (``code: context_length_exceeded``); 413 for a body over
  ``max_body_mb``; 404 for an unknown model; 500 (JSON, ``server_error``) if the model
  itself fails.
- ``GET /v1/models`` lists the served model (``id``, ``object``, ``created``,
  ``owned_by``); ``GET /health`` answers 200 once the model is loaded. With ``api_key`` set, a request without ``Authorization: Bearer
  <api_key>`` gets a 401.

Two options simulate a remote teacher (used by ``icd bench teacher``): ``latency_ms`` adds
a fixed service delay to every request (network and a busy server), and ``memoize``
answers a repeated identical request from memory, so that with ``latency_ms`` the server
behaves like a GPU server with spare capacity rather than one CPU model.

Subclasses may inject faults through two hooks, :meth:`OpenAIServer._outcome` /
:meth:`OpenAIServer._fault` (before the model runs) and :meth:`OpenAIServer._review`
(a parsed request, before it is answered); the test suite does (``tests/openai_server.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from icd.data.types import Sample
from icd.jsontypes import JSONObject
from icd.method.types import Generation, Prompt
from icd.models.base import Sampling, Student, Teacher
from icd.models.chatapi import (
    ChatCompletion,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit (and vLLM's default --max-logprobs)
MAX_N = 128  # the OpenAI API's limit
MAX_STOP = 4
DEFAULT_MAX_BODY_MB = 50.0  # the OpenAI API's limit on a request with images
ROLES = ("system", "developer", "user", "assistant", "tool")


class ServedModel(Student, Teacher, Protocol):
    """What the server needs: greedy ``generate`` and sampled ``annotate``
    (:class:`icd.models.hf.HFVLM` provides both, and the per-token alternatives that
    ``top_logprobs`` reports)."""


class RequestError(ValueError):
    """A request the server rejects: HTTP ``status``, OpenAI's ``code`` and ``param``."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str = "invalid_request_error",
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class ChatRequest:
    """The fields of a chat-completions request the server acts on."""

    prompt: Prompt
    n: int
    temperature: float
    max_tokens: int
    logprobs: bool
    top_logprobs: int
    seed: int | None
    top_k: int | None  # vLLM's sampling extension; 1 means greedy
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


@dataclass
class Answer:
    """One served answer: its text, each generated token (decoded; the tokens spell the
    answer), the token's log-prob and the step's most likely tokens with theirs."""

    text: str
    tokens: list[str]
    logprobs: list[float]
    top: list[list[tuple[str, float]]]
    finish_reason: str
    prompt_tokens: int = 0


def decode_data_url(url: str) -> Image.Image:
    """The RGB image in a ``data:image/...;base64,...`` URL (ValueError otherwise: not a
    base64 data URL, not base64, or bytes that are no complete image)."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ValueError("only base64 data URLs are supported")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64 ({e})") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a decodable image ({' '.join(str(e).split())[:120]})") from None


def to_prompt(messages: object) -> Prompt:
    """Rebuild an ICD prompt (HF chat format + images in order) from a request's
    ``messages`` as received (:class:`RequestError` naming the bad field when they are
    malformed)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array", param="messages")
    out: list[dict[str, object]] = []
    images: list[Image.Image] = []
    ids: list[str | None] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(
                f"{where} must be an object with a role ({', '.join(ROLES)})", param=where
            )
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RequestError(
                f"{where}.content must be a string or an array of parts", param=where
            )
        parts: list[dict[str, str]] = []
        for j, p in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text", ""), str):
                parts.append({"type": "text", "text": p.get("text", "")})
            elif kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else None
                try:
                    images.append(decode_data_url(url))  # type: ignore[arg-type]
                except ValueError as e:
                    raise RequestError(
                        f"{at}.image_url: {e}", param=f"{at}.image_url", code="invalid_image"
                    ) from None
                ids.append(p.get("uuid"))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"{at}: unsupported content part {kind!r}", param=at)
        out.append({"role": m["role"], "content": parts})
    return Prompt(messages=out, images=images, image_ids=ids if any(ids) else [])


def _int(
    body: Mapping[str, object], name: str, default: int, low: int, high: int | None = None
) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", param=name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise RequestError(f"'{name}' must be {bound}, got {value}", param=name)
    return value


def parse_request(body: object, default_max_tokens: int) -> ChatRequest:
    """The :class:`ChatRequest` of a JSON body; :class:`RequestError` (a ``ValueError``)
    naming the field when it is malformed."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(body).__name__}")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise RequestError("'temperature' must be a number", param="temperature")
    if not 0 <= temperature <= 2:
        raise RequestError(
            f"'temperature' must be between 0 and 2, got {temperature}", param="temperature"
        )
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be a boolean", param="logprobs")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(x, str) and x for x in stops)
    ):
        raise RequestError(
            f"'stop' must be a non-empty string or an array of at most {MAX_STOP}", param="stop"
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise RequestError("'top_k' must be an integer", param="top_k")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", param="seed")
    max_tokens = _int(body, "max_tokens", 0, 1)
    max_tokens = max_tokens or _int(body, "max_completion_tokens", default_max_tokens, 1)
    return ChatRequest(
        prompt=to_prompt(body.get("messages")),
        n=_int(body, "n", 1, 1, MAX_N),
        temperature=float(temperature),
        max_tokens=max_tokens,
        logprobs=logprobs,
        top_logprobs=_int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS),
        seed=seed,
        top_k=top_k,
        stop=list(stops),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def cut_at_stop(pieces: Sequence[str], stops: Sequence[str]) -> tuple[int, str] | None:
    """Where the first stop string starts in the text ``pieces`` spell: the number of
    pieces wholly before it and the text before it; None when no stop string occurs."""
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not hits:
        return None
    at = min(hits)
    kept, length = 0, 0
    for piece in pieces:
        if length + len(piece) > at:
            break
        length += len(piece)
        kept += 1
    return kept, text[:at]


def answer_from_generation(gen: Generation, max_tokens: int) -> Answer:
    """An :class:`Answer` from a model's :class:`Generation` (a model that reports no
    tokens: the answer is one piece, the steps carry only the chosen token's log-prob)."""
    lps = [float(x) for x in gen.token_logprobs.tolist()]
    tokens = [gen.text if t == 0 else "" for t in range(len(lps))]
    return Answer(
        text=gen.text,
        tokens=tokens,
        logprobs=lps,
        top=[[(tok, lp)] for tok, lp in zip(tokens, lps, strict=True)],
        finish_reason="length" if len(lps) >= max_tokens else "stop",
        prompt_tokens=gen.prompt_tokens,
    )


def _logprob_entry(token: str, logprob: float) -> TopLogprob:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def openai_logprobs(answer: Answer, top_k: int) -> ChoiceLogprobs:
    """OpenAI ``logprobs`` of one answer: per generated token its text, log-prob, bytes
    and the ``top_k`` most likely tokens of that step (at most as many as the model
    reports)."""
    content = [
        TokenLogprob(
            **_logprob_entry(tok, lp),
            top_logprobs=[_logprob_entry(t, x) for t, x in top[:top_k]],
        )
        for tok, lp, top in zip(answer.tokens, answer.logprobs, answer.top, strict=True)
    ]
    return {"content": content, "refusal": None}


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -1e4


def error_response(
    status: int,
    message: str,
    code: str,
    headers: dict[str, str] | None = None,
    *,
    param: str | None = None,
    type_: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's format (``{"error": {"message", "type", "param", "code"}}``)."""
    if type_ is None:
        type_ = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


class ContextLengthError(RequestError):
    """The prompt plus ``max_tokens`` do not fit the model's context."""


def hf_answers(
    model: Any,
    prompt: Prompt,
    n: int,
    temperature: float,
    seed: int,
    max_tokens: int,
    top_k: int,
    stops: Sequence[str] = (),
) -> list[Answer]:
    """``n`` answers of an :class:`icd.models.hf.HFVLM` with each step's ``top_k`` most
    likely tokens, decoded: greedy at temperature 0 (``n`` copies), else sampled as
    :meth:`HFVLM.annotate` samples (the same seeds: the same answers). The prompt plus
    ``max_tokens`` must fit the model's context (:class:`ContextLengthError`)."""
    import torch

    from icd.models.hf import _draw_seed, _RowSampler

    sampler = None
    copies = 1
    if temperature > 0:
        seeds = [_draw_seed(seed, "request", k) for k in range(n)]
        sampler, copies = _RowSampler(temperature, seeds), n
    with model._lock, torch.inference_mode():
        inputs = model._encode([prompt])
        prompt_len = int(inputs["input_ids"].shape[1])
        _check_context(model, prompt_len, max_tokens)
        out = model.model.generate(**inputs, **model._generate_kwargs(max_tokens, sampler, copies))
        answer_ids = out.sequences[:, prompt_len:]
        if len(out.logits) == 0:
            return [Answer("", [], [], [], "stop", prompt_len)] * n
        logp = torch.log_softmax(torch.stack(list(out.logits), dim=1).float(), dim=-1)
        k = max(1, min(top_k, logp.shape[-1]))
        top_lp, top_ids = logp.topk(k, dim=-1)
        ends = torch.tensor([*model.eos_ids, model.pad_id], device=answer_ids.device)
        rows = _Steps(model.tokenizer, logp, top_lp, top_ids, ends)
        answers = [
            rows.answer(row, answer_ids[row, : logp.shape[1]].tolist(), max_tokens, stops)
            for row in range(answer_ids.shape[0])
        ]
        for a in answers:
            a.prompt_tokens = prompt_len  # one prompt for every row
    return answers * n if copies == 1 else answers


def _check_context(model: Any, prompt_len: int, max_tokens: int) -> None:
    """:class:`ContextLengthError` when the prompt plus ``max_tokens`` exceed the model's
    context."""
    context = context_length(model)
    if context is not None and prompt_len + max_tokens > context:
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages "
            "or completion.",
            param="messages",
            code="context_length_exceeded",
        )


@dataclass
class _Steps:
    """A generation's per-step log-probs (rows × steps × vocabulary) and top-k, read into
    one :class:`Answer` per row."""

    tok: Any  # the tokenizer
    logp: Any  # torch tensors
    top_lp: Any
    top_ids: Any
    ends: Any  # ids that end an answer (eos, pad)

    def answer(self, row: int, ids: list[int], max_tokens: int, stops: Sequence[str]) -> Answer:
        """Row ``row``'s answer (``ids``: its generated token ids), cut at its end token
        or the first stop string."""
        import torch

        tok = self.tok
        stop_at = next((t for t, i in enumerate(ids) if i in self.ends), None)
        length = len(ids) if stop_at is None else stop_at
        finish = "length" if stop_at is None and length >= max_tokens else "stop"
        pieces, prev = [], ""
        for t in range(length):  # incremental decoding: the pieces spell the text
            text = tok.decode(ids[: t + 1], skip_special_tokens=True)
            pieces.append(text[len(prev) :] if text.startswith(prev) else text)
            prev = text
        index = torch.tensor(ids[:length], dtype=torch.long)
        lps = self.logp[row, torch.arange(length), index].tolist()
        tops = [
            [
                (tok.decode([int(i)], skip_special_tokens=False), float(x))
                for i, x in zip(
                    self.top_ids[row, t].tolist(), self.top_lp[row, t].tolist(), strict=True
                )
            ]
            for t in range(length)
        ]
        text = "".join(pieces)
        cut = cut_at_stop(pieces, stops) if stops else None
        if cut is not None:
            kept, text = cut
            pieces, lps, tops, finish = pieces[:kept], lps[:kept], tops[:kept], "stop"
        return Answer(text.strip(), pieces, lps, tops, finish)


def context_length(model: Any) -> int | None:
    """The model's context length in tokens (None when its config does not say)."""
    config = getattr(getattr(model, "model", None), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


class OpenAIServer:
    """The server; ``with OpenAIServer(model) as srv: srv.url`` serves on a free loopback
    port in a background thread, :meth:`run` in the foreground.

    ``counts`` tallies requests, outcomes (``ok``, ``401``, ...) and ``choices`` served;
    ``log`` holds ``(monotonic time, outcome)`` per request; ``answered`` the image ids
    (``uuid`` parts, None where absent) of each request answered, in order.
    """

    def __init__(
        self,
        model: ServedModel | None,
        model_name: str = "tiny-teacher",
        api_key: str | None = None,
        max_tokens: int = 16,
        *,
        latency_ms: float = 0.0,
        memoize: bool = False,
        max_body_mb: float = DEFAULT_MAX_BODY_MB,
    ):
        self.model = model
        self.max_body_bytes = int(max_body_mb * 2**20)
        self.created = int(time.time())
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.latency_ms = latency_ms
        self.memoize = memoize
        # One dedicated thread runs every model call: calls are serialised, and torch's
        # CPU thread pool is not re-created (and left spinning) by ever-new callers.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="openai-server-model")
        self.counts: Counter[str] = Counter()
        self._memo: dict[str, list[Answer]] = {}  # request body hash -> answers
        self.log: list[tuple[float, str]] = []
        self.answered: list[list[str | None]] = []
        self.app = Starlette(routes=self._routes())
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL a client uses (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def reset_counts(self) -> None:
        """Zero ``counts`` and clear ``log`` and ``answered``."""
        self.counts.clear()
        self.log.clear()
        self.answered.clear()

    def _config(self, host: str, port: int) -> uvicorn.Config:
        return uvicorn.Config(
            self.app,
            host=host,
            port=port,
            http=self._http_protocol(),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )

    def _http_protocol(self) -> Any:
        """uvicorn's HTTP protocol (a class or a name); a subclass may wrap it."""
        return "h11"

    def run(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        """Serve in the foreground until interrupted."""
        uvicorn.Server(self._config(host, port)).run()

    def start(self) -> OpenAIServer:
        """Serve on a free loopback port in a background thread; returns once listening."""
        self._server = uvicorn.Server(self._config("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="openai-server")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("local OpenAI-compatible server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop serving (the object can be started again)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="openai-server-model")

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- hooks (fault injection in subclasses) ------------------------------------------

    def _routes(self) -> list[Route]:
        """The served routes (a subclass may add its own)."""
        return [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
        ]

    def _outcome(self) -> str:
        """What this request gets, decided on arrival: ``"ok"`` (answered) here."""
        return "ok"

    async def _fault(self, outcome: str, request: Request) -> Response:
        """The response of a request whose outcome is not ``"ok"``."""
        raise NotImplementedError(f"outcome {outcome!r}")

    def _review(self, body: JSONObject, req: ChatRequest) -> ChatRequest | Response:
        """A parsed request (``body``: as received), or the error response it gets instead
        (none here)."""
        return req

    # -- routes -----------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def _models(self, request: Request) -> Response:
        if not self._authorized(request):
            return error_response(401, "Incorrect API key provided.", "invalid_api_key")
        model = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "icd",
        }
        return JSONResponse({"object": "list", "data": [model]})

    def _authorized(self, request: Request) -> bool:
        return (
            self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}"
        )

    async def _chat(self, request: Request) -> Response:
        self.counts["requests"] += 1
        if not self._authorized(request):
            self.counts["401"] += 1
            self.log.append((time.monotonic(), "401"))
            return error_response(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            raw = await self._read_body(request)
        except ClientDisconnect:
            self.counts["client_gone"] += 1
            return Response(status_code=499)
        except RequestError as e:
            self.counts[str(e.status)] += 1
            self.log.append((time.monotonic(), str(e.status)))
            return error_response(e.status, e.message, e.code, param=e.param)
        outcome = self._outcome()
        self.counts[outcome] += 1
        self.log.append((time.monotonic(), outcome))
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        if outcome != "ok":
            return await self._fault(outcome, request)
        return await self._complete(raw)

    async def _read_body(self, request: Request) -> bytes:
        """The request body; :class:`RequestError` (413) past ``max_body_bytes``, read no
        further."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = RequestError(
            f"Request body too large: the limit is {limit} bytes ({limit / 2**20:g} MiB)",
            code="request_too_large",
            status=413,
        )
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                raise too_big
            return await request.body()  # kept by the request: later reads get it too
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked: stop reading at the limit
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # what request.body() returns from now on
        return body

    async def _complete(self, raw: bytes) -> Response:
        try:
            return await self._answer(raw)
        except RequestError as e:
            return error_response(e.status, e.message, e.code, param=e.param)
        except Exception as e:  # the model failed: still an OpenAI-shaped JSON error
            log.exception("chat completion failed")
            message = f"The server had an error while processing your request ({type(e).__name__})."
            return error_response(500, message, "server_error")

    async def _answer(self, raw: bytes) -> Response:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None
        if isinstance(body, dict) and body.get("model") != self.model_name:
            return error_response(
                404, f"The model `{body.get('model')}` does not exist.", "model_not_found",
                param="model",
            )  # fmt: skip
        req = parse_request(body, self.max_tokens)
        reviewed = self._review(body, req)
        if isinstance(reviewed, Response):
            return reviewed
        req = reviewed
        if req.top_k == 1:  # top-k of one: whatever the temperature, the greedy answer
            req.temperature = 0.0
        seed = req.seed if req.seed is not None else random.getrandbits(31)
        key = hashlib.sha256(raw).hexdigest()
        answers = self._memo.get(key) if self.memoize else None
        if answers is None:
            answers = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, self._generate, req, seed
            )
            if self.memoize:
                self._memo[key] = answers
        self.counts["choices"] += len(answers)
        self.answered.append(req.prompt.image_ids or [None] * len(req.prompt.images))
        completion = self._completion(req, answers)
        if req.stream:
            return StreamingResponse(
                self._events(req, answers, completion),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return JSONResponse(completion)

    def _completion(self, req: ChatRequest, answers: list[Answer]) -> ChatCompletion:
        choices: list[Choice] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": a.text, "refusal": None},
                "finish_reason": a.finish_reason,
                "logprobs": openai_logprobs(a, req.top_logprobs) if req.logprobs else None,
            }
            for i, a in enumerate(answers)
        ]
        completion_tokens = sum(len(a.tokens) for a in answers)
        prompt_tokens = max((a.prompt_tokens for a in answers), default=0)  # one prompt
        return {
            "id": f"chatcmpl-{self.counts['requests']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _events(
        self, req: ChatRequest, answers: list[Answer], completion: ChatCompletion
    ) -> AsyncIterator[str]:
        """The completion as server-sent events: per choice a role chunk, one chunk per
        token (its text, and its log-probs when asked), a chunk with the finish reason;
        then the usage (``stream_options.include_usage``) and ``[DONE]``."""
        head: dict[str, str | int] = {
            "id": completion["id"],
            "created": completion["created"],
            "model": completion["model"],
            "object": "chat.completion.chunk",
        }

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            extra = {} if usage is None else {"usage": usage}
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        for i, a in enumerate(answers):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])  # fmt: skip
            steps = openai_logprobs(a, req.top_logprobs)["content"] if req.logprobs else None
            for t, piece in enumerate(stream_pieces(a)):
                logprobs: ChoiceLogprobs | None = (
                    {"content": [steps[t]], "refusal": None} if steps else None
                )
                yield chunk([{"index": i, "delta": {"content": piece},
                              "logprobs": logprobs, "finish_reason": None}])  # fmt: skip
            yield chunk(
                [{"index": i, "delta": {}, "logprobs": None, "finish_reason": a.finish_reason}]
            )
        if req.include_usage:
            yield chunk([], usage=completion["usage"])
        yield "data: [DONE]\n\n"

    def _generate(self, req: ChatRequest, seed: int) -> list[Answer]:
        """Runs on the model thread."""
        if self.model is None:
            raise RuntimeError("this server has no model to answer with")
        if hasattr(self.model, "_encode") and hasattr(self.model, "tokenizer"):  # HFVLM
            top = max(req.top_logprobs, 2)  # the first step's two best: the student's margin
            return hf_answers(
                self.model, req.prompt, req.n, req.temperature, seed, req.max_tokens, top,
                req.stop,
            )  # fmt: skip
        gens = self._generations(req.prompt, req.n, req.temperature, seed, req.max_tokens)
        return [answer_from_generation(g, req.max_tokens) for g in gens]

    def _generations(
        self, prompt: Prompt, n: int, temperature: float, seed: int, max_tokens: int
    ) -> list[Generation]:
        """A model without token access (any :class:`ServedModel`): its generations."""
        assert self.model is not None
        if temperature <= 0:
            return self.model.generate([prompt], max_new_tokens=max_tokens) * n
        old = getattr(self.model, "max_new_tokens", None)
        if old is not None:
            self.model.max_new_tokens = max_tokens  # type: ignore[attr-defined]
        try:
            sample = Sample(sample_id="request", stream_pos=0, question="", answers=[])
            sampling = Sampling(n, temperature, include_greedy=False, seed=seed)
            ann = self.model.annotate([sample], [prompt], sampling)[0]
        finally:
            if old is not None:
                self.model.max_new_tokens = old  # type: ignore[attr-defined]
        return list(ann.generations)


def stream_pieces(answer: Answer) -> list[str]:
    """The answer's tokens as streamed content: they join to ``answer.text`` (the
    whitespace the text was stripped of is left out)."""
    pieces = list(answer.tokens)
    if "".join(pieces).strip() != answer.text or not pieces:
        return [answer.text] if answer.text else []
    lead = len("".join(pieces)) - len("".join(pieces).lstrip())
    out = []
    for p in pieces:
        cut = min(lead, len(p))
        out.append(p[cut:])
        lead -= cut
    trail = len("".join(out)) - len("".join(out).rstrip())
    for i in range(len(out) - 1, -1, -1):
        cut = min(trail, len(out[i]))
        out[i] = out[i][: len(out[i]) - cut]
        trail -= cut
    return out


def serve(
    model: str,
    *,
    name: str | None = None,
    revision: str = "main",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_tokens: int = 16,
    latency_ms: float = 0.0,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    device: str = "cpu",
) -> None:
    """Load ``model`` (an HF model id or folder; ``fixtures/<name>`` for the mini-world)
    and serve it until interrupted (``icd serve``, ``python -m icd.models.serve``)."""
    from icd.models.fixtures import resolve_model_path
    from icd.models.hf import HFVLM, HFLoad

    path = resolve_model_path(model)  # None: a hub id, loaded as given
    load = HFLoad(revision=revision, device=device)
    vlm = HFVLM(str(path or model), load=load, max_new_tokens=max_tokens)
    server = OpenAIServer(
        vlm,
        model_name=name or model,
        api_key=api_key,
        max_tokens=max_tokens,
        latency_ms=latency_ms,
        max_body_mb=max_body_mb,
    )
    print(f"serving {model!r} as {server.model_name!r} at http://{host}:{port}/v1", flush=True)
    server.run(host, port)


def main(argv: list[str] | None = None) -> None:
    """``python -m icd.models.serve MODEL``: serve a local HF VLM until interrupted."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF model id or folder (fixtures/<name> for the mini-world)")
    ap.add_argument("--name", default=None, help="served model name (default: MODEL)")
    ap.add_argument("--revision", default="main", help="model revision (hub models)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on")
    ap.add_argument("--api-key", default=None, help="require this Bearer token")
    ap.add_argument("--max-tokens", type=int, default=16, help="default max_tokens")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    ap.add_argument(
        "--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
        help="larger request bodies get a 413",
    )  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    args = ap.parse_args(argv)
    serve(
        args.model, name=args.name, revision=args.revision, host=args.host, port=args.port,
        api_key=args.api_key, max_tokens=args.max_tokens, latency_ms=args.latency_ms,
        max_body_mb=args.max_body_mb, device=args.device,
    )  # fmt: skip


if __name__ == "__main__":
    main()
