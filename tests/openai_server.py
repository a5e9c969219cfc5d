"""The local OpenAI-compatible server (:mod:`icd.models.serve`), misbehaving on purpose.

:class:`FaultyServer` injects faults, drawn per request from a seeded RNG (reproducible
sequence): 429 with ``Retry-After``, 500, a response slower than the client's timeout, a
connection closed without any response, a 200 with a truncated JSON body; a ``script``
forces the outcomes of the next requests in order. ``POST /_faults`` sets :class:`Faults`
fields over HTTP, ``GET /_stats`` returns the server's counts.

It also emulates servers that differ from the OpenAI API: vLLM's generation defaults (a
request that omits ``top_k`` gets the served checkpoint's, ``Faults.default_top_k``;
Qwen-VL checkpoints ship ``top_k=1``, so every "sampled" answer is the greedy one),
``reject_extensions`` (a 400 for ``top_k`` / ``repetition_penalty``, as the hosted OpenAI
API does), ``reject_image_ids`` (a 400 for image parts with a ``uuid``), ``reject_logprobs``
and ``ignore_n``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from icd.models.serve import ChatRequest, OpenAIServer, error_response

OUTCOMES = ("ok", "429", "500", "slow", "drop", "malformed")


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
    reject_image_ids: bool = False  # 400 on image parts carrying a uuid (not a vLLM server)
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


class FaultyServer(OpenAIServer):
    """:class:`icd.models.serve.OpenAIServer` with the faults of :class:`Faults`."""

    def __init__(self, *args: Any, faults: Faults | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.transports: dict[tuple[str, int], asyncio.Transport] = {}
        self.set_faults(**dataclasses.asdict(faults or Faults()))

    def set_faults(self, **fields: Any) -> Faults:
        """Replace the fault settings (unnamed fields reset to defaults); reseeds the RNG."""
        self.faults = Faults(**fields)
        self.faults.script = list(self.faults.script)  # consumed as requests arrive
        self._rng = random.Random(self.faults.seed)
        self.latency_ms, self.memoize = self.faults.latency_ms, self.faults.memoize
        return self.faults

    def _routes(self) -> list[Route]:
        return [
            *super()._routes(),
            Route("/_faults", self._set_faults_route, methods=["POST"]),
            Route("/_stats", self._stats_route, methods=["GET"]),
        ]

    async def _set_faults_route(self, request: Request) -> Response:
        faults = self.set_faults(**(await request.json()))
        return JSONResponse(dataclasses.asdict(faults))

    async def _stats_route(self, request: Request) -> Response:
        return JSONResponse(dict(self.counts))

    def _http_protocol(self) -> Any:
        return type("_BoundProtocol", (_Protocol,), {"transports": self.transports})

    def _outcome(self) -> str:
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

    async def _fault(self, outcome: str, request: Request) -> Response:
        f = self.faults
        if outcome == "429":
            headers = {"Retry-After": f"{f.retry_after_s:g}"}
            return error_response(429, "Rate limit reached.", "rate_limit_exceeded", headers)
        if outcome == "500":
            message = "The server had an error while processing your request."
            return error_response(500, message, "server_error")
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
            return await self._complete(await request.body())
        raise ValueError(f"unknown outcome {outcome!r}")

    def _review(self, body: dict[str, Any], req: ChatRequest) -> ChatRequest | Response:
        f = self.faults
        if req.top_k is None:
            req.top_k = f.default_top_k
        if f.reject_extensions and ({"top_k", "repetition_penalty"} & set(body)):
            message = "Unrecognized request argument supplied: top_k"
            return error_response(400, message, "invalid_request_error")
        if f.reject_image_ids and any(req.prompt.image_ids):
            message = "Unrecognized field in content part: uuid"
            return error_response(400, message, "invalid_request_error")
        if req.logprobs and f.reject_logprobs:
            message = "logprobs are not supported by this model"
            return error_response(400, message, "invalid_request_error")
        if f.ignore_n:
            req.n = 1
        return req


class RecordingServer(OpenAIServer):
    """Answers every chat request with the next scripted list of ``choices`` (the last one
    repeats), as a real service would send them, and records each request body in
    ``requests``. No model runs: it stands for any OpenAI-compatible service."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(None, *args, **kw)
        self.script: list[list[dict[str, Any]]] = []
        self.requests: list[dict[str, Any]] = []

    def answer_with(self, *choices: list[dict[str, Any]]) -> None:
        """The ``choices`` of the next responses, in order (the last one repeats)."""
        self.script = list(choices)
        self.requests.clear()

    async def _complete(self, raw: bytes) -> Response:
        body = json.loads(raw)
        self.requests.append(body)
        choices = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        choices = [{"index": i, **c} for i, c in enumerate(choices)][: int(body.get("n") or 1)]
        return JSONResponse(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_name,
                "choices": choices,
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            }
        )


def choice(
    content: str | None,
    finish_reason: str = "stop",
    *,
    refusal: str | None = None,
    logprobs: bool = True,
) -> dict[str, Any]:
    """One chat-completion choice as services send it (``logprobs=False``: ``null``)."""
    steps = None
    if logprobs and content:
        steps = {
            "content": [
                {
                    "token": word,
                    "logprob": -0.1,
                    "bytes": list(word.encode()),
                    "top_logprobs": [
                        {"token": word, "logprob": -0.1, "bytes": list(word.encode())},
                        {"token": "x", "logprob": -2.5, "bytes": [120]},
                    ],
                }
                for word in content.split()
            ],
            "refusal": None,
        }
    return {
        "message": {"role": "assistant", "content": content, "refusal": refusal},
        "finish_reason": finish_reason,
        "logprobs": steps,
    }
