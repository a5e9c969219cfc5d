"""Model backends behind the protocols of :mod:`icd.models.base`.

``load_student``, ``load_teacher`` and ``load_embedder`` turn a :class:`ModelConfig` into a
backend, once per process: the same (backend, model id, revision, dtype, device) returns
the same object, so a worker loads each model once. Ids starting with ``fixtures/`` name
the tiny locally built models (:mod:`icd.models.fixtures`).
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icd.config import ModelConfig
    from icd.models.base import Embedder, Student, Teacher


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded (unknown id, missing folder, no network); the
    message is one line naming the model."""


_CACHE: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


def _cached(key: tuple[Any, ...], make: Any) -> Any:
    with _LOCK:  # loads are serialised: two threads never load the same model twice
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def _key(cfg: ModelConfig, *extra: Any) -> tuple[Any, ...]:
    return (cfg.backend, cfg.model_id, cfg.revision, cfg.dtype, cfg.device, *extra)


def clear_cache() -> None:
    """Forget every loaded model (tests; freeing memory between runs)."""
    with _LOCK:
        _CACHE.clear()


def load_student(cfg: ModelConfig) -> Student:
    """The student VLM of ``cfg`` (backend ``hf``); cached per process."""
    if cfg.backend != "hf":
        raise ModelLoadError(f"student {cfg.model_id!r}: backend {cfg.backend!r} is not 'hf'")
    return _load_vlm(cfg)


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
            cfg.model_id, cfg.revision, cfg.dtype, cfg.device, batch_size=cfg.batch_size
        ),
    )


def _load_vlm(cfg: ModelConfig) -> Any:
    _require_id(cfg)
    from icd.models.hf import HFVLM

    base = _cached(
        _key(cfg),
        lambda: HFVLM(
            cfg.model_id,
            cfg.revision,
            cfg.dtype,
            cfg.device,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
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
