"""MLflow lineage for a run: one MLflow run per ICD run, resumable without duplicates.

A :class:`Tracker` writes through ``MlflowClient`` with explicit run ids (no global
"active run"), so several trackers (a benchmark parent and its child runs) can live in
one process. The MLflow run of an ICD run is found again by its ``icd.run_id`` tag:
starting the same run id a second time reopens that MLflow run, skips params that are
already logged and metric steps that are already recorded.

Secrets never reach MLflow: config keys that hold keys/tokens/passwords are dropped
(``api_key_env`` — the *name* of the environment variable — is kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import polars as pl
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.polars_dataset import from_polars
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from icd.data.types import DatasetInfo
from icd.errors import one_line
from icd.jsontypes import JSONObject
from icd.storage.locks import atomic_file, file_lock, remove_leftovers

log = logging.getLogger(__name__)
_T = TypeVar("_T")

RUN_ID_TAG = "icd.run_id"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
DATASET_CONTEXT_TAG = "mlflow.data.context"
MODEL_TAG = "icd.model."
_SECRET = re.compile(r"(api_?key|secret|password|passwd|credential|(^|_)token$|^auth)", re.I)
_SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|xox[bp]-)[A-Za-z0-9_\-]{8,}")


# The MLflow UI opens an experiment of this kind on its runs table (the "Model training"
# view), not on the GenAI traces overview that an untagged experiment may land on.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or rejected a write (one-line message)."""


def is_secret(key: str, value: object = None) -> bool:
    """True for a config key (last dotted part) or value that looks like a credential.

    Keys naming an environment variable (``*_env``) are not secrets: they hold a name.
    """
    name = key.rsplit(".", 1)[-1]
    if name.endswith("_env"):
        return False
    if _SECRET.search(name):
        return True
    return isinstance(value, str) and bool(_SECRET_VALUE.match(value))


def flatten(config: Mapping[str, object], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"a.b.c": str(value)}``; lists/dicts-in-lists as JSON, secrets dropped."""
    out: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
            continue
        if is_secret(dotted, value):
            continue
        if isinstance(value, list | tuple | dict):
            text = json.dumps(value, default=str, sort_keys=True)
        else:
            text = str(value)
        out[dotted] = text
    return out


def _param_key(key: str) -> str:
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return key[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + digest


def _param_value(value: str) -> str:
    return (
        value if len(value) <= MAX_PARAM_VAL_LENGTH else value[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    )


def _tag_value(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


def _batches(items: list[_T], size: int) -> Iterable[list[_T]]:
    for lo in range(0, len(items), size):
        yield items[lo : lo + size]


class StreamSource(DatasetSource):
    """A stream source MLflow has no resolver for (e.g. ``fixture:shapes``): kept as its URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "icd_stream"

    def load(self) -> str:
        return self.uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> StreamSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> StreamSource:
        return cls(source_dict["uri"])


def dataset_source(
    source: str, split: str | None = None, revision: str | None = None
) -> DatasetSource:
    """The MLflow source for an ICD stream source string (``hf:<id>``, ``parquet:<path>``,
    ``imagefolder:<path>``, a plain path or URL, anything else kept verbatim); a hub
    source carries its ``revision`` (the commit read, or the branch when unresolved)."""
    if source.startswith("hf:"):
        return HuggingFaceDatasetSource(path=source[3:], split=split, revision=revision)
    raw = source.split(":", 1)[1] if source.startswith(("parquet:", "imagefolder:")) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return resolve_dataset_source(raw)
    except MlflowException:
        return StreamSource(source)


def _sqlite_parent(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).parent


def _store_lock(tracking_uri: str) -> AbstractContextManager[Any]:
    """The lock serialising first use of a ``sqlite:///`` store (``<db>.lock``)."""
    if not tracking_uri.startswith("sqlite:///"):
        return nullcontext()
    return file_lock(tracking_uri.removeprefix("sqlite:///") + ".lock")


def _create_sqlite_store(tracking_uri: str) -> None:
    """Create a missing ``sqlite:///`` store whole: migrated in a temporary file beside it,
    then renamed into place. MLflow's first migration takes about a second, and a process
    killed during it leaves a database that every later run fails on (``duplicate column
    name``); this way a kill leaves only a ``.NAME.*.tmp`` file. Call it holding
    :func:`_store_lock`."""
    if not tracking_uri.startswith("sqlite:///") or "?" in tracking_uri:
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if db.name in ("", ":memory:") or db.exists():
        return
    remove_leftovers(db)  # of a creation killed half-way
    with atomic_file(db) as tmp:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp.absolute()}")
        client.search_experiments(max_results=1)  # creates and migrates the tables
        with contextlib.suppress(Exception):  # let go of the file before it is renamed
            client._tracking_client.store.engine.dispose()


class Tracker:
    """MLflow lineage of one run (see module doc). Call :meth:`start` before logging.

    ``artifact_root`` is where the experiment's artifacts go when the experiment is
    created (default for a ``sqlite:///DIR/x.db`` store: ``DIR/mlartifacts``); an existing
    experiment keeps its location.
    """

    def __init__(
        self, tracking_uri: str, experiment: str = "icd", artifact_root: Path | None = None
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        folder = _sqlite_parent(tracking_uri)
        if folder is not None and artifact_root is None:
            artifact_root = folder / "mlartifacts"
        self.artifact_root = Path(artifact_root).absolute() if artifact_root is not None else None
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            # A new SQLite store is created (migrated) on first use, which is not safe in
            # two processes at once: first use, and the experiment's creation, are
            # serialised by a lock file beside the database.
            lock = _store_lock(tracking_uri)
            with lock:
                _create_sqlite_store(tracking_uri)
                self.client = MlflowClient(tracking_uri=tracking_uri)
                self.experiment_id = self._experiment_id()
        except TrackingError:
            raise
        except Exception as e:
            raise TrackingError(f"tracking store {tracking_uri!r}: {one_line(e)}") from None
        self.mlflow_run_id: str | None = None
        self.run_id: str | None = None
        self.resumed = False
        self._params: dict[str, str] = {}
        self._steps: dict[str, set[int]] = {}
        self._known_keys: set[str] = set()
        self._last_step = 0
        self._writer: ThreadPoolExecutor | None = None  # background metric writes, in order
        self._pending: list[Future[None]] = []  # background writes not waited on yet

    def _experiment_id(self) -> str:
        try:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                if found.tags.get(EXPERIMENT_KIND_TAG) is None:
                    self._mark_kind(found.experiment_id)
                return found.experiment_id
            location = None
            if self.artifact_root is not None:
                safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.experiment)
                location = (self.artifact_root / safe).as_uri()
            try:
                return self.client.create_experiment(
                    self.experiment,
                    artifact_location=location,
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            except MlflowException:
                found = self.client.get_experiment_by_name(self.experiment)  # created meanwhile
                if found is None:
                    raise
                return found.experiment_id
        except Exception as e:  # any store failure is reported as one line
            raise TrackingError(f"tracking store {self.tracking_uri!r}: {one_line(e)}") from None

    def _mark_kind(self, experiment_id: str) -> None:
        # a read-only store still tracks; the UI just opens on another view
        with contextlib.suppress(MlflowException):
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    # -- run lifecycle -------------------------------------------------------------------

    def find(self, run_id: str) -> str | None:
        """The MLflow run id of ICD run ``run_id`` in this experiment, if it exists."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        return runs[0].info.run_id if runs else None

    def start(
        self,
        run_id: str,
        config: Mapping[str, object],
        tags: Mapping[str, object] | None = None,
        parent_mlflow_run_id: str | None = None,
        models: Mapping[str, Mapping[str, object]] | None = None,
        run_name: str | None = None,
    ) -> str:
        """Create the MLflow run of ICD run ``run_id`` (shown as ``run_name``, default the
        run id) — or reopen it if one is tagged with
        that id (a resumed run continues the same MLflow run). Logs ``config`` flattened as
        params, ``tags`` (e.g. Prefect flow-run id, git commit), and the models (default:
        the ``models`` section of ``config``) as external logged models. Returns the MLflow
        run id."""
        if not run_id or "'" in run_id or '"' in run_id:
            raise TrackingError(f"run id {run_id!r}: must be non-empty and contain no quotes")
        tags = {k: v for k, v in (tags or {}).items() if not is_secret(k, v)}
        existing = self.find(run_id)
        self.run_id = run_id
        self._steps = {}
        if existing is None:
            run_tags = {RUN_ID_TAG: run_id, RUN_NAME_TAG: run_name or run_id, **tags}
            if parent_mlflow_run_id is not None:
                run_tags[PARENT_TAG] = parent_mlflow_run_id
            run = self.client.create_run(
                self.experiment_id,
                tags={k: _tag_value(v) for k, v in run_tags.items()},
                run_name=run_name or run_id,
            )
            self.mlflow_run_id = run.info.run_id
            self.resumed = False
            self._params = {}
            self._known_keys = set()
        else:
            self.mlflow_run_id = existing
            self.resumed = True
            self.client.update_run(existing, status="RUNNING")
            run = self.client.get_run(existing)
            self._params = dict(run.data.params)
            self._known_keys = set(run.data.metrics)
            resumes = int(run.data.tags.get("icd.resumes", "0")) + 1
            self._set_tags({**tags, "icd.resumes": resumes})
        self.log_params(flatten(config))
        if models is None:
            section = config.get("models") or {}
            if not isinstance(section, Mapping):
                raise TypeError(f"config 'models' is a {type(section).__name__}, not a mapping")
            models = {
                role: m for role, m in section.items() if isinstance(m, dict) and m.get("model_id")
            }
        if models:
            self.log_models(models)
        return self.mlflow_run_id

    def finish(self, summary: JSONObject | None = None, status: str = "FINISHED") -> None:
        """Record the run summary and mark the run ``status`` (FINISHED | FAILED | KILLED).

        Each number of the summary is logged once under its own name, as the final point
        of its series (step: the samples of the run): a metric that already has a curve
        (``accuracy``) gets no second series, and one that has none (``gain_from_icl``)
        gets its one value. The whole dict goes to ``summary.json``."""
        rid = self._require_run()
        self.flush()
        if summary:
            numbers = {k: float(v) for k, v in flatten(summary).items() if _is_number(v)}
            samples = summary.get("samples")
            step = int(samples) if isinstance(samples, int | float) and samples else self._last_step
            self.log_metrics(numbers, step)
            plain = json.loads(json.dumps(summary, default=_plain))
            self.client.log_dict(rid, plain, "summary.json")
        self.client.set_terminated(rid, status=status)

    # -- logging -------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, object]) -> list[str]:
        """Log params not logged yet. A key already logged with another value (a resumed run
        whose config changed) keeps its first value; the new one is recorded as tag
        ``icd.param_changed.<key>`` and the key is returned."""
        rid = self._require_run()
        new: list[Param] = []
        changed: list[str] = []
        for key, value in params.items():
            if is_secret(key, value):
                continue
            k, v = _param_key(key), _param_value(str(value))
            old = self._params.get(k)
            if old is None:
                new.append(Param(k, v))
                self._params[k] = v
            elif old != v:
                changed.append(k)
        for part in _batches(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(rid, params=part)
        if changed:
            log.warning("run %s resumed with changed params: %s", self.run_id, ", ".join(changed))
            self._set_tags({f"icd.param_changed.{k}": params_value(params, k) for k in changed})
        return changed

    def log_metrics(
        self, metrics: Mapping[str, float | None], step: int, background: bool = False
    ) -> int:
        """Log ``metrics`` at ``step`` (samples seen) in batched calls, each under its
        :func:`metric_key`; None values and steps already recorded for a key (a resumed
        run) are skipped. Returns how many
        metric values were written (or queued).

        With ``background`` the values are written by one background thread, in order, and
        this returns at once; :meth:`flush` (called by :meth:`finish`) waits for them and
        raises if a write failed. (Not MLflow's own asynchronous logging: ending a run then
        waits up to a second for its queue to poll.) A process killed before then loses the
        queued values: callers re-log them on resume (steps already recorded are skipped, so
        nothing is logged twice)."""
        rid = self._require_run()
        now = int(time.time() * 1000)
        out: list[Metric] = []
        for name, value in metrics.items():
            if value is None:
                continue
            key = metric_key(name)
            steps = self._logged_steps(key)
            if step in steps:
                continue
            out.append(Metric(key, float(value), now, int(step)))
            steps.add(int(step))
            self._last_step = max(self._last_step, int(step))
        for part in _batches(out, MAX_METRICS_PER_BATCH):
            if background:
                if self._writer is None:
                    self._writer = ThreadPoolExecutor(1, thread_name_prefix="icd-mlflow")
                self._pending.append(self._writer.submit(self._write_metrics, rid, part))
            else:
                self.client.log_batch(rid, metrics=part)
        return len(out)

    def _write_metrics(self, rid: str, metrics: list[Metric]) -> None:
        self.client.log_batch(rid, metrics=metrics)

    def flush(self) -> None:
        """Wait until every metric logged in the background is stored."""
        pending, self._pending = self._pending, []
        for write in pending:
            write.result()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None

    def log_dataset(self, info: DatasetInfo, df: pl.DataFrame | None = None) -> None:
        """Record the stream dataset as a run input (context ``stream``): ``info`` holds
        ``name``, ``source`` and ``digest`` (other str/int entries become input tags; a
        hub source's ``revision`` also goes into the input's source); with ``df`` its schema
        and profile are recorded too."""
        rid = self._require_run()
        revision = info.get("revision")
        source = dataset_source(
            str(info.get("source") or info.get("name") or "unknown"),
            info.get("split"),
            str(revision) if revision else None,
        )
        name = str(info.get("name") or "stream")
        full_digest = info.get("digest")
        digest = str(full_digest)[:MAX_DATASET_DIGEST_SIZE] if full_digest else None
        dataset: Dataset
        if df is not None:
            dataset = from_polars(df, source=source, name=name, digest=digest)
        else:  # (MetaDataset declares `profile` abstract but defines it: it instantiates)
            dataset = MetaDataset(source, name=name, digest=digest)  # type: ignore[abstract]
        extra = [
            InputTag(str(k), _tag_value(v))
            for k, v in info.items()
            if k not in ("name", "source", "digest") and isinstance(v, str | int | float)
        ]
        tags = [InputTag(DATASET_CONTEXT_TAG, "stream"), *extra]
        self.client.log_inputs(rid, [DatasetInput(dataset._to_mlflow_entity(), tags)])

    def log_table(self, frame: Any, artifact_file: str) -> None:
        """A table the MLflow UI previews (``mlflow.log_table``'s JSON layout); ``frame`` is
        a polars or pandas frame."""
        data = frame.to_pandas() if hasattr(frame, "to_pandas") else frame
        self.client.log_table(self._require_run(), data=data, artifact_file=artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts (re-logging overwrites)."""
        self.client.log_artifact(self._require_run(), str(path), artifact_path)

    def log_chart(self, path: str | Path, *, key: str, step: int) -> None:
        """Show the PNG at ``path`` among the run's charts in the MLflow UI, as image
        ``key`` at ``step`` (MLflow's stepped image logging)."""
        from PIL import Image

        with Image.open(path) as im:
            self.client.log_image(self._require_run(), im.convert("RGB"), key=key, step=step)

    def log_pool_manifest(
        self, manifest: dict[int, int], pool_uri: str | None = None, table: str | None = None
    ) -> None:
        """Record which LanceDB version the pool had after each chunk (``pool/manifest.json``),
        so the pool as of any chunk can be checked out later."""
        data = {
            "pool_uri": pool_uri,
            "table": table,
            "versions": {str(c): int(v) for c, v in sorted(manifest.items())},
        }
        self.client.log_dict(self._require_run(), data, "pool/manifest.json")

    def log_models(self, models: Mapping[str, Mapping[str, object]]) -> None:
        """Record each model (role -> {model_id, revision, backend, ...}) as an external
        MLflow logged model (no weights) linked to this run; each role once per run."""
        rid = self._require_run()
        run_tags = self.client.get_run(rid).data.tags
        for role, spec in models.items():
            clean = {k: str(v) for k, v in spec.items() if not is_secret(k, v) and v is not None}
            ident = f"{clean.get('model_id', '')}@{clean.get('revision', 'main')}"
            if run_tags.get(f"{MODEL_TAG}{role}") == ident:
                continue
            model = self.client.create_logged_model(
                self.experiment_id,
                name=role,
                source_run_id=rid,
                params={k: _param_value(v) for k, v in clean.items()},
                tags={"mlflow.model.isExternal": "true", RUN_ID_TAG: self.run_id or ""},
                model_type=role,
            )
            self.client.finalize_logged_model(model.model_id, "READY")
            self._set_tags({f"{MODEL_TAG}{role}": ident, f"{MODEL_TAG}{role}.id": model.model_id})

    # -- internals -----------------------------------------------------------------------

    def _require_run(self) -> str:
        if self.mlflow_run_id is None:
            raise TrackingError("Tracker.start(run_id, config) must be called before logging")
        return self.mlflow_run_id

    def _set_tags(self, tags: Mapping[str, object]) -> None:
        items = [RunTag(k, _tag_value(v)) for k, v in tags.items()]
        for part in _batches(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._require_run(), tags=part)

    def _logged_steps(self, key: str) -> set[int]:
        steps = self._steps.get(key)
        if steps is None:
            steps = set()
            if key in self._known_keys:
                history = self.client.get_metric_history(self._require_run(), key)
                steps = {int(m.step) for m in history}
            self._steps[key] = steps
        return steps


# MLflow chart sections (the UI groups charts by the key's first "/" part and orders the
# groups by name): a run's headline numbers first, then the rest by what they describe.
_HEADLINE = frozenset({
    "accuracy", "accuracy_queried", "accuracy_not_queried", "zs_accuracy", "forward_accuracy",
    "icl_accuracy", "gain_from_icl", "gain_from_teacher_labels", "annotation_rate",
    "teacher_calls", "pool_size", "demo_accuracy", "compute_flops",
})  # fmt: skip
_SECTIONS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("headline", lambda k: k in _HEADLINE),
    ("split", lambda k: k.endswith(("_base", "_novel"))),
    ("pool", lambda k: k in {"pool_evicted", "pool_excluded", "pool_precision"}),
    ("sources", lambda k: k.startswith("source_")),
    ("teacher", lambda k: k.startswith(("teacher_", "agreement_"))
     or k in {"mean_agreement", "acceptance_rate", "queried", "accepted"}),
    ("student_cost", lambda k: k.startswith(("student_", "icl_prompt", "zs_prompt",
                                             "seconds_per_", "adapt_"))
     or k.endswith("_flops") or k == "demos_per_icl_prompt"),
    ("stream_counts", lambda k: k in {"samples", "samples_seen", "scored", "skipped",
                                      "icl_scored", "zs_scored", "demo_n",
                                      "chunks_in_flight_peak"}),
)  # fmt: skip
_NESTED = {"seconds": "stage_seconds", "cached_chunks": "stage_cached_chunks"}


def metric_key(name: str) -> str:
    """The MLflow key of a run number (a summary field name; a nested one is dotted).

    Keys are ``SECTION/name``, and the MLflow UI shows one chart section per ``SECTION``,
    in name order: ``headline/`` first (accuracy and its splits by queried, the same-run
    baselines' accuracies, the gains, annotation rate, teacher calls, pool size, demo
    accuracy, compute), then ``pool/`` (curation, label precision), ``split/`` (by class
    group), ``sources/`` (of the final answers), ``stage_cached_chunks/``, ``stage_seconds/``, ``stream_counts/``,
    ``student_cost/`` and ``teacher/``. Names no rule knows (a captioning run's ``bleu``, a
    benchmark parent's ``DATASET.MODE.bRHO.metric``) are kept."""
    head, dot, rest = name.partition(".")
    if dot and head in _NESTED:
        return f"{_NESTED[head]}/{rest}"
    for section, belongs in _SECTIONS:
        if belongs(name):
            return f"{section}/{name}"
    return name


def params_value(params: Mapping[str, object], key: str) -> str:
    """The (truncated) value of ``key`` in ``params`` as it would be logged."""
    for k, v in params.items():
        if _param_key(k) == key:
            return _param_value(str(v))
    return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text not in ("True", "False")


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars/arrays, paths and other objects."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
