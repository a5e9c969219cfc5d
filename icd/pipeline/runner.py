"""How the stream flow runs its stages: the one place that decides call vs submit, quoting,
Dask vs threads, and how many chunks run ahead."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prefect.utilities.annotations import quote

from icd.data.types import Chunk
from icd.pipeline.context import ChunkWork, RunContext

# Most chunks that were in flight at once in this process (instrumentation for lookahead).
IN_FLIGHT_PEAK = [0]


class Runner:
    """Runs Prefect tasks for one stream run.

    - ``now``: in the flow's thread, returning the task's final state;
    - ``ahead``: submitted to the task runner when ``pipeline.lookahead`` > 0 (a future),
      else ``now`` (in order, nothing to overlap);
    - ``background``: submitted, except on Dask, where it runs ``now`` (in order: each Dask
      worker would commit the pool through a handle of its own).

    Bulky arguments (a chunk with its images, votes, arrays) are passed as ``quote(...)``:
    Prefect then hands them over as they are instead of walking every nested object for
    futures on each call (cache keys see the unquoted values). Not to Dask, which turns
    tuple subclasses such as ``quote`` into plain tuples. Tasks that persist results store
    them under ``ctx.cache_dir``.
    """

    def __init__(self, ctx: RunContext, *, on_dask: bool) -> None:
        self.lookahead = ctx.cfg.pipeline.lookahead
        self.on_dask = on_dask
        self._cache_dir = ctx.cache_dir
        self._bound: dict[Any, Any] = {}

    def _task(self, task: Any) -> Any:
        if task not in self._bound:
            persist = task.persist_result
            self._bound[task] = (
                task.with_options(result_storage=self._cache_dir) if persist else task
            )
        return self._bound[task]

    def now(self, task: Any, **kwargs: Any) -> Any:
        """Run ``task`` here and now; its final state."""
        args = {k: quote(v) for k, v in kwargs.items()}
        return self._task(task)(**args, return_state=True)

    def _submit(self, task: Any, **kwargs: Any) -> Any:
        args = kwargs if self.on_dask else {k: quote(v) for k, v in kwargs.items()}
        return self._task(task).submit(**args)

    def ahead(self, task: Any, **kwargs: Any) -> Any:
        """Run ``task`` ahead of the sequential stages when lookahead is on (a future)."""
        return self._submit(task, **kwargs) if self.lookahead else self.now(task, **kwargs)

    def background(self, task: Any, **kwargs: Any) -> Any:
        """Run ``task`` while the flow goes on (in order on Dask)."""
        return self.now(task, **kwargs) if self.on_dask else self._submit(task, **kwargs)

    def window(
        self, chunks: Iterator[Chunk], *, start: Callable[[Chunk], ChunkWork]
    ) -> Iterator[ChunkWork]:
        """The chunks in order, each started by ``start`` (its pool-independent stages)
        up to ``lookahead`` chunks before the flow reaches it. An empty chunk ends the
        stream."""
        in_flight: deque[ChunkWork] = deque()
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
            IN_FLIGHT_PEAK[0] = max(IN_FLIGHT_PEAK[0], len(in_flight))
            yield in_flight.popleft()


def is_fresh(run: Any) -> bool:
    """Whether a stage (its future, or its final state) ran, rather than its result coming
    from the task cache (a persisted result carries the numbers of the run that made it)."""
    return getattr(run, "state", run).name != "Cached"


def fresh_seconds(run: Any, result: dict[str, Any]) -> float:
    """Seconds a stage really spent: 0 when its result came from the task cache."""
    return float(result["seconds"]) if is_fresh(run) else 0.0
