"""What a run shows in the Prefect UI: the flow run named after the ICD run id and tagged
with its mode, dataset and preset; a progress artifact that advances with every committed
chunk; at the end a markdown headline (ICD against the student alone and against forwarding
the teacher's labels, annotation rate, teacher calls, cost, where the results are) and a
table artifact of the summary.

Every function is a no-op outside a Prefect flow run, and a failure to reach the Prefect
API is logged, never raised: the UI is a view of the run, not part of it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from icd.method.accounting import RunSummary
from icd.report.tables import fmt_count, fmt_pct

log = logging.getLogger(__name__)


def _flow_run_id() -> UUID | None:
    from prefect.runtime import flow_run

    fid = flow_run.get_id()
    return UUID(str(fid)) if fid else None


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) made from ``text``."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:120] or "icd"


def name_flow_run(*, name: str, tags: Sequence[str]) -> None:
    """Rename the current flow run to ``name`` and add ``tags`` to it."""
    fid = _flow_run_id()
    if fid is None:
        return
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            current = client.read_flow_run(fid)
            merged = sorted({*current.tags, *(t for t in tags if t)})
            client.update_flow_run(fid, name=name, tags=merged)
    except Exception as e:  # noqa: BLE001 - the UI is a view, never the run's failure
        log.warning("could not name the Prefect flow run: %s", e)


class Progress:
    """A progress artifact of the run (0–100 %), advanced per chunk; inert outside a flow
    run or when the stream's length is unknown."""

    EVERY_S = 2.0

    def __init__(self, *, run_id: str, total: int | None) -> None:
        self.total = total
        self._updated = float("-inf")
        self.artifact: UUID | None = None
        if total and _flow_run_id() is not None:
            try:
                from prefect.artifacts import create_progress_artifact

                made = create_progress_artifact(
                    0.0, key=artifact_key(f"{run_id}-progress"), description=f"{run_id}: samples"
                )
                self.artifact = made if isinstance(made, UUID) else None  # sync: a UUID
            except Exception as e:  # noqa: BLE001
                log.warning("no Prefect progress artifact: %s", e)

    def update(self, samples: int) -> None:
        """Advance to ``samples`` done: at most once every ``EVERY_S`` seconds (each update
        is a call to the Prefect API), and always at the end."""
        if self.artifact is None or not self.total:
            return
        now = time.monotonic()
        if now - self._updated < self.EVERY_S and samples < self.total:
            return
        self._updated = now
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact, min(100.0, 100.0 * samples / self.total))
        except Exception as e:  # noqa: BLE001
            log.warning("could not advance the Prefect progress artifact: %s", e)
            self.artifact = None


def _points(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):+.1f} pts"


def headline(summary: RunSummary, *, mlflow_url: str | None = None) -> str:
    """The run's headline as markdown: accuracy against the same-run baselines (the
    student alone and forwarding the teacher's labels), teacher use and cost, and where the
    results are."""
    s = summary
    lines = [
        f"# {s.run_id}: {s.mode} on {s.dataset}",
        "",
        "| | accuracy |",
        "|---|---|",
        f"| **this run ({s.mode})** | **{fmt_pct(s.accuracy)}** |",
    ]
    if s.zs_accuracy is not None:
        lines.append(f"| the student alone (zero-shot) | {fmt_pct(s.zs_accuracy)} |")
    if s.forward_accuracy is not None:
        lines.append(f"| forwarding the teacher's labels, no ICL | {fmt_pct(s.forward_accuracy)} |")
    lines += [
        "",
        f"- gain from in-context learning: {_points(s.gains.from_icl)}; from the "
        f"forwarded teacher labels: {_points(s.gains.from_teacher_labels)}",
        f"- teacher labelled {fmt_pct(s.annotation_rate)} of the samples "
        f"({fmt_count(s.queried)} queried, {fmt_count(s.accepted)} admitted to the pool, "
        f"{fmt_count(s.teacher_calls)} teacher answers generated)",
    ]
    if s.demo_accuracy is not None:
        lines.append(f"- demonstrations of the query's class: {fmt_pct(s.demo_accuracy)}")
    if s.seconds:
        parts = ", ".join(f"{k} {float(v):.1f}s" for k, v in s.seconds.items())
        lines.append(f"- stage time {s.stage_seconds:.1f}s ({parts})")
    lines.append(f"- results: `{s.run_dir}`")
    if mlflow_url:
        lines.append(f"- MLflow run: [{s.mlflow_run_id}]({mlflow_url})")
    elif s.mlflow_run_id:
        lines.append(f"- MLflow run id: `{s.mlflow_run_id}`")
    return "\n".join(lines) + "\n"


def mlflow_description(
    summary: RunSummary,
    *,
    mlflow_run_id: str,
    bars: str | None = None,
    curves: str | None = None,
) -> str:
    """The MLflow run page's description (``mlflow.note.content``, markdown, on the
    Overview tab the UI opens on): ``bars`` (an artifact path), the run's final accuracy and
    its same-run baselines' on one axis, linked to ``curves`` (the same over the stream);
    the line it draws is its alt text (the whole description without ``bars``). The UI
    folds a description taller than about 90 px, which then hides what it holds, so it
    holds nothing more. Artifacts are addressed relative to the UI's own page, so they show
    wherever the UI is served."""
    from urllib.parse import quote

    def src(path: str) -> str:
        return f"get-artifact?path={quote(path, safe='')}&run_uuid={mlflow_run_id}"

    line = (
        f"{summary.mode} {fmt_pct(summary.accuracy)} vs the student alone "
        f"{fmt_pct(summary.zs_accuracy)} vs forwarding the teacher's labels "
        f"{fmt_pct(summary.forward_accuracy)}"
    )
    shown = f"![{line}]({src(bars)})" if bars else f"**{line}**"
    return f"[{shown}]({src(curves)})" if curves else shown


def summary_rows(summary: RunSummary) -> list[dict[str, str]]:
    """The summary as (metric, value) rows: its numbers (by their names in
    ``summary.json``), with the units the headline uses (%, points, s), and short
    strings."""
    from icd.report import fmt_value

    rows = []
    for key, value in summary.to_json().items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            rows.append({"metric": key, "value": fmt_value(key, value)})
        elif isinstance(value, str) and len(value) < 200:
            rows.append({"metric": key, "value": value})
    return rows


def publish_run(summary: RunSummary, *, mlflow_url: str | None = None) -> None:
    """The end-of-run markdown headline and summary table artifacts."""
    if _flow_run_id() is None:
        return
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        key = artifact_key(str(summary.run_id))
        create_markdown_artifact(
            headline(summary, mlflow_url=mlflow_url),
            key=f"{key}-headline",
            description="ICD against the same-run baselines",
        )
        create_table_artifact(
            summary_rows(summary), key=f"{key}-summary", description="the run's summary"
        )
    except Exception as e:  # noqa: BLE001
        log.warning("no Prefect artifacts for the run: %s", e)


def publish_table(rows: list[dict[str, Any]], *, key: str, description: str) -> None:
    """A table artifact (a benchmark's comparison)."""
    if _flow_run_id() is None:
        return
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(rows, key=artifact_key(key), description=description)
    except Exception as e:  # noqa: BLE001
        log.warning("no Prefect table artifact: %s", e)


def mlflow_run_url(
    tracking_uri: str, *, experiment_id: str | None, run_id: str | None
) -> str | None:
    """The MLflow UI address of a run when the tracking store is a server (http[s])."""
    if not (run_id and experiment_id and tracking_uri.startswith(("http://", "https://"))):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
