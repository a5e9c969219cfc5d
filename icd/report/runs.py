"""The runs under a storage root, newest first: what ``icd runs`` lists and what
``icd report latest`` opens.

Read from each run folder (``ROOT/runs/RUN_ID``, written by the ``stream`` flow) without
loading its predictions: ``summary.json`` (written when the run finishes), ``config.json``
(written when it starts) and ``state/chunk-NNNNN.json`` (one per committed chunk, with the
running numbers after it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from icd.method.accounting import ChunkSums, RunSummary
from icd.report.tables import fmt_pct


@dataclass(frozen=True)
class RunListing:
    """One run folder as ``icd runs`` shows it.

    ``finished`` is True once ``summary.json`` exists; until then ``accuracy`` and
    ``annotation_rate`` are the running values after the last committed chunk (None
    before the first). ``total`` is the stream length when the config caps it
    (``data.limit``), else None, and ``total_chunks`` the chunks that length makes.
    ``when`` is the time of the run's last write: its summary, or its last committed
    chunk, or (nothing committed yet) its config.
    """

    run_id: str
    folder: Path
    mode: str | None
    dataset: str | None
    finished: bool
    chunks: int
    samples: int | None
    total: int | None
    total_chunks: int | None
    accuracy: float | None
    annotation_rate: float | None
    when: datetime


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime)


def read_run(folder: Path) -> RunListing | None:
    """The listing of one run folder, or None if ``folder`` holds no run (neither a
    config, nor a summary, nor a committed chunk)."""
    folder = Path(folder)
    summary_path, config_path = folder / "summary.json", folder / "config.json"
    states = sorted((folder / "state").glob("chunk-*.json"))
    if not (summary_path.exists() or config_path.exists() or states):
        return None
    config = _json(config_path)
    data, method = config.get("data", {}), config.get("method", {})
    last = _json(states[-1]) if states else {}
    stored = _json(summary_path)
    summary = RunSummary.from_json(stored) if stored else None
    if summary is not None:
        ratios = summary.ratios
        samples: int | None = summary.samples
    else:  # the running numbers after the last committed chunk
        ratios = ChunkSums.from_json(last.get("running") or {}).ratios
        samples = (last.get("counters") or {}).get("samples_seen")
    finished = summary is not None
    limit = data.get("limit")
    total = samples if finished else (limit if isinstance(limit, int) else None)
    chunk_size = config.get("pipeline", {}).get("chunk_size")
    total_chunks = len(states) if finished else None
    if not finished and total and isinstance(chunk_size, int) and chunk_size > 0:
        total_chunks = -(-total // chunk_size)
    stamp = summary_path if finished else (states[-1] if states else config_path)
    return RunListing(
        run_id=(summary and summary.run_id) or folder.name,
        folder=folder.absolute(),
        mode=(summary and summary.mode) or method.get("mode"),
        dataset=(summary and summary.dataset) or data.get("dataset"),
        finished=finished,
        chunks=len(states),
        samples=samples,
        total=total,
        total_chunks=total_chunks,
        accuracy=ratios.accuracy,
        annotation_rate=ratios.annotation_rate,
        when=_mtime(stamp),
    )


def list_runs(root: Path, limit: int | None = None) -> list[RunListing]:
    """The runs under storage root ``root``, newest first (by :attr:`RunListing.when`),
    at most ``limit`` of them (None: all). An absent ``ROOT/runs`` gives an empty list."""
    base = Path(root).absolute() / "runs"
    found = [read_run(p) for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
    runs = sorted((r for r in found if r is not None), key=lambda r: r.when, reverse=True)
    return runs if limit is None else runs[: max(limit, 0)]


def latest_run(root: Path) -> Path | None:
    """The folder of the newest run under storage root ``root``, finished or not."""
    runs = list_runs(root, limit=1)
    return runs[0].folder if runs else None


def _status(run: RunListing) -> str:
    if run.finished:
        return "finished"
    if run.total_chunks:
        return f"{run.chunks}/{run.total_chunks} chunks"
    return f"{run.chunks} chunk" + ("" if run.chunks == 1 else "s")


def _ago(when: datetime, now: datetime) -> str:
    seconds = (now - when).total_seconds()
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h ago"
    if seconds < 30 * 86400:
        return f"{seconds // 86400:.0f}d ago"
    return when.strftime("%Y-%m-%d")


def runs_rich_table(runs: list[RunListing], now: datetime | None = None, width: int = 100) -> Table:
    """A rich table of ``runs`` meant for 100 columns: run id (never folded, so it can be
    copied into ``icd report``), mode, dataset (a column only when the runs span several;
    otherwise the caption names it), status (``finished``, or the chunks committed out of
    the chunks the stream makes), accuracy and annotation rate (so far, in italics, for an
    unfinished run), and how long ago it last wrote. Where a row would not fit ``width``
    columns, the mode (and dataset) are cut short with an ellipsis; nothing else is."""
    now = now or datetime.now()
    datasets = sorted({r.dataset or "?" for r in runs})
    several = len(datasets) > 1
    rows = []
    for run in runs:
        cells = [run.run_id, run.mode or "?", *([run.dataset or "?"] if several else [])]
        cells += [_status(run), fmt_pct(run.accuracy), fmt_pct(run.annotation_rate)]
        rows.append((cells + [_ago(run.when, now)], run.finished))
    headers = ["run", "mode", *(["dataset"] if several else [])]
    headers += ["status", "accuracy", "annotated", "when"]
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1))
    if not several:
        table.caption = f"dataset: {datasets[0]}" if datasets else None
        table.caption_justify = "left"
    naturals = [max([len(h), *(len(cells[i]) for cells, _ in rows)]) for i, h in enumerate(headers)]
    flexible = [i for i, h in enumerate(headers) if h in ("mode", "dataset")]
    fixed = sum(w for i, w in enumerate(naturals) if i not in flexible) + 2 * (len(headers) - 1)
    room = max(width - fixed, 2 * len(flexible))
    for i, header in enumerate(headers):
        # Every column but the mode and dataset keeps its full width; those share the rest.
        share = max(2, room * naturals[i] // sum(naturals[j] for j in flexible))
        table.add_column(
            header,
            no_wrap=True,
            overflow="ellipsis",
            min_width=naturals[i] if i not in flexible else None,
            max_width=min(naturals[i], share) if i in flexible else None,
            justify="right" if header in ("accuracy", "annotated", "when") else "left",
        )
    for cells, finished in rows:
        table.add_row(*cells, style=None if finished else "italic")
    return table
