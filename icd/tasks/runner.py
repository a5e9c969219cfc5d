"""How the stream flow runs its stages: the one place that decides call vs submit, quoting,
Dask vs threads and how many chunks run ahead, and that keeps the stages' books (seconds
spent, results computed or taken from the task cache)."""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar

from prefect import Task
from prefect.utilities.annotations import quote

from icd.data.types import Chunk

T = TypeVar("T")
P = ParamSpec("P")

# The stages, in pipeline order: each is a module of icd.tasks, a Prefect task, a timing
# key and a log name.
STAGES = ("embed", "zero_shot", "annotate", "pool", "icl", "adapt", "evaluate")


@dataclass(frozen=True)
class Timed(Generic[T]):
    """A stage task's result with the seconds its body took (:func:`timed`)."""

    value: T
    seconds: float


def timed(fn: Callable[P, T]) -> Callable[P, Timed[T]]:
    """``fn`` returning :class:`Timed`: every stage is timed the same way, around its body
    in whichever process runs it (a persisted result keeps the seconds of the run that
    computed it; the runner counts 0 for a result from the task cache)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> Timed[T]:
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        return Timed(value, time.perf_counter() - t0)

    return run


@dataclass(frozen=True)
class StageRun(Generic[T]):
    """One stage's result for one chunk, as the runner booked it."""

    value: T
    seconds: float  # 0.0 when the result came from the task cache
    cached: bool


@dataclass
class Books:
    """Per stage: seconds this run spent computing results, and chunks whose result came
    from the task cache (another run, or an earlier attempt of this one, made it); and the
    most chunks in flight at once."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    cached: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    in_flight_peak: int = 0  # most chunks started at once (lookahead at work)

    @classmethod
    def resumed(cls, *, seconds: Mapping[str, float], cached: Mapping[str, int]) -> Books:
        """The books of a run resumed with these ``seconds`` and ``cached`` counts."""
        books = cls()
        books.seconds.update(seconds)
        books.cached.update(cached)
        return books

    def book(self, stage: str, *, seconds: float, cached: bool) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.cached[stage] = self.cached.get(stage, 0) + int(cached)


@dataclass(frozen=True)
class Pending(Generic[T]):
    """A stage submitted to the task runner (a future), or already run (its final state)."""

    stage: str
    handle: Any


class Runner:
    """Runs one stream run's stage tasks and books them.

    - ``now``: in the flow's thread;
    - ``ahead``: submitted to the task runner when ``pipeline.lookahead`` > 0, else run now
      (in order, nothing to overlap);
    - ``background``: submitted, except on Dask, where it runs now (in order: each Dask
      worker would commit the pool through a handle of its own);
    - ``wait``: a submitted stage's result; ``call``: a plain function timed as a stage.

    Bulky arguments (a chunk with its images, votes, arrays) are passed as ``quote(...)``:
    Prefect then hands them over as they are instead of walking every nested object for
    futures on each call (cache keys see the unquoted values). Not to Dask, which turns
    tuple subclasses such as ``quote`` into plain tuples. Tasks that persist results store
    them under ``cache_dir``.
    """

    def __init__(self, *, lookahead: int, on_dask: bool, cache_dir: Any, books: Books) -> None:
        self.lookahead = lookahead
        self.on_dask = on_dask
        self.books = books
        self._cache_dir = cache_dir
        self._bound: dict[Any, Any] = {}

    def _task(self, task: Task[..., Any]) -> Task[..., Any]:
        if task not in self._bound:
            persist = task.persist_result
            self._bound[task] = (
                task.with_options(result_storage=self._cache_dir) if persist else task
            )
        return self._bound[task]

    def _here(self, task: Task[..., Timed[T]], kwargs: Mapping[str, object]) -> Pending[T]:
        args = {k: quote(v) for k, v in kwargs.items()}
        return Pending(task.name, self._task(task)(**args, return_state=True))

    def _submit(self, task: Task[..., Timed[T]], kwargs: Mapping[str, object]) -> Pending[T]:
        args = kwargs if self.on_dask else {k: quote(v) for k, v in kwargs.items()}
        return Pending(task.name, self._task(task).submit(**args))

    def now(self, task: Task[..., Timed[T]], **kwargs: Any) -> StageRun[T]:
        """Run ``task`` here and now, and book it."""
        return self.wait(self._here(task, kwargs))

    def ahead(self, task: Task[..., Timed[T]], **kwargs: Any) -> Pending[T]:
        """Run ``task`` ahead of the sequential stages when lookahead is on."""
        return self._submit(task, kwargs) if self.lookahead else self._here(task, kwargs)

    def background(self, task: Task[..., Timed[T]], **kwargs: Any) -> Pending[T]:
        """Run ``task`` while the flow goes on (in order on Dask)."""
        return self._here(task, kwargs) if self.on_dask else self._submit(task, kwargs)

    def wait(self, pending: Pending[T]) -> StageRun[T]:
        """The stage's result (raising its error), booked: its seconds when it ran, 0 when
        its result came from the task cache."""
        out: Timed[T] = pending.handle.result()  # a future's, or a final state's
        cached = getattr(pending.handle, "state", pending.handle).name == "Cached"
        seconds = 0.0 if cached else out.seconds
        self.books.book(pending.stage, seconds=seconds, cached=cached)
        return StageRun(out.value, seconds, cached)

    def call(self, stage: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """A stage that is a plain call (no task run: it would cost more than its work),
        timed and booked as the tasks are."""
        out = timed(fn)(**kwargs)
        self.books.book(stage, seconds=out.seconds, cached=False)
        return out.value

    def window(self, chunks: Iterator[Chunk], *, start: Callable[[Chunk], T]) -> Iterator[T]:
        """The chunks in order, each started by ``start`` (its pool-independent stages)
        up to ``lookahead`` chunks before the flow reaches it. An empty chunk ends the
        stream."""
        in_flight: deque[T] = deque()
        exhausted = False
        while True:
            while len(in_flight) <= self.lookahead and not exhausted:
                chunk = next(chunks, None)
                if chunk is None or not chunk.samples:
                    exhausted = True
                    break
                in_flight.append(start(chunk))
            if not in_flight:
                return
            self.books.in_flight_peak = max(self.books.in_flight_peak, len(in_flight))
            yield in_flight.popleft()
