"""Model backends behind the protocols of :mod:`icd.models.base`.

``load_student``, ``load_teacher`` and ``load_embedder`` turn a :class:`ModelConfig` into a
backend, once per process: the same (backend, model id, revision, dtype, device) returns
the same object, so a worker loads each model once. Ids starting with ``fixtures/`` name
the tiny locally built models (:mod:`icd.models.fixtures`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icd.config import ModelConfig
    from icd.models.base import Embedder, Student, Teacher


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded (unknown id, missing folder, no network, a missing
    optional package, an unavailable device); the message is one line naming the model."""


class ModelOOMError(RuntimeError):
    """A model ran out of device memory even at batch size 1; the message is one line."""


def pick_device(device: str, n_gpus: int, worker: str | int | None) -> str:
    """The device a model loads on: a bare ``cuda`` in a Dask worker on a host with several
    GPUs becomes ``cuda:<i>``, one GPU per worker (integer worker names, as a local cluster
    gives them, round-robin; other names by a stable hash); anything else is unchanged."""
    if device != "cuda" or n_gpus <= 1 or worker is None:
        return device
    try:
        index = int(worker)
    except (TypeError, ValueError):
        index = int.from_bytes(hashlib.sha256(str(worker).encode()).digest()[:4], "little")
    return f"cuda:{index % n_gpus}"


def _dask_worker_name() -> str | int | None:
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return None


def resolve_device(device: str, model_id: str = "") -> str:
    """``device`` checked against this machine (one-line :class:`ModelLoadError` when CUDA is
    asked for but unavailable), with Dask workers spread over the GPUs (:func:`pick_device`)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"model {model_id!r}: device {device!r} is configured but CUDA is not available "
                f"here (torch {torch.__version__}) — set device: cpu or install a CUDA build of torch"
            )
        return pick_device(device, torch.cuda.device_count(), _dask_worker_name())
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ModelLoadError(f"model {model_id!r}: device 'mps' is not available here")
    return device


_CACHE: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def _cached(key: tuple[Any, ...], make: Any) -> Any:
    with _LOCK:  # loads are serialised: two threads never load the same model twice
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def _key(cfg: ModelConfig, *extra: Any) -> tuple[Any, ...]:
    load = json.dumps(
        [cfg.processor_kwargs, cfg.device_map, cfg.attn_implementation, cfg.image_cache_mb],
        sort_keys=True,
    )
    return (cfg.backend, cfg.model_id, cfg.revision, cfg.dtype, cfg.device, load, *extra)


def clear_cache() -> None:
    """Forget every loaded model (tests; freeing memory between runs)."""
    with _LOCK:
        _CACHE.clear()


def load_student(cfg: ModelConfig, adapter: str | None = None) -> Student:
    """The student VLM of ``cfg`` (backend ``hf``; or ``openai``, an OpenAI-compatible
    server such as vLLM: :class:`~icd.models.openai.OpenAIStudent`), with the LoRA adapter saved at
    ``adapter`` merged in when given; cached per process (one adapted copy at a time: an
    online run moves from one chunk's adapter to the next)."""
    if cfg.backend == "openai":
        if adapter is not None:
            raise ModelLoadError(f"student {cfg.model_id!r}: LoRA adapters need an 'hf' student")
        from icd.models.openai import OpenAIStudent

        return _cached(
            _key(cfg, "student", cfg.model_dump_json()), lambda: OpenAIStudent.from_config(cfg)
        )
    if cfg.backend != "hf":
        raise ModelLoadError(f"student {cfg.model_id!r}: backend {cfg.backend!r} is not 'hf'")
    base = _load_vlm(cfg)
    if adapter is None:
        return base
    from icd.models.finetune import with_adapter

    key = _key(cfg, "adapter", adapter)
    with _LOCK:
        for old in [k for k in _CACHE if k[:-1] == key[:-1] and k != key]:
            del _CACHE[old]
    adapted = _cached(key, lambda: with_adapter(base, Path(adapter)))
    return adapted.with_settings(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)


@contextmanager
def counting_image_cache(model: Any) -> Iterator[dict[str, int]]:
    """The image cache's hits and misses of this thread's calls on ``model`` during the
    block (:meth:`icd.models.hf.HFVLM.counting_image_cache`); an empty dict for a model
    without one (an API backend, a cache turned off)."""
    counting = getattr(model, "counting_image_cache", None)
    if counting is None:
        yield {}
        return
    with counting() as counts:
        yield counts


def load_teacher(cfg: ModelConfig, class_names: list[str] | None = None) -> Teacher:
    """The teacher of ``cfg``: an HF VLM, an OpenAI-compatible endpoint, or the oracle
    (ground truth with ``cfg.noise`` wrong labels, needs ``class_names`` when noisy)."""
    if cfg.backend == "hf":
        return _load_vlm(cfg)
    if cfg.backend == "oracle":
        from icd.models.oracle import OracleTeacher

        names = tuple(class_names or ())

        def make() -> OracleTeacher:
            try:
                return OracleTeacher(
                    list(names),
                    noise=cfg.noise,
                    seed=oracle_seed(cfg.model_id),
                    model_id=cfg.model_id,
                )
            except ValueError as e:
                raise ModelLoadError(f"oracle teacher: {e}") from None

        return _cached(_key(cfg, cfg.noise, names), make)
    if cfg.backend == "openai":
        from icd.models.openai import OpenAITeacher

        # endpoint, limits and retries all shape the client: key on the whole config
        return _cached(_key(cfg, cfg.model_dump_json()), lambda: OpenAITeacher.from_config(cfg))
    raise ModelLoadError(f"teacher {cfg.model_id!r}: unknown backend {cfg.backend!r}")


def load_embedder(cfg: ModelConfig) -> Embedder:
    """The dual-encoder embedder of ``cfg`` (backend ``hf``); cached per process."""
    if cfg.backend != "hf":
        raise ModelLoadError(f"embedder {cfg.model_id!r}: backend {cfg.backend!r} is not 'hf'")
    _require_id(cfg)
    from icd.models.hf import HFEmbedder

    return _cached(
        _key(cfg),
        lambda: HFEmbedder(
            cfg.model_id,
            revision=cfg.revision,
            dtype=cfg.dtype,
            device=cfg.device,
            batch_size=cfg.batch_size,
            attn_implementation=cfg.attn_implementation,
        ),
    )


def _load_vlm(cfg: ModelConfig) -> Any:
    _require_id(cfg)
    from icd.models.hf import HFVLM, HFLoad

    base = _cached(
        _key(cfg),
        lambda: HFVLM(
            cfg.model_id,
            load=HFLoad(
                revision=cfg.revision,
                dtype=cfg.dtype,
                device=cfg.device,
                device_map=cfg.device_map,
                attn_implementation=cfg.attn_implementation,
            ),
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            processor_kwargs=cfg.processor_kwargs,
            image_cache_mb=cfg.image_cache_mb,
        ),
    )
    # batch size and answer length are call settings, not part of the model's identity:
    # a student and a teacher with the same weights share them.
    return base.with_settings(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)


def _require_id(cfg: ModelConfig) -> None:
    if not cfg.model_id.strip():
        raise ModelLoadError(f"{cfg.backend} model: model_id is empty")


def oracle_seed(model_id: str) -> int:
    """The oracle's noise seed: fixed by its model id (e.g. ``oracle`` or ``oracle-7``)."""
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:4], "little")
