"""The OpenAI chat-completions wire format, as far as this package writes or reads it.

The client (:mod:`icd.models.openai`) builds :class:`ChatCompletionRequest` bodies and
reads :class:`Choice` objects out of responses; the local server (:mod:`icd.models.serve`)
does the reverse. Bodies received from the network are checked where they are read (a
TypedDict is the shape expected, not a promise that a remote server kept to it).
"""

from __future__ import annotations

from typing import Literal, NotRequired, Required, TypedDict


class ImageURL(TypedDict):
    url: str


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL
    uuid: NotRequired[str]  # vLLM's multimodal cache key


ContentPart = TextPart | ImagePart


class ChatMessage(TypedDict):
    role: str
    content: str | list[ContentPart]


class SamplingExtensions(TypedDict):
    """Sampling fields outside the OpenAI API that vLLM/SGLang accept."""

    top_k: int
    repetition_penalty: float


class ChatCompletionRequest(TypedDict, total=False):
    """A ``POST /chat/completions`` body as the client sends it."""

    model: Required[str]
    messages: Required[list[ChatMessage]]
    n: int
    temperature: float
    max_tokens: int
    seed: int
    top_p: float
    frequency_penalty: float
    presence_penalty: float
    top_k: int
    repetition_penalty: float
    logprobs: bool
    top_logprobs: int


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: NotRequired[list[int]]


class TokenLogprob(TopLogprob):
    """One generated token: its log-prob and the step's most likely tokens."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(TypedDict):
    content: list[TokenLogprob] | None
    refusal: NotRequired[str | None]


class AssistantMessage(TypedDict):
    role: NotRequired[str]
    content: str | None
    refusal: NotRequired[str | None]


class Choice(TypedDict):
    index: NotRequired[int]
    message: AssistantMessage
    finish_reason: NotRequired[str | None]
    logprobs: NotRequired[ChoiceLogprobs | None]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(TypedDict):
    """A non-streamed response body."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkDelta(TypedDict, total=False):
    role: str
    content: str


class ChunkChoice(TypedDict):
    """One choice of a streamed ``chat.completion.chunk``."""

    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


__all__ = [
    "AssistantMessage",
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatMessage",
    "Choice",
    "ChoiceLogprobs",
    "ChunkChoice",
    "ChunkDelta",
    "ContentPart",
    "ImagePart",
    "ImageURL",
    "SamplingExtensions",
    "TextPart",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]
