"""A local OpenAI-compatible chat-completions server that can misbehave on purpose.

Serves one VLM (anything with the ``generate`` / ``annotate`` methods of
:class:`icd.models.hf.HFVLM`) over real HTTP on loopback (uvicorn + Starlette, in a
background thread), so the ``openai`` teacher backend is tested and benchmarked against
the same wire protocol vLLM/SGLang speak:

- ``POST /v1/chat/completions``: data-URL images are decoded and the chat is rebuilt as
  an :class:`icd.method.types.Prompt`; temperature 0 answers greedily, temperature > 0
  samples ``n`` answers with the request's ``seed``; ``logprobs`` / ``top_logprobs`` are
  returned in OpenAI's format.
- ``GET /v1/models``; ``POST /_faults`` (set :class:`Faults` fields); ``GET /_stats``.

Faults are drawn per request from a seeded RNG (reproducible sequence): 429 with
``Retry-After``, 500, a response slower than the client's timeout, a connection closed
without any response, a 200 with a truncated JSON body; a ``script`` forces the outcomes
of the next requests in order. ``latency_ms`` adds a fixed service delay to every request
(simulating network and a busy server); ``memoize`` answers a repeated identical request
from memory, so that with ``latency_ms`` the server behaves like a remote teacher with
spare capacity (a GPU server batching concurrent requests) rather than one CPU model.
A wrong or missing API key gets a 401.

Generation defaults, as vLLM applies them: a request that omits ``top_k`` gets the served
checkpoint's (``Faults.default_top_k``; Qwen-VL checkpoints ship ``top_k=1``, so every
"sampled" answer is the greedy one); ``top_k=-1`` (or 0) samples from the full distribution.
``reject_extensions`` answers a request carrying ``top_k`` or ``repetition_penalty`` with a
400, as the hosted OpenAI API does.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from icd.data.types import Sample
from icd.method.types import Generation, Prompt

OUTCOMES = ("ok", "429", "500", "slow", "drop", "malformed")


class ServedModel(Protocol):
    """What the server needs from a model (``icd.models.hf.HFVLM`` provides it)."""

    def generate(
        self, prompts: list[Prompt], max_new_tokens: int | None = None
    ) -> list[Generation]: ...

    def annotate(
        self,
        samples: list[Sample],
        prompts: list[Prompt],
        n: int,
        temperature: float,
        include_greedy: bool,
        seed: int,
    ) -> list[Any]: ...


@dataclass
class Faults:
    """Per-request faults (drawn in arrival order from ``random.Random(seed)``) and service
    behaviour (added latency, ignored ``n``, memoised answers)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_slow: float = 0.0
    rate_drop: float = 0.0
    rate_malformed: float = 0.0
    retry_after_s: float = 1.0  # sent with every 429
    slow_s: float = 5.0  # how long a "slow" response takes
    latency_ms: float = 0.0  # added to every request
    ignore_n: bool = False  # answer one choice whatever ``n`` asks for
    reject_logprobs: bool = False  # 400 on requests asking for logprobs
    memoize: bool = False  # a repeated identical request is answered without the model
    default_top_k: int | None = None  # the checkpoint's top_k, for requests that omit it
    reject_extensions: bool = False  # 400 on top_k / repetition_penalty (the hosted API)
    seed: int = 0
    script: list[str] = field(default_factory=list)  # outcomes of the next requests


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, registering each connection's transport by client address so
    the app can drop a connection without sending any response."""

    transports: dict[tuple[str, int], asyncio.Transport]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client is not None:
            self.transports[self.client] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.transports.pop(self.client, None)
        super().connection_lost(exc)


def decode_data_url(url: str) -> Image.Image:
    """The RGB image in a ``data:image/...;base64,...`` URL (ValueError otherwise)."""
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("only base64 data URLs are supported")
    raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img.convert("RGB")


def to_prompt(messages: list[dict[str, Any]]) -> Prompt:
    """Rebuild an ICD prompt (HF chat format + images in order) from OpenAI messages."""
    out: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise ValueError("message content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for p in content:
            if p.get("type") == "text":
                parts.append({"type": "text", "text": p.get("text", "")})
            elif p.get("type") == "image_url":
                images.append(decode_data_url(p["image_url"]["url"]))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported content part {p.get('type')!r}")
        out.append({"role": m["role"], "content": parts})
    return Prompt(messages=out, images=images)


def _logprobs(gen: Generation, top_k: int) -> dict[str, Any]:
    """OpenAI ``logprobs`` for one answer, from the model's token statistics.

    Each step lists the chosen token's log-prob; ``top_logprobs`` holds what the model
    reports of the step's distribution: the first step's two most likely tokens, the
    chosen token for the other steps (a server with full logits would list the top k).
    """
    content = []
    for t, lp in enumerate(gen.token_logprobs.tolist()):
        top = [{"token": f"t{t}", "logprob": lp, "bytes": None}]
        if t == 0 and top_k >= 2:
            p1, p2 = gen.first_top2
            top = [
                {"token": "top1", "logprob": _log(p1), "bytes": None},
                {"token": "top2", "logprob": _log(p2), "bytes": None},
            ]
        content.append(
            {"token": f"t{t}", "logprob": lp, "bytes": None, "top_logprobs": top[:top_k]}
        )
    return {"content": content}


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -1e4


class OpenAIServer:
    """The server; ``with OpenAIServer(model) as srv: srv.url`` serves on a free port."""

    def __init__(
        self,
        model: ServedModel,
        model_name: str = "tiny-teacher",
        api_key: str | None = None,
        faults: Faults | None = None,
        max_tokens: int = 16,
    ):
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        # One dedicated thread runs every model call: calls are serialised, and torch's
        # CPU thread pool is not re-created (and left spinning) by ever-new callers.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="openai-server-model")
        self.counts: Counter[str] = Counter()
        self._memo: dict[str, list[Generation]] = {}  # request body hash -> answers
        self.log: list[tuple[float, str]] = []  # (monotonic time, outcome) per request
        self.transports: dict[tuple[str, int], asyncio.Transport] = {}
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/_faults", self._set_faults_route, methods=["POST"]),
                Route("/_stats", self._stats_route, methods=["GET"]),
            ]
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def set_faults(self, **fields: Any) -> Faults:
        """Replace the fault settings (unnamed fields reset to defaults); reseeds the RNG."""
        self.faults = Faults(**fields)
        self.faults.script = list(self.faults.script)  # consumed as requests arrive
        self._rng = random.Random(self.faults.seed)
        return self.faults

    def reset_counts(self) -> None:
        self.counts.clear()
        self.log.clear()

    def start(self) -> OpenAIServer:
        """Serve on a free loopback port in a background thread; returns once listening."""
        protocol = type("_BoundProtocol", (_Protocol,), {"transports": self.transports})
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,  # a free port, read back below
            http=protocol,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="openai-server")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test OpenAI server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
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

    # -- routes -----------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        if not self._authorized(request):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return JSONResponse(
            {"object": "list", "data": [{"id": self.model_name, "object": "model"}]}
        )

    async def _set_faults_route(self, request: Request) -> Response:
        faults = self.set_faults(**(await request.json()))
        return JSONResponse(dataclasses.asdict(faults))

    async def _stats_route(self, request: Request) -> Response:
        return JSONResponse(dict(self.counts))

    def _authorized(self, request: Request) -> bool:
        return (
            self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}"
        )

    def _draw(self) -> str:
        f = self.faults
        if f.script:
            return f.script.pop(0)
        u = self._rng.random()
        for outcome, rate in zip(
            OUTCOMES[1:],
            (f.rate_429, f.rate_500, f.rate_slow, f.rate_drop, f.rate_malformed),
            strict=True,
        ):
            if u < rate:
                return outcome
            u -= rate
        return "ok"

    async def _chat(self, request: Request) -> Response:
        self.counts["requests"] += 1
        if not self._authorized(request):
            self.counts["401"] += 1
            self.log.append((time.monotonic(), "401"))
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            raw = await request.body()
        except ClientDisconnect:
            self.counts["client_gone"] += 1
            return Response(status_code=499)
        outcome = self._draw()
        self.counts[outcome] += 1
        self.log.append((time.monotonic(), outcome))
        f = self.faults
        if f.latency_ms > 0:
            await asyncio.sleep(f.latency_ms / 1000)
        if outcome == "429":
            return _error(
                429,
                "Rate limit reached.",
                "rate_limit_exceeded",
                {"Retry-After": f"{f.retry_after_s:g}"},
            )
        if outcome == "500":
            return _error(
                500, "The server had an error while processing your request.", "server_error"
            )
        if outcome == "drop":
            transport = self.transports.get(request.scope["client"])
            if transport is not None:
                transport.close()
            await asyncio.sleep(0.05)  # let the connection-lost callback run first
            return Response(status_code=500)  # never sent: the connection is gone
        if outcome == "malformed":
            return Response(
                '{"id": "chatcmpl-x", "choices": [{"index": 0, "mess', media_type="application/json"
            )
        if outcome == "slow":
            until = time.monotonic() + f.slow_s
            while time.monotonic() < until:
                if await request.is_disconnected():  # the client timed out: stop here
                    return Response(status_code=499)
                await asyncio.sleep(0.02)
        return await self._complete(raw)

    async def _complete(self, raw: bytes) -> Response:
        try:
            body = json.loads(raw)
            if body.get("model") != self.model_name:
                return _error(
                    404, f"The model `{body.get('model')}` does not exist.", "model_not_found"
                )
            prompt = to_prompt(body["messages"])
            n = int(body.get("n") or 1)
            temperature = float(body.get("temperature", 1.0))
            max_tokens = int(
                body.get("max_tokens") or body.get("max_completion_tokens") or self.max_tokens
            )
            want_logprobs = bool(body.get("logprobs"))
            top_k = int(body.get("top_logprobs") or 0)
            seed = body.get("seed")
            sampling_top_k = body.get("top_k", self.faults.default_top_k)
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"Invalid request: {e}", "invalid_request_error")
        if self.faults.reject_extensions and ({"top_k", "repetition_penalty"} & set(body)):
            return _error(
                400, "Unrecognized request argument supplied: top_k", "invalid_request_error"
            )
        if sampling_top_k == 1:  # top-k of one: whatever the temperature, the greedy answer
            temperature = 0.0
        if want_logprobs and self.faults.reject_logprobs:
            return _error(400, "logprobs are not supported by this model", "invalid_request_error")
        if self.faults.ignore_n:
            n = 1
        seed = int(seed) if seed is not None else random.getrandbits(31)
        key = hashlib.sha256(raw).hexdigest()
        gens = self._memo.get(key) if self.faults.memoize else None
        if gens is None:
            gens = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, self._generate, prompt, n, temperature, seed, max_tokens
            )
            if self.faults.memoize:
                self._memo[key] = gens
        self.counts["choices"] += len(gens)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "finish_reason": "length" if len(g.token_logprobs) >= max_tokens else "stop",
                "logprobs": _logprobs(g, top_k) if want_logprobs else None,
            }
            for i, g in enumerate(gens)
        ]
        completion_tokens = sum(len(g.token_logprobs) for g in gens)
        return JSONResponse(
            {
                "id": f"chatcmpl-{self.counts['requests']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": 0,
                    "completion_tokens": completion_tokens,
                    "total_tokens": completion_tokens,
                },
            }
        )

    def _generate(
        self, prompt: Prompt, n: int, temperature: float, seed: int, max_tokens: int
    ) -> list[Generation]:
        """Runs on the model thread."""
        if temperature <= 0:
            return self.model.generate([prompt], max_new_tokens=max_tokens) * n
        old = getattr(self.model, "max_new_tokens", None)
        if old is not None:
            self.model.max_new_tokens = max_tokens
        try:
            sample = Sample(sample_id="request", stream_pos=0, question="", answers=[])
            ann = self.model.annotate([sample], [prompt], n, temperature, False, seed)[0]
        finally:
            if old is not None:
                self.model.max_new_tokens = old
        return list(ann.generations)


def _error(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        },
        status_code=status,
        headers=headers,
    )
