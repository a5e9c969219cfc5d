"""Hugging Face backends: a VLM (student or teacher) and a dual-encoder embedder.

``HFVLM`` wraps any ``AutoModelForImageTextToText`` + ``AutoProcessor`` checkpoint: prompts
are rendered with the processor's chat template, batched with left padding (prompts may
carry different numbers of images), and answered greedily or by temperature sampling.
Token statistics come from the model's unwarped logits. ``HFEmbedder`` wraps a CLIP/SigLIP
style ``AutoModel`` with ``get_image_features`` / ``get_text_features``.

Model ids starting with ``fixtures/`` load the locally built tiny models (see
:mod:`icd.models.fixtures`); anything else goes to ``from_pretrained(id, revision=...)``.

Real checkpoints: ``processor_kwargs`` go to the processor at load and at every call (e.g.
SmolVLM's ``do_image_splitting``, Qwen2.5-VL's ``min_pixels`` / ``max_pixels``);
``device_map`` places the weights with accelerate (``auto`` shards a large model over the
GPUs); ``attn_implementation`` picks the attention kernel; ``image_cache_mb`` bounds the
processed-image cache (:mod:`icd.models.image_cache`: each demo image is processed once,
not once per prompt; 0 turns it off). A CUDA out-of-memory error halves
the batch and retries, down to one sample, then fails with one line
(:class:`~icd.models.ModelOOMError`). A missing optional dependency (torchvision,
sentencepiece, accelerate, flash-attn) is a one-line :class:`~icd.models.ModelLoadError`
naming the model and the install command.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from icd.data.images import to_rgb
from icd.data.types import Sample
from icd.errors import one_line
from icd.method.types import Generation, Prompt
from icd.models import ModelLoadError, ModelOOMError, resolve_device
from icd.models.base import Annotation, Annotations, Sampling
from icd.models.fixtures import resolve_model_path


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint (``HF_ENDPOINT``), so that a machine without
    network fails in seconds instead of after minutes of retries. Skipped behind a proxy."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


# Optional packages real checkpoints need: (import name, pattern in transformers' errors, fix)
OPTIONAL_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "torchvision": (
        r"torchvision",
        "install torchvision built for your torch: pip install 'icd[gpu]' (see README, GPU)",
    ),
    "sentencepiece": (r"sentencepiece", "pip install sentencepiece"),
    "accelerate": (r"\baccelerate\b", "pip install 'icd[gpu]' (accelerate)"),
    "flash_attn": (
        r"flash[_ -]?attn|flash ?attention ?2?",
        "pip install 'icd[flash]', or set attn_implementation: sdpa",
    ),
}


def missing_dependency(text: str) -> str | None:
    """The optional package an error message says is missing (None: not such an error)."""
    low = text.lower()
    if not any(
        w in low for w in ("requires", "install", "no module", "not found", "not available")
    ):
        return None
    for name, (pattern, _) in OPTIONAL_DEPENDENCIES.items():
        if re.search(pattern, text, re.IGNORECASE):
            return name
    return None


def dependency_error(where: str, package: str) -> ModelLoadError:
    """One line naming the model, the missing package and how to install it."""
    return ModelLoadError(
        f"cannot load model {where}: it needs {package}, which is not installed — "
        f"{OPTIONAL_DEPENDENCIES[package][1]}"
    )


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_load_options(where: str, device_map: str | None, attn_implementation: str | None) -> None:
    """Fail in one line, before any download, when a load option needs a missing package."""
    if device_map is not None and not has_module("accelerate"):
        raise dependency_error(where, "accelerate")
    if attn_implementation == "flash_attention_2" and not has_module("flash_attn"):
        raise dependency_error(where, "flash_attn")


def from_pretrained(loader: type[Any], model_id: str, revision: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` for a model id, a local folder or a ``fixtures/`` id.

    Tries the local cache first, then the hub. Any failure becomes a one-line
    :class:`ModelLoadError` naming the id and revision.
    """
    from huggingface_hub.constants import is_offline_mode

    where = f"{model_id!r}" + ("" if revision == "main" else f" (revision {revision!r})")
    try:
        path = resolve_model_path(model_id)
        if path is not None:
            return loader.from_pretrained(str(path), **kwargs)
        try:
            return loader.from_pretrained(
                model_id, revision=revision, local_files_only=True, **kwargs
            )
        except OSError:
            if is_offline_mode():
                raise
        if not _hub_reachable():
            raise ModelLoadError(
                f"cannot load model {where}: not a local folder, not in the Hugging Face "
                "cache, and the hub is unreachable"
            )
        return loader.from_pretrained(model_id, revision=revision, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:
        package = missing_dependency(str(e))
        if package is not None:
            raise dependency_error(where, package) from None
        raise ModelLoadError(f"cannot load model {where}: {one_line(e)}") from None


def _torch_dtype(dtype: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)") from None


def _draw_seed(seed: int, sample_id: str, draw: int) -> int:
    digest = hashlib.sha256(f"{seed}|{sample_id}|{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class _RowSampler(LogitsProcessor):
    """A logits processor that samples each row's next token at ``temperature`` from that
    row's own seeded generator, and returns scores on which any further processing (and
    ``generate``'s own draw) can only pick that token.

    Each answer thus depends on its (seed, sample id, draw index) alone, not on the batch it
    was decoded in or on torch's global RNG; ``generate`` still reports the raw logits.

    Everything stays on the scores' device: the generators live there (created at the first
    step), each row draws exponential noise into its own row of one buffer, and one argmax
    over ``probs / noise`` picks every row's token (the exponential race, which is how
    ``torch.multinomial`` draws one sample: on CPU the picks equal
    ``torch.multinomial(probs[i], 1, generator=g_i)`` exactly). Nothing of vocabulary size
    goes to the host.
    """

    def __init__(self, temperature: float, seeds: Sequence[int]) -> None:
        self.temperature = temperature
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None
        self._noise: torch.Tensor | None = None

    def _generators(self, device: torch.device) -> list[torch.Generator]:
        if self.generators is None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return self.generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"sampler has {len(self.seeds)} seeds for {scores.shape[0]} rows")
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        noise = self._noise
        if noise is None or noise.shape != probs.shape or noise.device != probs.device:
            noise = self._noise = torch.empty_like(probs)
        for row, g in zip(noise, self._generators(probs.device), strict=True):
            row.exponential_(1.0, generator=g)
        picks = torch.div(probs, noise, out=noise).argmax(dim=-1)  # noise is redrawn next step
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, picks[:, None], 0.0)
        return cast("torch.FloatTensor", out)


def is_oom(e: BaseException) -> bool:
    """A device out-of-memory error (CUDA, or another backend's "out of memory")."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _BatchCap:
    """The largest batch that has fit on the device, shared by a model and its views."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.lock = threading.Lock()


def run_halving(
    items: Sequence[Any],
    batch_size: int,
    run: Callable[[list[Any]], list[Any]],
    cap: _BatchCap,
    what: str,
) -> list[Any]:
    """``run`` over ``items`` in batches of ``batch_size``; order preserved.

    A batch that runs out of device memory is split in halves and retried, down to one item;
    the smaller size is remembered in ``cap`` for later calls. One item that still does not
    fit raises :class:`ModelOOMError` (one line, naming ``what``).
    """
    out: list[Any] = []
    start = 0
    while start < len(items):
        size = min(batch_size, cap.value or batch_size)
        batch = list(items[start : start + size])
        try:
            out += run(batch)
        except Exception as e:
            if not is_oom(e):
                raise
            _free_device_memory()
            if len(batch) == 1:
                raise ModelOOMError(
                    f"{what}: out of device memory at batch size 1 — lower max_new_tokens or "
                    "the image size (processor_kwargs), use a smaller dtype, or spread the "
                    "model over more GPUs (device_map: auto)"
                ) from None
            with cap.lock:
                cap.value = (len(batch) + 1) // 2
            continue
        start += len(batch)
    return out


@dataclass(frozen=True)
class HFLoad:
    """How an :class:`HFVLM`'s weights are loaded: the hub ``revision``, ``dtype``, the
    ``device`` (``auto``: the best available), or a ``device_map`` (accelerate places the
    weights; ``device`` is then unused), and the ``attn_implementation``."""

    revision: str = "main"
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    attn_implementation: str | None = "sdpa"


class HFVLM:
    """A Hugging Face image-text-to-text model used as student (``generate``) or teacher
    (``annotate``). Thread-safe: batches on one model (and its views) run one at a time,
    since its tokenizer is not safe to share and concurrent batches gain nothing."""

    def __init__(
        self,
        model_id: str,
        *,
        load: HFLoad | None = None,
        batch_size: int = 8,
        max_new_tokens: int = 16,
        processor_kwargs: Mapping[str, object] | None = None,
        image_cache_mb: float = 0,
    ) -> None:
        from transformers import AutoProcessor

        from icd.models import image_cache

        opts = load or HFLoad()
        revision, dtype, device = opts.revision, opts.dtype, opts.device
        device_map, attn_implementation = opts.device_map, opts.attn_implementation
        self.model_id = model_id
        self.revision = revision
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.dtype = _torch_dtype(dtype)
        self.processor_kwargs = dict(processor_kwargs or {})
        self._lock = threading.Lock()  # shared with the views made by with_settings
        self._cap = _BatchCap()  # likewise: the batch size that fits on the device
        check_load_options(repr(model_id), device_map, attn_implementation)
        if device_map is None:
            self.device = torch.device(resolve_device(device, model_id))
        self.processor = from_pretrained(AutoProcessor, model_id, revision, **self.processor_kwargs)
        # processed images, shared by this model's views (None: off, or an unknown layout)
        self.image_cache = image_cache.install(self.processor, max_mb=image_cache_mb)
        self._counting = threading.local()  # per thread: its calls' cache hits and misses
        self.model = self._load_weights(opts)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if getattr(self.processor, "chat_template", None) is None:
            raise ModelLoadError(
                f"cannot load model {model_id!r}: its processor has no chat template"
            )
        self._set_end_tokens()

    def _load_weights(self, opts: HFLoad) -> Any:
        """The model in eval mode, on ``self.device`` (or placed by ``opts.device_map``,
        ``self.device`` then where its embeddings are)."""
        from transformers import AutoModelForImageTextToText

        weights: dict[str, object] = {"dtype": self.dtype}
        if opts.attn_implementation is not None:
            weights["attn_implementation"] = opts.attn_implementation
        if opts.device_map is not None:
            weights["device_map"] = opts.device_map
        model = from_pretrained(
            AutoModelForImageTextToText, self.model_id, self.revision, **weights
        )
        if opts.device_map is None:
            model = model.to(self.device)
        else:  # inputs go where the embeddings are
            self.device = model.get_input_embeddings().weight.device
        return model.eval()

    def _set_end_tokens(self) -> None:
        """``eos_ids`` (the generation config's and the tokenizer's) and ``pad_id`` (the
        tokenizer gets it when it has none)."""
        model_id = self.model_id
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise ModelLoadError(f"cannot load model {model_id!r}: no end-of-sequence token")
        self.eos_ids = eos
        pad = gc.pad_token_id if gc.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else eos[0]
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = self.pad_id

    def with_settings(self, batch_size: int, max_new_tokens: int) -> HFVLM:
        """A view of this model (same weights) with other call settings."""
        view = copy.copy(self)
        view.batch_size, view.max_new_tokens = batch_size, max_new_tokens
        return view

    @contextmanager
    def counting_image_cache(self) -> Iterator[dict[str, int]]:
        """Count the image cache's hits and misses of this thread's calls on this model (and
        its views) during the block, into the yielded dict (left empty without a cache)."""
        counts: dict[str, int] = {"hits": 0, "misses": 0} if self.image_cache else {}
        outer = getattr(self._counting, "counts", None)
        self._counting.counts = counts
        try:
            yield counts
        finally:
            self._counting.counts = outer

    # ----------------------------------------------------------------- student
    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int | None = None
    ) -> list[Generation]:
        """One greedy answer per prompt, batched by ``batch_size`` (halved on out-of-memory);
        order preserved."""
        limit = max_new_tokens or self.max_new_tokens
        return run_halving(
            list(prompts),
            self.batch_size,
            lambda batch: self._generate(batch, limit),
            self._cap,
            f"model {self.model_id!r}",
        )

    # ----------------------------------------------------------------- teacher
    def annotate(
        self,
        samples: Sequence[Sample],
        prompts: Sequence[Prompt],
        sampling: Sampling,
    ) -> Annotations:
        """``sampling.n`` answers per sample: the greedy one first when ``include_greedy``,
        then answers sampled at ``temperature`` (pure temperature sampling, no top-k/top-p).

        The k-th sampled answer of a sample is drawn with a generator seeded from
        (``seed``, sample id, k), so it does not depend on batching, call order or retries.
        A batch that fails is retried one sample at a time; a sample that still fails gets
        ``Annotation(error=...)``.
        """
        if len(samples) != len(prompts):
            raise ValueError(f"annotate: {len(samples)} samples but {len(prompts)} prompts")
        out = run_halving(
            list(range(len(prompts))),
            self.batch_size,
            lambda idx: self._annotate_batch(
                [samples[i] for i in idx], [prompts[i] for i in idx], sampling
            ),
            self._cap,
            f"model {self.model_id!r}",
        )
        return Annotations(out)

    def _annotate_batch(
        self, batch_s: list[Sample], batch_p: list[Prompt], sampling: Sampling
    ) -> list[Annotation]:
        """One batch; out-of-memory propagates (the caller halves the batch), any other
        failure is retried one sample at a time and recorded per sample."""
        try:
            gens = self._annotate(batch_s, batch_p, sampling)
            return [Annotation(generations=g) for g in gens]
        except Exception as e:
            if is_oom(e):
                raise
        out: list[Annotation] = []
        for s, p in zip(batch_s, batch_p, strict=True):
            try:
                gens = self._annotate([s], [p], sampling)
                out.append(Annotation(generations=gens[0], retries=1))
            except Exception as e:
                if is_oom(e):
                    raise
                out.append(Annotation(generations=[], error=one_line(e), retries=1))
        return out

    def _annotate(
        self, samples: list[Sample], prompts: list[Prompt], sampling: Sampling
    ) -> list[list[Generation]]:
        n, temperature, n_sampled = sampling.n, sampling.temperature, sampling.n_sampled
        greedy: list[list[Generation]] = [[] for _ in prompts]
        if sampling.include_greedy or temperature <= 0:
            greedy = [[g] for g in self._generate(prompts, self.max_new_tokens)]
        if n_sampled <= 0:
            return [g[:n] for g in greedy]
        if temperature <= 0:  # sampling at T=0 is greedy decoding
            return [g * n for g in greedy]
        seeds = [
            _draw_seed(sampling.seed, s.sample_id, k) for s in samples for k in range(n_sampled)
        ]
        sampled = self._generate(
            prompts, self.max_new_tokens, sampler=_RowSampler(temperature, seeds), copies=n_sampled
        )
        head = greedy if sampling.include_greedy else [[] for _ in prompts]
        return [head[i] + sampled[i * n_sampled : (i + 1) * n_sampled] for i in range(len(prompts))]

    # ---------------------------------------------------------------- decoding
    @torch.inference_mode()
    def _generate(
        self,
        prompts: list[Prompt],
        max_new_tokens: int,
        sampler: _RowSampler | None = None,
        copies: int = 1,
    ) -> list[Generation]:
        """Decode one batch greedily, or with ``sampler`` drawing ``copies`` answers per
        prompt; returns ``len(prompts) * copies`` generations, prompt i's at
        ``[i * copies, (i + 1) * copies)``."""
        with self._lock:
            inputs = self._encode(prompts)
            kwargs = self._generate_kwargs(max_new_tokens, sampler, copies)
            out = self.model.generate(**inputs, **kwargs)
            answer = out.sequences[:, inputs["input_ids"].shape[1] :]
            lengths = inputs["attention_mask"].sum(1).repeat_interleave(copies).tolist()
            return self._to_generations(answer, out.logits, prompt_tokens=lengths)

    def _generate_kwargs(
        self, max_new_tokens: int, sampler: _RowSampler | None, copies: int
    ) -> dict[str, object]:
        kwargs: dict[str, object] = dict(
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
        )
        if sampler is None:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            # The sampler has already drawn each token; with neutral warpers generate's own
            # draw (needed for num_return_sequences) can only return it.
            kwargs.update(
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=copies,
                logits_processor=LogitsProcessorList([sampler]),
            )
        return kwargs

    def _encode(self, prompts: list[Prompt]) -> Any:
        texts = [
            self.processor.apply_chat_template(
                p.messages, add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        images = [[to_rgb(im) for im in p.images] for p in prompts]
        kwargs: dict[str, object] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):
            kwargs["images"] = images
            kwargs.update(self.processor_kwargs)
        cache, counts = self.image_cache, getattr(self._counting, "counts", None)
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        inputs = self.processor(**kwargs)
        if cache is not None and counts:  # exact: this model's calls hold its lock
            counts["hits"] += cache.hits - before[0]
            counts["misses"] += cache.misses - before[1]
        return {
            k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }

    def _to_generations(
        self, tokens: torch.Tensor, logits: Sequence[torch.Tensor], *, prompt_tokens: list[int]
    ) -> list[Generation]:
        """Answer text and per-token statistics of each row, up to (excluding) the first
        end-of-sequence or padding token."""
        if len(logits) == 0:
            empty = np.zeros(0, np.float32)
            return [Generation("", empty, empty, prompt_tokens=int(n)) for n in prompt_tokens]
        logp = torch.log_softmax(torch.stack(list(logits), dim=1).float(), dim=-1)  # [B, T, V]
        chosen = logp.gather(-1, tokens[:, : logp.shape[1], None]).squeeze(-1)  # [B, T]
        entropy = -(logp.exp() * logp).nan_to_num().sum(-1)  # 0·log 0 = 0
        top2 = logp[:, 0].exp().topk(2, dim=-1).values
        stop = torch.isin(tokens, torch.tensor([*self.eos_ids, self.pad_id], device=tokens.device))
        lengths = torch.where(stop.any(1), stop.int().argmax(1), tokens.shape[1]).tolist()
        gens = []
        for i, length in enumerate(lengths):
            ids = tokens[i, :length]
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            first = (float(top2[i, 0]), float(top2[i, 1])) if length else (1.0, 0.0)
            gens.append(
                Generation(
                    text=text,
                    token_logprobs=chosen[i, :length].cpu().numpy().astype(np.float32),
                    token_entropy=entropy[i, :length].cpu().numpy().astype(np.float32),
                    first_top2=first,
                    prompt_tokens=int(prompt_tokens[i]),
                )
            )
        return gens


class HFEmbedder:
    """A dual encoder (CLIP, SigLIP, ...) mapping images and texts into one space.

    Rows are float32 and L2-normalised. Texts are padded the way the model was trained
    (``max_length`` for SigLIP-style models, longest-in-batch otherwise), so a row does not
    depend on what else is in its batch. Thread-safe (calls run one at a time).
    """

    def __init__(
        self,
        model_id: str,
        *,
        revision: str = "main",
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 32,
        attn_implementation: str | None = None,
    ) -> None:
        from transformers import AutoModel, AutoProcessor

        self.model_id = model_id
        self.revision = revision
        self.batch_size = batch_size
        self.dtype = _torch_dtype(dtype)
        self._lock = threading.Lock()
        self._cap = _BatchCap()
        check_load_options(repr(model_id), None, attn_implementation)
        self.device = torch.device(resolve_device(device, model_id))
        self.processor = from_pretrained(AutoProcessor, model_id, revision)
        load: dict[str, object] = {"dtype": self.dtype}
        if attn_implementation is not None:
            load["attn_implementation"] = attn_implementation
        model = from_pretrained(AutoModel, model_id, revision, **load)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ModelLoadError(
                f"cannot load embedder {model_id!r}: {type(model).__name__} is not a dual "
                "encoder (no get_image_features/get_text_features)"
            )
        self.model = model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "right"
        model_type = getattr(self.model.config, "model_type", "")
        self._text_kwargs: dict[str, object] = {"padding": True, "truncation": True}
        text_cfg = getattr(self.model.config, "text_config", None)
        max_len = getattr(text_cfg, "max_position_embeddings", None)
        if max_len:
            self._text_kwargs["max_length"] = max_len
        if "siglip" in model_type:
            self._text_kwargs["padding"] = "max_length"
        self.dim = int(self.embed_texts(["a"]).shape[1])

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """[len(images), dim] float32, unit rows."""
        return self._embed(
            list(images),
            lambda batch: self.model.get_image_features(
                **self._to_device(
                    self.processor(images=[to_rgb(im) for im in batch], return_tensors="pt")
                )
            ),
        )

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, unit rows."""
        return self._embed(
            list(texts),
            lambda batch: self.model.get_text_features(
                **self._to_device(self.tokenizer(batch, return_tensors="pt", **self._text_kwargs))
            ),
        )

    def _embed(self, items: list[Any], encode: Callable[[list[Any]], Any]) -> np.ndarray:
        if not items:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)

        def run(batch: list[Any]) -> list[np.ndarray]:
            with self._lock:
                feats = encode(batch)
            if not isinstance(feats, torch.Tensor):  # transformers 5 returns an output object
                feats = feats.pooler_output
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            return list(feats.cpu().numpy())

        rows = run_halving(items, self.batch_size, run, self._cap, f"embedder {self.model_id!r}")
        return np.stack(rows).astype(np.float32, copy=False)

    def _to_device(self, inputs: Any) -> dict[str, torch.Tensor]:
        return {
            k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
