"""What every stage task shares: how it is declared (:func:`stage`), its cache key, its
retries, the run's pool handle and the zero-shot prompt.

Each stage's cache key is declared once, next to it (:func:`stage_cache`): the config
fields it reads (``RunContext.fingerprint``), the identity of locally stored weights of the
models among them, the chunk's content digest (``Chunk.key``: every sample's image bytes,
question, answers and skip reason; never decoded images, row positions or object
identity), the stage's own inputs named there, the cache scope and the task's source.
Results are persisted (under ``storage.cache_dir``, by default ``ROOT/cache``), so a new
process (a resumed run, a re-run) reuses them; the other stages never reuse results (they
are cheap, or they write).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict, TypeVar

from prefect import Task, task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.tasks import exponential_backoff

from icd.config import ModelConfig
from icd.data.images import image_id
from icd.data.stream import files_digest
from icd.data.types import Chunk
from icd.method.prompts import build_prompt
from icd.method.types import Prompt
from icd.storage.pool import DemoPool
from icd.tasks.context import RunContext
from icd.tasks.runner import Timed, timed

T = TypeVar("T")


# A stage task's parameters by name, as Prefect hands them to a cache key function.
TaskParameters = dict[str, Any]


def stage_cache(
    *fields: str, inputs: Callable[[TaskParameters], object] = lambda p: None
) -> CachePolicy:
    """The cache policy of a stage that reads the config ``fields`` (dotted paths; model
    sections add the identity of their local weights, :func:`weights_identity`) and whose
    own inputs beyond the run and the chunk are ``inputs(parameters)`` (JSON-able)."""
    models = [f for f in fields if f.startswith("models.")]

    def key(context: Any, parameters: TaskParameters) -> str:
        ctx: RunContext = parameters["ctx"]
        chunk: Chunk = parameters["chunk"]
        weights = [ctx.memo(("weights", f), _weights_of(ctx, f)) for f in models]
        own = json.dumps(inputs(parameters), sort_keys=True, default=str)
        text = "|".join([ctx.fingerprint(fields), *weights, chunk.key, own, ctx.scope])
        return hashlib.sha256(text.encode()).hexdigest()

    return TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=key)


# A model config names a model (backend, id, revision); where the id is a local folder
# (a ``fixtures/`` model, a path) the weights can change under the same name, so the key
# also covers a digest of the folder's files.
_WEIGHTS: dict[tuple[Any, ...], str] = {}
_WEIGHTS_LOCK = threading.Lock()


def _weights_of(ctx: RunContext, field: str) -> Callable[[], str]:
    section: ModelConfig = getattr(ctx.cfg.models, field.split(".")[1])
    return lambda: weights_identity(section)


def weights_identity(cfg: ModelConfig) -> str:
    """A digest of the files of a model stored in a local folder (``fixtures/...`` ids and
    paths): names, sizes, and the first and last MiB of each file. "" for a hub id (its
    revision names the weights) and for backends without weights. Memoised per process on
    the files' sizes and modification times."""
    if cfg.backend != "hf":
        return ""
    try:
        from icd.models.fixtures import resolve_model_path

        folder = resolve_model_path(cfg.model_id)
    except Exception:  # an unknown id fails where the model is loaded, with its own message
        return ""
    if folder is None:
        return ""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    stats = tuple((str(p), *_stat(p)) for p in files)
    with _WEIGHTS_LOCK:
        if stats not in _WEIGHTS:
            _WEIGHTS[stats] = files_digest([p for p, _, _ in stats], str(folder))
        return _WEIGHTS[stats]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed model stage unless the failure is a configuration mistake (bad model
    id, wrong API key or URL), which no retry can fix."""
    from icd.models import ModelLoadError, ModelOOMError
    from icd.models.openai import TeacherConfigError

    try:
        state.result()
    except (ModelLoadError, ModelOOMError, TeacherConfigError, ValueError):
        return False
    except Exception:
        return True
    return True


class Retries(TypedDict):
    """Prefect's retry options of a task."""

    retries: int
    retry_delay_seconds: Callable[[int], list[float]]
    retry_jitter_factor: float
    retry_condition_fn: Callable[[Any, Any, Any], bool]


MODEL_RETRIES = Retries(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=0.5),
    retry_jitter_factor=0.5,
    retry_condition_fn=_transient,
)

_POOLS: dict[str, DemoPool] = {}


def open_pool(uri: str) -> DemoPool:
    """This process's handle on the pool at ``uri`` (its vector cache is reused by tasks)."""
    if uri not in _POOLS:
        _POOLS[uri] = DemoPool(uri)
    return _POOLS[uri]


def zero_shot_prompts(
    samples: list[Any], *, task_type: str, class_names: list[str] | None
) -> list[Prompt]:
    """The query-only prompt of each sample."""
    return [
        build_prompt(
            s.question, s.image, task=task_type, class_names=class_names,
            image_ids=[image_id(s.sample_id, s.image_bytes)],
        )
        for s in samples
    ]  # fmt: skip


def stage(
    name: str, *, cache_policy: CachePolicy, persist: bool = True, **options: Any
) -> Callable[[Callable[..., T]], Task[..., Timed[T]]]:
    """Declare a stage's body as its Prefect task: named ``name`` (its task runs
    ``NAME-chunkN``), timed by the runner's one rule (:func:`icd.tasks.runner.timed`),
    with ``cache_policy`` (results persisted when ``persist``) and Prefect's task
    ``options`` (retries)."""

    def declare(fn: Callable[..., T]) -> Task[..., Timed[T]]:
        return task(
            name=name,
            task_run_name=f"{name}-chunk{{chunk.index}}",
            cache_policy=cache_policy,
            persist_result=persist,
            **options,
        )(timed(fn))

    return declare


def finite_or_none(x: float) -> float | None:
    """An uncertainty as stored: None for NaN (the student failed to answer)."""
    return None if x != x else float(x)
