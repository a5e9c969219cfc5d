"""A benchmark's cells fanned out over a Prefect work pool (``benchmark.executor:
deployments``): each cell is a run of the ``icd/stream`` deployment, picked up by whichever
worker of the pool is free (one worker per GPU or node).

The parent submits at most ``max_parallel`` cells at a time (``run_deployment(...,
timeout=0)``), polls their states, and hands each finished cell's outcome back as it
arrives. A cell's summary is read from its run folder (``ROOT/runs/RUN_ID/summary.json``),
so the storage root must be shared by the parent and the workers (one machine, a network
file system, or object storage for the pool and a tracking server for MLflow).

Resume: the parent records each cell's flow-run id in a ledger beside the benchmark's other
files. Started again with the same benchmark id, it reuses every cell whose run folder has a
summary and submits only the others. A cell a previous parent submitted that is still
queued is waited for; one that had started (on a worker since killed, or under a parent
since killed) is taken over: its old flow run is cancelled — a live worker stops it; a dead
one's run is marked cancelled after ``takeover_s`` — and a new run of the same ICD run id
resumes after its last committed chunk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from icd.method.accounting import RunSummary
from icd.storage.locks import merge_json

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

LEDGER_FILE = "cells.json"  # ICD run id → Prefect flow-run id of its latest submission


@dataclass(frozen=True)
class Cell:
    """One cell to run: its ICD run id, the deployment's parameters, its flow-run tags."""

    run_id: str
    parameters: dict[str, Any]
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """How a cell ended: its summary, or the error that stopped it; ``reused`` when a
    previous parent's run had finished it."""

    summary: RunSummary | None
    error: str | None
    flow_run_id: str | None
    reused: bool = False


class FanoutError(RuntimeError):
    """The work pool cannot be used (no server, no deployment)."""


def read_summary(root: Path, run_id: str) -> RunSummary | None:
    """The summary a finished stream run wrote, or None while it has not finished."""
    path = root / "runs" / run_id / "summary.json"
    if not path.exists():
        return None
    return RunSummary.from_json(json.loads(path.read_text()))


def run_cells(
    cells: Sequence[Cell],
    *,
    deployment: str,
    root: Path,
    folder: Path,
    max_parallel: int,
    work_queue: str | None,
    poll_s: float,
    takeover_s: float,
    on_done: Callable[[Cell, Outcome], None],
    log: Any,
) -> None:
    """Run ``cells`` as runs of ``deployment``, at most ``max_parallel`` at once, calling
    ``on_done`` for each as it ends (reused cells first). A failed cell is an outcome with
    its error; the others go on. Call :func:`check_pool` first: this assumes a server that
    knows ``deployment``."""
    from prefect import get_client

    ledger_path = folder / LEDGER_FILE
    ledger: dict[str, str] = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    with get_client(sync_client=True) as client:
        todo = _reuse_finished(cells, root=root, ledger=ledger, on_done=on_done)
        active = _resume_submitted(
            client, todo, ledger=ledger, takeover_s=takeover_s, poll_s=poll_s, log=log
        )
        log.info(
            "%d cells on deployment %s: %d finished before, %d still queued, %d to run "
            "(%d at a time)",
            len(cells), deployment, len(cells) - len(todo) - len(active), len(active),
            len(todo), max_parallel,
        )  # fmt: skip
        while todo or active:
            while todo and len(active) < max_parallel:
                cell = todo.pop(0)
                run_id = _submit(cell, deployment=deployment, work_queue=work_queue)
                active[run_id] = cell
                ledger[cell.run_id] = str(run_id)
                # merged under the ledger's lock: another parent of this benchmark keeps its
                # entries (a plain rewrite of this process's copy would drop them)
                merge_json(ledger_path, {cell.run_id: str(run_id)})
                log.info("submitted %s as flow run %s", cell.run_id, run_id)
            time.sleep(poll_s)
            for run in _read_runs(client, list(active)):
                if run.state is None or not run.state.is_final():
                    continue
                cell = active.pop(run.id)
                on_done(cell, _outcome(root, cell, run))


def _reuse_finished(
    cells: Sequence[Cell],
    *,
    root: Path,
    ledger: Mapping[str, str],
    on_done: Callable[[Cell, Outcome], None],
) -> list[Cell]:
    """Hand back each cell whose run folder has a summary as reused; the others, to run."""
    todo: list[Cell] = []
    for cell in cells:
        summary = read_summary(root, cell.run_id)
        if summary is None:
            todo.append(cell)
        else:
            on_done(cell, Outcome(summary, None, ledger.get(cell.run_id), reused=True))
    return todo


def _resume_submitted(
    client: Any,
    todo: list[Cell],
    *,
    ledger: Mapping[str, str],
    takeover_s: float,
    poll_s: float,
    log: Any,
) -> dict[UUID, Cell]:
    """The cells of ``todo`` a previous parent submitted: one still queued is waited for
    (moved from ``todo`` to the active cells returned); one started is taken over (its
    flow run cancelled, the cell left in ``todo`` to run again)."""
    active: dict[UUID, Cell] = {}
    by_run = {UUID(ledger[c.run_id]): c for c in todo if c.run_id in ledger}
    started: list[UUID] = []
    for run in _read_runs(client, list(by_run)):
        if run.state is None or run.state.is_final():
            continue  # finished without a summary, failed or cancelled: run it again
        if run.state.is_scheduled():  # still queued: any live worker takes it; wait
            active[run.id] = by_run[run.id]
            todo.remove(by_run[run.id])
        else:  # pending or running under a previous parent: maybe on a dead worker
            started.append(run.id)
    if started:
        _take_over(client, started, wait_s=takeover_s, poll_s=poll_s, log=log)
    return active


def _submit(cell: Cell, *, deployment: str, work_queue: str | None) -> UUID:
    """Submit ``cell`` as a run of ``deployment`` without waiting; its flow-run id."""
    from prefect.deployments import run_deployment

    run = cast(
        "FlowRun",
        run_deployment(
            deployment,
            parameters=cell.parameters,
            timeout=0,
            flow_run_name=cell.run_id,
            tags=list(cell.tags),
            work_queue_name=work_queue,
        ),
    )  # a FlowRun: called from sync code
    return run.id


def check_pool(deployment: str) -> None:
    """Raise :class:`FanoutError` (one line) unless a Prefect server is configured and
    knows ``deployment``."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise FanoutError(
            "benchmark.executor=deployments needs a Prefect server with workers: set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(deployment)
    except ObjectNotFound:
        raise FanoutError(
            f"no deployment {deployment!r} on {PREFECT_API_URL.value()}: run "
            "`prefect --no-prompt deploy --all` in the project folder"
        ) from None


def _read_runs(client: Any, ids: list[UUID]) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    if not ids:
        return []
    runs: list[Any] = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids)
    )
    return runs


def _outcome(root: Path, cell: Cell, run: Any) -> Outcome:
    fid = str(run.id)
    if run.state.is_completed():
        summary = read_summary(root, cell.run_id)
        if summary is not None:
            return Outcome(summary, None, fid)
        return Outcome(None, f"completed without a summary in {root / 'runs' / cell.run_id}", fid)
    message = run.state.message or "no message"
    return Outcome(None, f"flow run {run.state.name}: {message}", fid)


def _take_over(client: Any, ids: list[UUID], *, wait_s: float, poll_s: float, log: Any) -> None:
    """Cancel the started runs a previous parent left: a live worker stops its run on
    Cancelling; a run still not final after ``wait_s`` (its worker is gone) is marked
    Cancelled."""
    from prefect.states import Cancelled, Cancelling

    for rid in ids:
        log.info("taking over flow run %s: cancelling it, then running its cell again", rid)
        client.set_flow_run_state(rid, state=Cancelling(), force=True)
    deadline = time.monotonic() + wait_s
    left = list(ids)
    while left and time.monotonic() < deadline:
        time.sleep(poll_s)
        left = [r.id for r in _read_runs(client, left) if r.state and not r.state.is_final()]
    for rid in left:
        client.set_flow_run_state(
            rid, state=Cancelled(message="its worker is gone; taken over"), force=True
        )
