"""Serve a local VLM over an OpenAI-compatible chat-completions API, with logprobs.

The inverse of the ``openai`` teacher backend (:mod:`icd.models.openai`): it lets that
backend be tried offline, against a model on this machine, over the same wire protocol
vLLM/SGLang speak. Run it with::

    python -m icd.models.serve fixtures/tiny-llava --name teacher --port 8000

and point ``models.teacher`` at it (``backend: openai``, ``base_url:
http://127.0.0.1:8000/v1``, ``model_id: teacher``). The benches and the tests start it
in-process instead (``with OpenAIServer(model) as srv: srv.url``).

- ``POST /v1/chat/completions``: data-URL images are decoded and the chat is rebuilt as an
  :class:`icd.method.types.Prompt`; temperature 0 (or ``top_k=1``) answers greedily,
  temperature > 0 samples ``n`` answers with the request's ``seed``; ``logprobs`` /
  ``top_logprobs`` are returned in OpenAI's format.
- ``GET /v1/models`` lists the served model name. With ``api_key`` set, a request without
  ``Authorization: Bearer <api_key>`` gets a 401.

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
import hashlib
import io
import json
import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from icd.data.types import Sample
from icd.method.types import Generation, Prompt
from icd.models.base import Student, Teacher


class ServedModel(Student, Teacher, Protocol):
    """What the server needs: greedy ``generate`` and sampled ``annotate``
    (:class:`icd.models.hf.HFVLM` provides both)."""


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
    ids: list[str | None] = []
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
                ids.append(p.get("uuid"))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported content part {p.get('type')!r}")
        out.append({"role": m["role"], "content": parts})
    return Prompt(messages=out, images=images, image_ids=ids if any(ids) else [])


def parse_request(body: dict[str, Any], default_max_tokens: int) -> ChatRequest:
    """The :class:`ChatRequest` of a JSON body (ValueError, KeyError or TypeError when
    malformed)."""
    seed = body.get("seed")
    return ChatRequest(
        prompt=to_prompt(body["messages"]),
        n=int(body.get("n") or 1),
        temperature=float(body.get("temperature", 1.0)),
        max_tokens=int(
            body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens
        ),
        logprobs=bool(body.get("logprobs")),
        top_logprobs=int(body.get("top_logprobs") or 0),
        seed=int(seed) if seed is not None else None,
        top_k=body.get("top_k"),
    )


def openai_logprobs(gen: Generation, top_k: int) -> dict[str, Any]:
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


def error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in OpenAI's format (``{"error": {"message", "type", "param", "code"}}``)."""
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
    ):
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.latency_ms = latency_ms
        self.memoize = memoize
        # One dedicated thread runs every model call: calls are serialised, and torch's
        # CPU thread pool is not re-created (and left spinning) by ever-new callers.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="openai-server-model")
        self.counts: Counter[str] = Counter()
        self._memo: dict[str, list[Generation]] = {}  # request body hash -> answers
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
        ]

    def _outcome(self) -> str:
        """What this request gets, decided on arrival: ``"ok"`` (answered) here."""
        return "ok"

    async def _fault(self, outcome: str, request: Request) -> Response:
        """The response of a request whose outcome is not ``"ok"``."""
        raise NotImplementedError(f"outcome {outcome!r}")

    def _review(self, body: dict[str, Any], req: ChatRequest) -> ChatRequest | Response:
        """A parsed request, or the error response it gets instead (none here)."""
        return req

    # -- routes -----------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        if not self._authorized(request):
            return error_response(401, "Incorrect API key provided.", "invalid_api_key")
        return JSONResponse(
            {"object": "list", "data": [{"id": self.model_name, "object": "model"}]}
        )

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
            raw = await request.body()
        except ClientDisconnect:
            self.counts["client_gone"] += 1
            return Response(status_code=499)
        outcome = self._outcome()
        self.counts[outcome] += 1
        self.log.append((time.monotonic(), outcome))
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000)
        if outcome != "ok":
            return await self._fault(outcome, request)
        return await self._complete(raw)

    async def _complete(self, raw: bytes) -> Response:
        try:
            body = json.loads(raw)
            if body.get("model") != self.model_name:
                return error_response(
                    404, f"The model `{body.get('model')}` does not exist.", "model_not_found"
                )
            req = parse_request(body, self.max_tokens)
        except (ValueError, KeyError, TypeError) as e:
            return error_response(400, f"Invalid request: {e}", "invalid_request_error")
        reviewed = self._review(body, req)
        if isinstance(reviewed, Response):
            return reviewed
        req = reviewed
        if req.top_k == 1:  # top-k of one: whatever the temperature, the greedy answer
            req.temperature = 0.0
        seed = req.seed if req.seed is not None else random.getrandbits(31)
        key = hashlib.sha256(raw).hexdigest()
        gens = self._memo.get(key) if self.memoize else None
        if gens is None:
            gens = await asyncio.get_running_loop().run_in_executor(
                self._model_thread,
                self._generate,
                req.prompt,
                req.n,
                req.temperature,
                seed,
                req.max_tokens,
            )
            if self.memoize:
                self._memo[key] = gens
        self.counts["choices"] += len(gens)
        self.answered.append(req.prompt.image_ids or [None] * len(req.prompt.images))
        return JSONResponse(self._completion(req, gens))

    def _completion(self, req: ChatRequest, gens: list[Generation]) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": g.text},
                "finish_reason": "length" if len(g.token_logprobs) >= req.max_tokens else "stop",
                "logprobs": openai_logprobs(g, req.top_logprobs) if req.logprobs else None,
            }
            for i, g in enumerate(gens)
        ]
        completion_tokens = sum(len(g.token_logprobs) for g in gens)
        prompt_tokens = max((g.prompt_tokens for g in gens), default=0)  # one prompt, n answers
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

    def _generate(
        self, prompt: Prompt, n: int, temperature: float, seed: int, max_tokens: int
    ) -> list[Generation]:
        """Runs on the model thread."""
        if self.model is None:
            raise RuntimeError("this server has no model to answer with")
        if temperature <= 0:
            return self.model.generate([prompt], max_new_tokens=max_tokens) * n
        old = getattr(self.model, "max_new_tokens", None)
        if old is not None:
            self.model.max_new_tokens = max_tokens  # type: ignore[attr-defined]
        try:
            sample = Sample(sample_id="request", stream_pos=0, question="", answers=[])
            ann = self.model.annotate([sample], [prompt], n, temperature, False, seed)[0]
        finally:
            if old is not None:
                self.model.max_new_tokens = old  # type: ignore[attr-defined]
        return list(ann.generations)


def main(argv: list[str] | None = None) -> None:
    """``python -m icd.models.serve MODEL``: serve a local HF VLM until interrupted."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF model id or folder (fixtures/<name> for the mini-world)")
    ap.add_argument("--name", default=None, help="served model name (default: MODEL)")
    ap.add_argument("--revision", default="main")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None, help="require this Bearer token")
    ap.add_argument("--max-tokens", type=int, default=16, help="default max_tokens")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    args = ap.parse_args(argv)
    from icd.models.fixtures import resolve_model_path
    from icd.models.hf import HFVLM

    path = resolve_model_path(args.model)  # None: a hub id, loaded as given
    model = HFVLM(str(path or args.model), revision=args.revision, max_new_tokens=args.max_tokens)
    server = OpenAIServer(
        model,
        model_name=args.name or args.model,
        api_key=args.api_key,
        max_tokens=args.max_tokens,
        latency_ms=args.latency_ms,
    )
    print(f"serving {args.model!r} as {server.model_name!r} at http://{args.host}:{args.port}/v1")
    server.run(args.host, args.port)


if __name__ == "__main__":
    main()
