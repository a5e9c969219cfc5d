"""Teacher over an OpenAI-compatible chat-completions API (vLLM, SGLang, hosted APIs).

Prompts go out as chat messages with the images inlined as base64 PNG data URLs, in the
same interleaved order as the :class:`~icd.method.types.Prompt`. N answers per sample come
from the API's ``n`` (with single requests where a server ignores it), the greedy answer
from one extra request at temperature 0. Requests run concurrently under a bound, a
requests-per-minute limit and a per-request timeout; 429/5xx/timeouts/dropped
connections/malformed bodies are retried with exponential backoff and jitter, honouring
``Retry-After``. A misconfigured teacher (401/403/404, a URL without http(s), a server
never reached) raises :class:`TeacherConfigError` at once; a sample whose retries run out,
or that the server rejects (other 4xx, e.g. a 400 for an oversized prompt; not retried),
gets an :class:`~icd.models.base.Annotation` with ``error`` set and the others carry on.

Answers that are no answer never vote: a choice with ``finish_reason: "content_filter"``,
a refusal (``refusal`` text, ``content`` usually null) or empty content is counted
(``filtered`` / ``refused`` / ``empty``) and left out; a sample left without any usable
answer gets ``error`` set (``teacher_error: no usable answer (...)``, the refusal's text
included), so it falls back to the student. Answers cut off by ``max_tokens``
(``finish_reason: "length"``) are counted as ``truncated`` and kept as votes, or left out
with ``length_answers="drop"``. For the student (``role="student"``) an answer without
log-probs is no answer either (``no_logprobs``): its uncertainty is unknown, never zero.

Accounting: every HTTP attempt and every returned answer is counted, per call (the
``service`` of the :class:`~icd.models.base.Annotations` that :meth:`OpenAITeacher.annotate`
returns) and per client (:meth:`OpenAIChat.stats`).

Sampling is fully specified by the request: besides ``temperature`` and a seed per request,
every request sends ``top_p=1`` and ``frequency_penalty=presence_penalty=0``, and (where the
server accepts them: vLLM, SGLang; not api.openai.com) ``top_k=-1`` and
``repetition_penalty=1``. vLLM fills any omitted field from the checkpoint's
``generation_config.json`` (Qwen-VL: ``top_k=1, top_p=0.001``), which would turn the sampled
votes into copies of the greedy answer. A server that rejects the extension fields (a 400
naming them) gets them no more.

The API key is read from the environment variable named by ``api_key_env`` at call time
and sent as a Bearer token; it is never stored on the object, logged, or put in messages.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import io
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from icd.config import ModelConfig
from icd.data.types import Sample
from icd.method.types import Generation, Prompt
from icd.models.base import Annotation, Annotations, Sampling, ServiceCalls
from icd.models.chatapi import (
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ContentPart,
    ImagePart,
    SamplingExtensions,
    TopLogprob,
)

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx
CONFIG_STATUS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
MAX_RETRY_AFTER_S = 300.0
# Sampling fields outside the OpenAI API that vLLM/SGLang accept (neutral values).
EXTENSION_FIELDS: SamplingExtensions = {"top_k": -1, "repetition_penalty": 1.0}


class TeacherConfigError(RuntimeError):
    """The teacher endpoint is misconfigured (bad key, unknown model or URL, unreachable):
    every request of the run would fail the same way. The message is one line."""


# ---------------------------------------------------------------------------------------
# Prompt conversion and response parsing (pure)


def image_to_data_url(image: Image.Image) -> str:
    """A lossless PNG ``data:`` URL of ``image`` (RGB), so a server decodes the same pixels."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(prompt: Prompt) -> list[ChatMessage]:
    """Convert a Hugging Face chat prompt into OpenAI chat messages.

    User turns become content-part lists (``text`` and ``image_url`` parts, in the
    prompt's order, the i-th ``{"type": "image"}`` taking ``prompt.images[i]``, with
    ``prompt.image_ids[i]`` as the part's ``uuid`` where there is one: vLLM's multimodal
    cache key); assistant and system turns become plain text.
    """
    n_placeholders = sum(
        1
        for m in prompt.messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image"
    )
    if n_placeholders != len(prompt.images):
        raise ValueError(
            f"prompt has {n_placeholders} image placeholders but {len(prompt.images)} images"
        )
    urls = iter([image_to_data_url(img) for img in prompt.images])
    ids = iter(prompt.image_ids or [None] * len(prompt.images))
    out: list[ChatMessage] = []
    for m in prompt.messages:
        role, content = m["role"], m.get("content", "")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if role != "user":
            text = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            out.append({"role": role, "content": text})
            continue
        parts: list[ContentPart] = []
        for p in content:
            if p.get("type") == "image":
                part: ImagePart = {"type": "image_url", "image_url": {"url": next(urls)}}
                image_id = next(ids)
                if image_id is not None:
                    part["uuid"] = image_id
                parts.append(part)
            elif p.get("type") == "text":
                parts.append({"type": "text", "text": p.get("text", "")})
            else:
                raise ValueError(f"unsupported content part type {p.get('type')!r}")
        out.append({"role": role, "content": parts})
    return out


def _without_image_id(part: ContentPart) -> ContentPart:
    if part["type"] == "image_url":
        return {"type": "image_url", "image_url": part["image_url"]}
    return part


def without_image_ids(messages: list[ChatMessage]) -> list[ChatMessage]:
    """``messages`` with no ``uuid`` on any image part (for servers that reject the field)."""
    out: list[ChatMessage] = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            m = {"role": m["role"], "content": [_without_image_id(p) for p in content]}
        out.append(m)
    return out


def topk_entropy(logprobs: Sequence[float]) -> float:
    """Entropy (nats) of a distribution known only through its top-k log-probs.

    The listed tokens contribute exactly; the remaining mass r = 1 - sum(p) is counted as
    if spread over tokens as likely as the k-th, contributing -r·log(p_k). Every unlisted
    token has p <= p_k, so this is a lower bound of the true entropy, exact when the
    listed tokens carry all the mass. An approximation: servers give only the top k.
    """
    p = np.sort(np.exp(np.asarray(logprobs, dtype=np.float64)))[::-1]
    p = p[p > 0]
    if p.size == 0:
        return 0.0
    total = float(p.sum())
    if total > 1.0:  # rounding in the server's log-probs
        p, total = p / total, 1.0
    h = float(-(p * np.log(p)).sum())
    rest = 1.0 - total
    if rest > 1e-12:
        h += -rest * math.log(float(p[-1]))
    return max(h, 0.0)


def parse_choice(choice: Choice) -> Generation:
    """One OpenAI ``choice`` as a :class:`Generation`.

    Token statistics come from ``choice["logprobs"]["content"]``: the chosen token's
    log-prob, the entropy approximated from ``top_logprobs`` (:func:`topk_entropy`; 0 for a
    step without them) and the first step's two largest probabilities. Without logprobs
    the arrays are empty and ``first_top2`` is (1.0, 0.0). Raises ``ValueError`` when the
    choice is malformed.
    """
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ValueError("choice without a message")
    text = message.get("content") or ""
    if not isinstance(text, str):
        raise ValueError("message content is not a string")
    logprobs = choice.get("logprobs")
    steps = (logprobs.get("content") if logprobs else None) or []
    if not isinstance(steps, list):
        raise ValueError("logprobs.content is not a list")
    token_lp, token_h = [], []
    first_top2 = (1.0, 0.0)
    for t, step in enumerate(steps):
        lp = float(step["logprob"])
        top = _dedupe_top(step.get("top_logprobs") or [])
        token_lp.append(lp)
        token_h.append(topk_entropy(top) if top else 0.0)
        if t == 0:
            probs = sorted((math.exp(x) for x in (top or [lp])), reverse=True)
            first_top2 = (probs[0], probs[1] if len(probs) > 1 else 0.0)
    return Generation(
        text=text.strip(),
        token_logprobs=np.asarray(token_lp, dtype=np.float32),
        token_entropy=np.asarray(token_h, dtype=np.float32),
        first_top2=first_top2,
    )


@dataclass(frozen=True)
class ServiceChoice:
    """One returned choice: its :class:`Generation` and why it is no answer, if it is not.

    ``problem`` is ``None`` for a usable answer, else one of ``"content_filter"``,
    ``"refusal"``, ``"empty"``, ``"no_logprobs"`` (see :func:`read_choice`), with
    ``detail`` the one-line reason (a refusal's text); ``truncated`` marks
    ``finish_reason: "length"``.
    """

    generation: Generation
    problem: str | None = None
    detail: str = ""
    truncated: bool = False


PROBLEM_COUNTS = {
    "content_filter": "filtered",
    "refusal": "refused",
    "empty": "empty",
    "no_logprobs": "no_logprobs",
}


def read_choice(
    choice: Choice, *, need_logprobs: bool = False, empty_ok: bool = False
) -> ServiceChoice:
    """A choice as a :class:`ServiceChoice` (``ValueError`` when malformed).

    In this order: ``finish_reason: "content_filter"`` is ``content_filter`` whatever the
    content says; a non-empty ``refusal`` is ``refusal`` (its text kept in ``detail``);
    content empty after stripping is ``empty`` unless ``empty_ok`` (a student: an empty
    answer is maximally uncertain, so the teacher is asked); with ``need_logprobs`` (a
    student), a non-empty answer without per-token log-probs is ``no_logprobs``.
    """
    gen = parse_choice(choice)
    truncated = choice.get("finish_reason") == "length"
    message = choice["message"]
    refusal = message.get("refusal")
    if choice.get("finish_reason") == "content_filter":
        return ServiceChoice(gen, "content_filter", "content_filter", truncated)
    if isinstance(refusal, str) and refusal.strip():
        text = " ".join(refusal.split())
        text = text if len(text) <= 200 else text[:199] + "…"
        return ServiceChoice(gen, "refusal", f"refusal {text!r}", truncated)
    if not gen.text and not empty_ok:
        return ServiceChoice(gen, "empty", "empty content", truncated)
    if need_logprobs and gen.text and gen.token_logprobs.size == 0:
        detail = "no logprobs in the response (uncertainty unknown)"
        return ServiceChoice(gen, "no_logprobs", detail, truncated)
    return ServiceChoice(gen, None, "", truncated)


def _dedupe_top(top: list[TopLogprob]) -> list[float]:
    seen: dict[str, float] = {}
    for i, entry in enumerate(top):
        key = entry.get("token") or f"#{i}"
        seen.setdefault(key, float(entry["logprob"]))
    return list(seen.values())


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed that depends only on the run seed and the sample id."""
    h = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---------------------------------------------------------------------------------------
# Limits and accounting


class RateLimiter:
    """Token bucket: ``per_minute`` requests a minute, bursts of at most ``burst``.

    :meth:`reserve` takes a token (going into debt when none is left) and returns how long
    the caller must wait before sending; safe from any thread or event loop.
    """

    def __init__(self, per_minute: float, burst: float | None = None):
        self.rate = per_minute / 60.0
        self.capacity = burst if burst is not None else max(1.0, self.rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            self.tokens -= 1.0
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


COUNT_KEYS = (
    "requests", "ok", "failures", "retries", "samples", "annotations", "errors",
    "prompt_tokens", "completion_tokens",
    "filtered", "refused", "empty", "truncated", "no_logprobs",
)  # fmt: skip


@dataclass
class _Counts:
    requests: int = 0  # HTTP attempts, whatever their outcome
    ok: int = 0  # attempts that returned usable choices
    failures: int = 0  # attempts that did not (status, timeout, connection, bad body)
    retries: int = 0  # attempts made because an earlier one failed
    samples: int = 0  # choices returned
    annotations: int = 0  # samples annotated (successfully or not)
    errors: int = 0  # samples finally marked teacher_error
    prompt_tokens: int = 0  # as the server's `usage` reports them (0 where it does not)
    completion_tokens: int = 0
    # choices that are no answer (left out of the vote) or flagged, by reason
    filtered: int = 0  # finish_reason "content_filter"
    refused: int = 0  # a refusal (the message's ``refusal`` text)
    empty: int = 0  # no content
    truncated: int = 0  # finish_reason "length" (kept or dropped: ``length_answers``)
    no_logprobs: int = 0  # a student answer without log-probs (its uncertainty is unknown)
    latencies_ms: list[float] = field(default_factory=list)  # successful attempts

    def raw(self) -> ServiceCalls:
        return ServiceCalls(
            requests=self.requests, ok=self.ok, failures=self.failures, retries=self.retries,
            samples=self.samples, annotations=self.annotations, errors=self.errors,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            filtered=self.filtered, refused=self.refused, empty=self.empty,
            truncated=self.truncated, no_logprobs=self.no_logprobs,
            latencies_ms=list(self.latencies_ms),
        )  # fmt: skip


def _call_count(call: Mapping[str, object], key: str) -> int:
    value = call.get(key, 0)
    if not isinstance(value, int | float | str):
        raise TypeError(f"service count {key!r} is a {type(value).__name__}")
    return int(value)


def _call_latencies(call: Mapping[str, object]) -> list[float]:
    value = call.get("latencies_ms", [])
    if not isinstance(value, list):
        raise TypeError(f"service latencies_ms is a {type(value).__name__}")
    return value


def summarize_stats(calls: Sequence[Mapping[str, object]]) -> dict[str, float | int]:
    """Merge raw per-call accounting (:class:`~icd.models.base.ServiceCalls`: the
    ``service`` of what :meth:`OpenAITeacher.annotate` returns, or the same read back from
    a run's JSON) into totals plus latency percentiles (ms, over successful attempts; 0
    when none)."""
    out: dict[str, float | int] = {k: sum(_call_count(c, k) for c in calls) for k in COUNT_KEYS}
    lat = np.asarray([x for c in calls for x in _call_latencies(c)], dtype=np.float64)
    if lat.size == 0:
        lat = np.zeros(1)
    out.update(
        latency_p50_ms=float(np.percentile(lat, 50)),
        latency_p95_ms=float(np.percentile(lat, 95)),
        latency_max_ms=float(lat.max()),
    )
    return out


class _Failed(Exception):
    """An attempt failed in a way worth retrying; ``reason`` is short and key-free."""

    def __init__(self, reason: str, retry_after: float | None = None, connect: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.connect = connect


class _SampleError(Exception):
    """An attempt failed in a way retrying cannot fix for this sample (e.g. 400)."""


async def _settle(
    job: Coroutine[object, object, list[ServiceChoice]],
) -> list[ServiceChoice] | Exception:
    """Await ``job``; a per-sample failure is returned instead of raised."""
    try:
        return await job
    except (_Failed, _SampleError) as e:
        return e


@dataclass
class _Call:
    """State shared by the requests of one :meth:`OpenAIChat.complete` call."""

    client: httpx.AsyncClient
    sem: asyncio.Semaphore
    failed: TeacherConfigError | None = None  # set once: no further request is sent
    counts: _Counts = field(default_factory=_Counts)  # this call's share of the accounting


@dataclass
class _Tally:
    """One sample's HTTP attempts and retries."""

    requests: int = 0
    retries: int = 0


@dataclass(frozen=True)
class _Usage:
    """A response's token usage as the server reports it (0 where it does not)."""

    prompt: int
    completion: int

    @classmethod
    def read(cls, usage: object) -> _Usage:
        """From a response's ``usage`` object (anything else: no usage reported)."""
        if not isinstance(usage, dict):
            return cls(0, 0)
        return cls(
            prompt=int(usage.get("prompt_tokens") or 0),
            completion=int(usage.get("completion_tokens") or 0),
        )


@dataclass(frozen=True)
class _Ask:
    """One logical request: ``k`` answers to ``messages`` at ``temperature``, seeded."""

    messages: list[ChatMessage]
    k: int
    temperature: float
    seed: int


def _reasons(choices: Sequence[ServiceChoice], drop_truncated: bool) -> str:
    """Why answers were left out, one line: ``"2 of 5: content_filter; 1 of 5: refusal
    'I can't ...'"`` (distinct details, in order of first appearance)."""
    left = [
        c.detail if c.problem else "finish_reason length"
        for c in choices
        if c.problem or (c.truncated and drop_truncated)
    ]
    counts = Counter(left)
    return "; ".join(f"{n} of {len(choices)}: {detail}" for detail, n in counts.items())


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIOptions:
    """How an OpenAI-compatible client talks to its endpoint (``models.<role>`` of the
    config, :meth:`from_config`).

    ``concurrency`` bounds requests in flight per call; ``requests_per_minute`` (token
    bucket, bursts of one second's worth) is shared by all calls on one client;
    ``timeout_s`` bounds each attempt; ``max_retries`` counts retries after the first
    attempt, waiting ``backoff_base * 2**i`` s (capped at ``backoff_max``, jittered down by
    up to half, never less than ``Retry-After``). ``max_tokens`` caps each answer.
    ``top_logprobs`` token alternatives are asked per step (0: chosen token only, negative:
    no logprobs). ``length_answers`` keeps or drops answers cut off by ``max_tokens``.
    ``sampling_extensions`` sends vLLM/SGLang's extra sampling fields and ``image_ids``
    each image's id as its ``uuid`` (vLLM's multimodal cache key); None for either: unless
    the endpoint is api.openai.com. A server that rejects a field gets it no more.
    """

    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    requests_per_minute: int | None = None
    timeout_s: float = 60.0
    max_retries: int = 5
    max_tokens: int = 16
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    revision: str = "main"
    top_logprobs: int = ModelConfig.model_fields["top_logprobs"].default
    length_answers: str = "keep"
    sampling_extensions: bool | None = None
    image_ids: bool | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.length_answers not in ("keep", "drop"):
            raise ValueError(
                f"length_answers must be 'keep' or 'drop', not {self.length_answers!r}"
            )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> OpenAIOptions:
        """The options of ``models.<role>`` (``backend: openai``)."""
        return cls(
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            requests_per_minute=cfg.requests_per_minute,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            max_tokens=cfg.max_new_tokens,
            revision=cfg.revision,
            top_logprobs=cfg.top_logprobs,
            length_answers=cfg.length_answers,
            sampling_extensions=cfg.sampling_extensions,
            image_ids=cfg.image_ids,
        )


def _base_url(cfg: ModelConfig, role: str) -> str:
    """``models.<role>.base_url``, required for the openai backend."""
    if not cfg.base_url:
        raise TeacherConfigError(
            f"models.{role}.base_url is required for the openai backend (model {cfg.model_id!r})"
        )
    return cfg.base_url


class OpenAIChat:
    """The HTTP transport to an OpenAI-compatible ``/chat/completions`` endpoint, shared by
    :class:`OpenAITeacher` and :class:`OpenAIStudent` (``role`` names the endpoint in
    errors and log messages, and a student's answers need log-probs).

    ``base_url`` ends in ``/v1`` (e.g. ``http://localhost:8000/v1``); ``model`` is the served
    model name; ``options`` as :class:`OpenAIOptions`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        options: OpenAIOptions | None = None,
        role: str = "teacher",
    ):
        options = options or OpenAIOptions()
        self.options = options
        self.base_url = base_url.rstrip("/")
        self.role = role  # "teacher" or "student": names the endpoint in messages
        self.model_id = model
        self.revision = options.revision
        # a student's uncertainty comes from its log-probs: an answer without them is none
        self._student = role == "student"
        self._need_logprobs = self._student and options.top_logprobs >= 0
        self._warned: set[str] = set()  # problems already logged at warning level
        rpm = options.requests_per_minute
        self._limiter = RateLimiter(rpm) if rpm else None
        self._logprobs = options.top_logprobs >= 0  # turned off if the server rejects them
        hosted = "api.openai.com" in self.base_url  # the hosted OpenAI API rejects unknown fields
        extensions = options.sampling_extensions
        self._extensions = not hosted if extensions is None else extensions  # likewise
        image_ids = options.image_ids
        self._image_ids = not hosted if image_ids is None else image_ids  # likewise
        self._n_supported = True  # turned off once the server returns fewer choices than n
        self._reached = False  # set once any request got an HTTP response
        self._counts = _Counts()
        self._lock = threading.Lock()
        self._jitter = random.Random()

    def __repr__(self) -> str:
        o = self.options
        return (
            f"base_url={self.base_url!r}, model={self.model_id!r}, "
            f"api_key_env={o.api_key_env!r}, concurrency={o.concurrency}, "
            f"requests_per_minute={o.requests_per_minute}, timeout_s={o.timeout_s}, "
            f"max_retries={o.max_retries}"
        )

    # -- accounting -----------------------------------------------------------------

    def stats(self) -> dict[str, float | int]:
        """Cumulative accounting since creation.

        ``requests == ok + failures`` (every HTTP attempt is one or the other);
        ``retries`` counts attempts made because an earlier one failed; ``samples`` the
        choices returned (including those of a sample that failed overall); ``errors`` the
        samples marked ``<role>_error``; latency percentiles are over successful
        attempts, in milliseconds.
        """
        with self._lock:
            raw = self._counts.raw()
        return summarize_stats([raw])

    def _count(self, call: _Call, latency_ms: float | None = None, **delta: int) -> None:
        with self._lock:
            for counts in (self._counts, call.counts):
                for k, v in delta.items():
                    setattr(counts, k, getattr(counts, k) + v)
                if latency_ms is not None:
                    counts.latencies_ms.append(latency_ms)

    # -- public API -----------------------------------------------------------------

    def complete(
        self, keys: Sequence[str], prompts: Sequence[Prompt], sampling: Sampling
    ) -> Annotations:
        """``sampling.n`` answers per prompt (the greedy one first when
        ``include_greedy``, the rest sampled at ``temperature`` with a seed from
        ``sampling.seed`` and the prompt's key: a sample id), order preserved.

        The result's ``service`` is this call's raw accounting (the counts of
        :meth:`stats` and the list ``latencies_ms``); merge several with
        :func:`summarize_stats`. Runs its own event loop (in a fresh thread when the
        caller already runs one). Raises :class:`TeacherConfigError` when the endpoint is
        misconfigured.
        """
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} samples but {len(prompts)} prompts")
        if sampling.n < 1:
            raise ValueError("n must be >= 1")
        if not keys:
            return Annotations(service=_Counts().raw())
        coro = self._annotate_all(keys, prompts, sampling)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    # -- internals ------------------------------------------------------------------

    async def _annotate_all(
        self, keys: Sequence[str], prompts: Sequence[Prompt], sampling: Sampling
    ) -> Annotations:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.options.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(
            max_connections=self.options.concurrency,
            max_keepalive_connections=self.options.concurrency,
        )
        timeout = httpx.Timeout(self.options.timeout_s)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
            call = _Call(client, asyncio.Semaphore(self.options.concurrency))
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._annotate_one(call, k, p, sampling))
                        for k, p in zip(keys, prompts, strict=True)
                    ]
            except BaseExceptionGroup as group:
                for e in group.exceptions:
                    if isinstance(e, TeacherConfigError):
                        raise e from None
                raise
        return Annotations([t.result() for t in tasks], service=call.counts.raw())

    async def _annotate_one(
        self, call: _Call, key: str, prompt: Prompt, sampling: Sampling
    ) -> Annotation:
        tally = _Tally()
        try:
            messages = await asyncio.to_thread(to_openai_messages, prompt)  # PNG encoding
        except (ValueError, OSError) as e:
            self._count(call, annotations=1, errors=1)
            return Annotation([], error=f"{self.role}_error: bad prompt: {e}", requests=0)
        base = sample_seed(sampling.seed, key)
        jobs = []
        if sampling.include_greedy:
            jobs.append(self._choices(call, _Ask(messages, 1, 0.0, base), tally))
        if sampling.n_sampled > 0:
            ask = _Ask(messages, sampling.n_sampled, sampling.temperature, base + 1)
            jobs.append(self._choices(call, ask, tally))
        # A failed job does not cancel its sibling (every request sent is accounted for);
        # a TeacherConfigError does, and aborts the whole call.
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(_settle(job)) for job in jobs]
        except BaseExceptionGroup as group:
            for exc in group.exceptions:
                if isinstance(exc, TeacherConfigError):
                    raise exc from None
            raise
        results = [t.result() for t in tasks]
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            error = f"{self.role}_error: {failed[0]}"
            log.warning("%s: sample %s failed: %s", self.role, key, error)
            self._count(call, annotations=1, errors=1)
            return Annotation([], error=error, requests=tally.requests, retries=tally.retries)
        choices = [c for r in results if not isinstance(r, Exception) for c in r]
        drop_cut = self.options.length_answers == "drop"
        gens = [
            c.generation for c in choices if c.problem is None and not (c.truncated and drop_cut)
        ]
        if not gens:
            error = f"{self.role}_error: no usable answer ({_reasons(choices, drop_cut)})"
            self._warn(key, error, choices)
            self._count(call, annotations=1, errors=1)
            return Annotation([], error=error, requests=tally.requests, retries=tally.retries)
        if len(gens) < len(choices):
            log.info(
                "%s: sample %s: %d of %d answers left out of the vote (%s)",
                self.role, key, len(choices) - len(gens), len(choices),
                _reasons(choices, drop_cut),
            )  # fmt: skip
        self._count(call, annotations=1)
        return Annotation(gens, requests=tally.requests, retries=tally.retries)

    def _warn(self, sample_id: str, error: str, choices: Sequence[ServiceChoice]) -> None:
        """Log a sample left without an answer: at warning level the first time for each
        kind of problem (a service that never sends log-probs would log every sample),
        at debug level after."""
        kinds = {c.problem or "length" for c in choices}
        new = not kinds <= self._warned
        self._warned |= kinds
        level = logging.WARNING if new else logging.DEBUG
        hint = ""
        if "no_logprobs" in kinds:
            hint = (
                " — the student's uncertainty needs logprobs: check that the service returns them"
            )
        log.log(level, "%s: sample %s: %s%s", self.role, sample_id, error, hint)

    async def _choices(self, call: _Call, ask: _Ask, tally: _Tally) -> list[ServiceChoice]:
        """``ask.k`` answers: one request with ``n=k``, topped up by single requests
        (distinct seeds) when the server returns fewer choices."""
        k = ask.k
        gens: list[ServiceChoice] = []
        if k == 1 or self._n_supported:
            gens = await self._request(call, ask, tally)
            if len(gens) < k and self._n_supported:
                self._n_supported = False
                log.info(
                    "%s: server returned %d of n=%d choices; topping up with single requests",
                    self.role,
                    len(gens),
                    k,
                )
            gens = gens[:k]
        while len(gens) < k:
            single = dataclasses.replace(ask, k=1, seed=ask.seed + len(gens))
            gens += await self._request(call, single, tally)
        return gens[:k]

    async def _request(self, call: _Call, ask: _Ask, tally: _Tally) -> list[ServiceChoice]:
        """One logical request, retried until it succeeds or ``max_retries`` run out."""
        attempt, retry = 0, False
        while True:
            try:
                async with call.sem:
                    if call.failed is not None:  # another request found the endpoint misconfigured
                        raise call.failed
                    if self._limiter is not None:
                        wait = self._limiter.reserve()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    return await self._attempt(call, ask, tally, retry)
            except _Failed as e:
                retry = True
                if e.reason in ("logprobs rejected", "extensions rejected"):
                    continue  # resent at once without them
                if attempt >= self.options.max_retries:
                    if e.connect and not self._reached:
                        call.failed = TeacherConfigError(
                            f"{self.role} at {self.base_url}: unreachable ({e.reason}) after "
                            f"{self.options.max_retries} retries — check base_url and that the server is up"
                        )
                        raise call.failed from None
                    raise _Failed(f"{e.reason} after {self.options.max_retries} retries") from None
                delay = self._backoff(attempt, e.retry_after)
                log.debug("%s: %s; retry %d in %.2fs", self.role, e.reason, attempt + 1, delay)
                attempt += 1
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter, never shorter than the server's Retry-After."""
        delay = min(self.options.backoff_max, self.options.backoff_base * 2**attempt)
        delay *= 0.5 + 0.5 * self._jitter.random()
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def _payload(
        self, messages: list[ChatMessage], k: int, temperature: float, seed: int
    ) -> ChatCompletionRequest:
        """The request body: every sampling parameter explicit (see the module docstring)."""
        body: ChatCompletionRequest = {
            "model": self.model_id,
            "messages": messages if self._image_ids else without_image_ids(messages),
            "n": k,
            "temperature": temperature,
            "max_tokens": self.options.max_tokens,
            "seed": seed,
            # Explicit neutral sampling: no server-side generation defaults may apply.
            "top_p": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
        }
        if self._extensions:
            body.update(EXTENSION_FIELDS)
        if self._logprobs:
            body["logprobs"] = True
            if self.options.top_logprobs > 0:
                body["top_logprobs"] = self.options.top_logprobs
        return body

    async def _attempt(
        self, call: _Call, ask: _Ask, tally: _Tally, retry: bool
    ) -> list[ServiceChoice]:
        """One HTTP attempt (``retry``: made because an earlier one failed); counts it, and
        raises :class:`_Failed` / :class:`_SampleError` / :class:`TeacherConfigError` by
        outcome."""
        tally.requests += 1
        tally.retries += int(retry)
        self._count(call, requests=1, retries=int(retry))
        ok = False
        try:
            payload = self._payload(ask.messages, ask.k, ask.temperature, ask.seed)
            t0 = time.perf_counter()
            resp = await self._post(call, payload)
            self._reached = True
            self._check_status(call, resp, payload)
            gens, usage = self._read_response(resp)
            ok = True
            latency = (time.perf_counter() - t0) * 1000.0
            self._count_answered(call, gens, _Usage.read(usage), latency)
            return gens
        finally:
            if not ok:
                self._count(call, failures=1)

    async def _post(self, call: _Call, payload: ChatCompletionRequest) -> httpx.Response:
        """Send ``payload``; a transport failure raises :class:`_Failed`, a URL that is
        not http(s) :class:`TeacherConfigError`."""
        try:
            async with asyncio.timeout(self.options.timeout_s):
                return await call.client.post(
                    f"{self.base_url}/chat/completions", content=json.dumps(payload)
                )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            call.failed = TeacherConfigError(
                f"{self.role} at {self.base_url}: not a valid http(s) URL — check base_url"
            )
            raise call.failed from None
        except (TimeoutError, httpx.TimeoutException):
            raise _Failed("timeout") from None
        except httpx.ConnectError:
            raise _Failed("connection refused", connect=True) from None
        except httpx.TransportError as e:
            raise _Failed(f"connection error ({type(e).__name__})") from None

    def _check_status(
        self, call: _Call, resp: httpx.Response, payload: ChatCompletionRequest
    ) -> None:
        """Raise by the response's status: :class:`TeacherConfigError` (401/403/404),
        :class:`_Failed` (retryable), else for a 4xx see :meth:`_rejected`."""
        status = resp.status_code
        if status in CONFIG_STATUS:
            hint = (
                f"check {self.options.api_key_env}"
                if status in (401, 403)
                else f"check base_url and model {self.model_id!r}"
            )
            call.failed = TeacherConfigError(
                f"{self.role} at {self.base_url}: {status} {CONFIG_STATUS[status]} — {hint}"
            )
            raise call.failed
        if status in RETRYABLE_STATUS or status >= 500:
            raise _Failed(
                str(status), retry_after=parse_retry_after(resp.headers.get("retry-after"))
            )
        if status >= 400:
            self._rejected(status, self._server_message(resp), payload)

    def _rejected(self, status: int, detail: str, payload: ChatCompletionRequest) -> None:
        """A 4xx: a field the server rejects is sent no more (:class:`_Failed`, resent),
        anything else is the sample's error (:class:`_SampleError`)."""
        if "top_k" in payload and any(k in detail for k in EXTENSION_FIELDS):
            self._extensions = False
            log.info(
                "%s: server rejects %s; continuing without them",
                self.role,
                "/".join(EXTENSION_FIELDS),
            )
            raise _Failed("extensions rejected")
        if self._image_ids and "uuid" in detail.lower():
            self._image_ids = False
            log.info("%s: server rejects image uuids; sending none", self.role)
            raise _Failed("image ids rejected")
        if "logprobs" in payload and "logprob" in detail.lower():
            self._logprobs = False
            log.info(
                "%s: server rejects logprobs; continuing without token statistics",
                self.role,
            )
            raise _Failed("logprobs rejected")
        raise _SampleError(f"{status} {detail}")

    def _read_response(self, resp: httpx.Response) -> tuple[list[ServiceChoice], object]:
        """The choices of a 2xx response and its ``usage`` as sent; :class:`_Failed` when
        the body is malformed."""
        try:
            body = resp.json()
            choices = body["choices"]
            if not isinstance(choices, list) or not choices:
                raise ValueError("no choices")
            gens = [
                read_choice(c, need_logprobs=self._need_logprobs, empty_ok=self._student)
                for c in choices
            ]
        except (ValueError, KeyError, TypeError):
            raise _Failed("malformed response") from None
        return gens, body.get("usage")

    def _count_answered(
        self, call: _Call, gens: list[ServiceChoice], usage: _Usage, latency_ms: float
    ) -> None:
        """Count a successful attempt: its latency, choices, tokens and problems."""
        self._count(
            call,
            latency_ms=latency_ms,
            ok=1,
            samples=len(gens),
            prompt_tokens=usage.prompt,
            completion_tokens=usage.completion,
            truncated=sum(g.truncated for g in gens),
            **{
                key: sum(g.problem == problem for g in gens)
                for problem, key in PROBLEM_COUNTS.items()
            },
        )

    def _server_message(self, resp: httpx.Response) -> str:
        """The server's error message, one line, at most 200 characters, key-free."""
        try:
            err = resp.json().get("error", "")
            text = err.get("message", "") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            text = resp.text
        text = " ".join(str(text).split())[:200] or resp.reason_phrase
        key = os.environ.get(self.options.api_key_env)
        return text.replace(key, "***") if key else text


class OpenAITeacher:
    """Teacher backed by an OpenAI-compatible ``/chat/completions`` endpoint (an
    :class:`OpenAIChat` in the teacher role).

    ``base_url`` ends in ``/v1`` (e.g. ``http://localhost:8000/v1``); ``model`` is the served
    model name; ``options`` as :class:`OpenAIOptions`.
    """

    def __init__(self, base_url: str, model: str, options: OpenAIOptions | None = None):
        self.chat = OpenAIChat(base_url, model, options, role="teacher")
        self.options = self.chat.options
        self.model_id = model
        self.revision = self.options.revision

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> OpenAITeacher:
        """Build from ``models.teacher`` (``backend: openai``); the model name is ``model_id``."""
        return cls(_base_url(cfg, "teacher"), cfg.model_id, OpenAIOptions.from_config(cfg))

    def __repr__(self) -> str:
        return f"OpenAITeacher({self.chat!r})"

    def stats(self) -> dict[str, float | int]:
        """Cumulative accounting since creation (:meth:`OpenAIChat.stats`)."""
        return self.chat.stats()

    def annotate(
        self, samples: Sequence[Sample], prompts: Sequence[Prompt], sampling: Sampling
    ) -> Annotations:
        """``sampling.n`` answers per sample (the greedy one first when
        ``include_greedy``, the rest sampled at ``temperature`` with a per-sample seed),
        order preserved; the result's ``service`` is this call's raw accounting (see
        :meth:`OpenAIChat.complete`). Raises :class:`TeacherConfigError` when the endpoint
        is misconfigured."""
        if len(samples) != len(prompts):
            raise ValueError(f"{len(samples)} samples but {len(prompts)} prompts")
        return self.chat.complete([s.sample_id for s in samples], prompts, sampling)


# The student's one greedy answer per prompt; seeded by the prompt's position.
GREEDY = Sampling(n=1, temperature=0.0, include_greedy=True, seed=0)


class OpenAIStudent:
    """The student over an OpenAI-compatible endpoint (vLLM, SGLang, ...): one greedy
    answer per prompt with per-token log-probs and the top ``top_logprobs`` alternatives,
    through an :class:`OpenAIChat` in the student role (the teacher's transport:
    concurrency, rate limit, retries, one-line configuration errors).

    Uncertainty from the returned statistics: ``nll_mean`` and ``margin`` are exact (the
    chosen tokens' log-probs; the first step's two best alternatives); ``entropy_mean`` and
    ``entropy_first`` are estimated from the top-k with the unlisted probability mass as
    one extra bucket (:func:`topk_entropy`), a lower bound of the true entropy that is exact
    when the top-k carry all the mass. A prompt whose request finally fails gives an empty
    :class:`Generation` with ``error`` set (``student_error: ...``); the others carry on.
    So does an answer that is no answer: filtered (``finish_reason: "content_filter"``),
    a refusal (its text in the error), or one without log-probs (``no logprobs in the
    response``: its uncertainty is unknown — NaN downstream, so the query policy skips it
    and the run counts it in ``student_errors`` — never zero, which would read as fully
    certain). An empty answer is an answer (maximally uncertain: the teacher is asked).
    """

    def __init__(self, base_url: str, model: str, options: OpenAIOptions | None = None):
        self.chat = OpenAIChat(base_url, model, options, role="student")
        self.options = self.chat.options
        self.model_id = model
        self.revision = self.options.revision

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> OpenAIStudent:
        """Build from ``models.student`` (``backend: openai``)."""
        return cls(_base_url(cfg, "student"), cfg.model_id, OpenAIOptions.from_config(cfg))

    def __repr__(self) -> str:
        return f"OpenAIStudent({self.chat!r})"

    def stats(self) -> dict[str, float | int]:
        """Cumulative accounting since creation (:meth:`OpenAIChat.stats`)."""
        return self.chat.stats()

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """The greedy answer to each prompt, order preserved."""
        keys = [f"prompt-{i}" for i in range(len(prompts))]
        anns = self.chat.complete(keys, list(prompts), GREEDY)
        empty = np.zeros(0, np.float32)
        return [
            a.generations[0]
            if a.error is None and a.generations
            else Generation("", empty, empty, error=a.error or "student_error: no answer")
            for a in anns
        ]
