"""The benchmark flow (Prefect flow ``icd-benchmark``, nightly deployment): a matrix of
``stream`` runs — dataset × mode × budget ρ × stream order — and their comparison table.

A suite is a YAML file (``icd/presets/benchmarks/NAME.yaml`` or any path) validated by
:class:`BenchmarkConfig`. Each cell of the matrix is a ``stream`` run — a sub-flow here
(``executor: local``), or a run of the ``icd/stream`` deployment on a work pool's worker
(``executor: deployments``, :mod:`icd.flows.fanout`) — and its own MLflow child run under
one parent run. Outputs, in ``ROOT/benchmarks/BENCH_ID/``:

    benchmark.json       the suite, the planned settings, the parent MLflow run id
    runs.parquet         one row per child run (its summary metrics, run id, MLflow id)
    comparison.parquet   one row per setting, mean and std of each metric over seeds
    comparison.md        the same as a markdown table (mean ± std)
    report/              plots and the self-contained HTML report
    cells.json           deployments executor: each cell's latest flow-run id

Budgets only matter for modes whose teacher queries the policy rations (``icd``,
``teacher_forward``, ``random_demos``, ``rices`` and the oracle variants). Modes that
never consult the budget (``student_zero_shot``, ``teacher_zero_shot``) run once per
(dataset, stream order) and appear in the table with an empty budget, instead of being
rerun identically for every ρ.

Re-running with the same ``benchmark_id`` resumes: each child keeps its run id, so
finished children return their summary at once (the deployments executor does not even
submit them) and an interrupted one resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import polars as pl
from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from icd.config import ConfigError, ModeName, load_config, parse_override, read_yaml
from icd.data.registry import UnknownDataset, get_dataset
from icd.flows import artifacts, fanout
from icd.method.accounting import as_summary
from icd.method.modes import mode_spec
from icd.report import (
    BENCHMARK_FILE,
    COMPARISON_FILE,
    COMPARISON_MD,
    RUNS_FILE,
    benchmarks_dir,
    build_benchmark_report,
)
from icd.report.tables import (
    comparison_rows,
    comparison_table,
    runs_table,
    summary_row,
    to_markdown,
)
from icd.storage.runstate import atomic_write_text

if TYPE_CHECKING:
    from icd.storage.tracking import Tracker

SUITE_DIR = Path(__file__).resolve().parent.parent / "presets" / "benchmarks"

Mode = ModeName


class Variant(BaseModel):
    """A named mode of the matrix: a ``method.mode`` plus config overrides of its own
    (e.g. ``icd_oracle``: mode ``icd`` with ``models.teacher.backend=oracle``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    mode: Mode
    overrides: list[str] = []


class Sweep(BaseModel):
    """One config field swept over values: every mode of the suite runs at each value (as
    variant ``MODE-LABEL_VALUE``, e.g. ``icd-k_3``: a name MLflow and paths accept), and
    the report plots ``metrics`` against the value."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, description="Dotted config path, e.g. method.selection.k")
    values: list[int | float | str] = Field(min_length=1)
    label: str | None = Field(
        None, description="Short name in variant names (default: last key part)"
    )
    metrics: list[str] = Field(default=["accuracy"], min_length=1, description="Plotted metrics")

    @property
    def name(self) -> str:
        return self.label or self.key.rsplit(".", 1)[-1]

    def variant(self, base: Variant, value: Any) -> Variant:
        return Variant(
            name=f"{base.name}-{self.name}_{value}",
            mode=base.mode,
            overrides=[*base.overrides, f"{self.key}={value}"],
        )


class BenchmarkConfig(BaseModel):
    """A benchmark suite: which streams, modes, budgets and stream orders to run (and
    optionally one config field swept over values)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    base_preset: str = "smoke"
    overrides: list[str] = Field(default=[], description="Config overrides for every run")
    datasets: list[str] = Field(min_length=1)
    modes: list[Mode | Variant] = Field(min_length=1)
    budgets: list[float] = Field(min_length=1)
    seeds: list[int] = Field(
        default=[0], min_length=1, description="Stream orders (data.order_seed)"
    )
    limit: int | None = Field(None, ge=1, description="Samples per stream (data.limit)")
    sweep: Sweep | None = None
    executor: Literal["local", "deployments"] = Field(
        "local",
        description="local: the cells run one after another in this process; deployments: "
        "each cell is a run of the `deployment`, on whichever worker of its pool is free",
    )
    deployment: str = Field("icd/stream", description="Deployments executor: the stream deployment")
    max_parallel: int = Field(
        4, ge=1, description="Deployments executor: cells submitted and not finished at once"
    )
    work_queue: str | None = Field(
        None, description="Deployments executor: the work queue cells go to (default: the pool's)"
    )
    poll_s: float = Field(5.0, gt=0, description="Deployments executor: seconds between polls")

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= b <= 1.0 for b in v):
            raise ValueError("every budget must be a fraction in [0, 1]")
        return v

    @model_validator(mode="after")
    def _unique(self) -> BenchmarkConfig:
        names = [v.name for v in self.variants()]
        columns: list[tuple[str, list[Any]]] = [
            ("mode", names),
            ("dataset", list(self.datasets)),
            ("budget", list(self.budgets)),
            ("seed", list(self.seeds)),
        ]
        for label, values in columns:
            dup = {x for x in values if values.count(x) > 1}
            if dup:
                raise ValueError(f"duplicate {label} in the suite: {sorted(dup, key=str)}")
        return self

    def variants(self) -> list[Variant]:
        """The modes as variants (a bare mode name is a variant of that name, no overrides),
        each once per swept value when the suite sweeps a field."""
        base = [m if isinstance(m, Variant) else Variant(name=m, mode=m) for m in self.modes]
        if self.sweep is None:
            return base
        return [self.sweep.variant(v, value) for v in base for value in self.sweep.values]

    def sweep_points(self) -> dict[str, tuple[str, Any]]:
        """For a sweep: each variant's (mode variant, swept value); empty otherwise."""
        if self.sweep is None:
            return {}
        base = [m if isinstance(m, Variant) else Variant(name=m, mode=m) for m in self.modes]
        return {
            self.sweep.variant(v, value).name: (v.name, value)
            for v in base
            for value in self.sweep.values
        }


def suites() -> list[str]:
    """Names of the shipped benchmark suites."""
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def load_benchmark(suite: str | Path, overrides: list[str] | None = None) -> BenchmarkConfig:
    """Load a suite by name (``icd/presets/benchmarks/NAME.yaml``) or YAML path.

    ``overrides`` are ``key=value`` strings on the suite's own fields (``limit=64``,
    ``seeds=[0,1]``, ``datasets=[cub200]``). Unknown suites, keys, values or datasets
    (not in ``icd.data.registry``) raise :class:`icd.config.ConfigError` with a one-line
    message.
    """
    path = Path(suite)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = SUITE_DIR / f"{suite}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown benchmark suite {str(suite)!r} (known: {', '.join(suites())})"
            )
    data = read_yaml(path)
    for item in overrides or []:
        keys, value = parse_override(item)
        if len(keys) != 1:
            raise ConfigError(f"benchmark override {item!r}: suite fields are not nested")
        data[keys[0]] = value
    try:
        spec = BenchmarkConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "suite"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{path.name}: unknown benchmark key {key!r}") from None
        raise ConfigError(f"{path.name}: invalid value for {key!r}: {err['msg']}") from None
    for name in spec.datasets:
        try:
            get_dataset(name)
        except UnknownDataset as e:
            raise ConfigError(f"{path.name}: {e}") from None
    return spec


@dataclass(frozen=True)
class Setting:
    """One cell of the matrix: one ``stream`` run."""

    dataset: str
    variant: str
    mode: str
    budget: float | None  # None: the mode never consults the budget
    seed: int
    variant_overrides: tuple[str, ...] = ()

    def run_id(self, benchmark_id: str) -> str:
        budget = "all" if self.budget is None else f"b{self.budget:g}"
        return f"{benchmark_id}--{self.dataset}--{self.variant}--{budget}--s{self.seed}"

    def overrides(self) -> list[str]:
        """Config overrides placing the run at this cell (applied after the suite's)."""
        out = [*self.variant_overrides, f"data.dataset={self.dataset}", f"method.mode={self.mode}"]
        if self.budget is not None:
            out.append(f"method.policy.budget={self.budget}")
        out.append(f"data.order_seed={self.seed}")
        return out


def expand(suite: BenchmarkConfig) -> list[Setting]:
    """The matrix in run order (dataset, mode, budget, seed); budget-free modes once per
    (dataset, seed) with ``budget=None``."""
    settings: list[Setting] = []
    for dataset in suite.datasets:
        for v in suite.variants():
            budgets: list[float | None] = (
                list(suite.budgets) if mode_spec(v.mode).uses_budget else [None]
            )
            for budget in budgets:
                for seed in suite.seeds:
                    settings.append(
                        Setting(dataset, v.name, v.mode, budget, seed, tuple(v.overrides))
                    )
    return settings


def _split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """``benchmark.FIELD=v`` items change the suite; the rest go to every stream run."""
    suite: list[str] = []
    runs: list[str] = []
    for item in overrides or []:
        (suite if item.startswith("benchmark.") else runs).append(item.removeprefix("benchmark."))
    return suite, runs


def plan_suite(
    suite: str | Path, overrides: list[str] | None
) -> tuple[BenchmarkConfig, list[str], list[Setting]]:
    """The suite, the overrides every run gets, and its cells, once every cell's config is
    known to be valid and, for the deployments executor, the work pool can take them
    (:class:`ConfigError` or :class:`~icd.flows.fanout.FanoutError` otherwise, in one line)."""
    suite_overrides, run_overrides = _split_overrides(overrides)
    spec = load_benchmark(suite, suite_overrides)
    common = list(spec.overrides)
    if spec.limit is not None:
        common.append(f"data.limit={spec.limit}")
    common += run_overrides
    settings = expand(spec)
    load_config(spec.base_preset, overrides=common)
    for s in settings:
        load_config(spec.base_preset, overrides=common + s.overrides())
    if spec.executor == "deployments":
        fanout.check_pool(spec.deployment)
    return spec, common, settings


# The parent run's final values: per setting, mean and std over stream orders.
SETTING_METRICS = ("accuracy", "zs_accuracy", "gain_from_icl", "annotation_rate")


def setting_metrics(table: pl.DataFrame, digits: int = 4) -> dict[str, float | None]:
    """The comparison ``table``'s settings as MLflow metrics of the benchmark's parent run:
    ``DATASET.VARIANT.bRHO.METRIC_mean`` and ``..._std`` (over stream orders; the std is
    left out with one order), rounded to ``digits``. Logged once each (step 0): final
    values, never a series over orders."""
    out: dict[str, float | None] = {}
    for row in table.iter_rows(named=True):
        budget = "all" if row.get("budget") is None else f"b{row['budget']:g}"
        prefix = f"{row['dataset']}.{row['variant']}.{budget}"
        for m in SETTING_METRICS:
            for stat in ("mean", "std"):
                value = row.get(f"{m}_{stat}")
                if value is not None:
                    out[f"{prefix}.{m}_{stat}"] = round(float(value), digits)
    return out


def benchmark_description(
    benchmark_id: str,
    *,
    suite: str,
    settings: int,
    orders: int,
    runs: int,
    failed: int,
    plot: str | None,
    mlflow_run_id: str,
) -> str:
    """The parent run's description (short: the MLflow UI folds a long one): what ran,
    where its table is, and a link to its comparison plot."""
    from urllib.parse import quote

    line = (
        f"Benchmark **{benchmark_id}** (suite `{suite}`): {settings} settings × {orders} stream "
        f"orders = {runs} runs{f', {failed} failed' if failed else ''}, each a child run below. "
        "Metrics: each setting's mean and std over orders. Table: Artifacts → "
        f"{COMPARISON_MD}"
    )
    if plot:
        src = f"get-artifact?path={quote(plot, safe='')}&run_uuid={mlflow_run_id}"
        line += f"; [the comparison plot]({src})"
    return line + "."


class Child(TypedDict):
    """One child run of a benchmark: its cell (a :class:`Setting`'s fields), run ids, folder
    and the error that stopped it (None: finished)."""

    dataset: str
    variant: str
    mode: str
    budget: float | None
    seed: int
    variant_overrides: tuple[str, ...]
    run_id: str
    mlflow_run_id: str | None
    run_dir: str | None
    flow_run_id: str | None
    error: str | None


class BenchmarkResult(TypedDict):
    """What :func:`benchmark` returns: where the comparison table and report are."""

    benchmark_id: str
    folder: str
    table: str  # the comparison parquet
    runs_table: str
    markdown: str  # the table as text
    markdown_path: str
    report: str  # the HTML page
    plots: dict[str, str]
    parent_mlflow_run_id: str
    children: list[Child]


@dataclass(frozen=True)
class Matrix:
    """A planned benchmark: its suite, cells, the overrides every run gets, its id and
    folder, the parent MLflow run and the storage root every run writes under."""

    spec: BenchmarkConfig
    settings: list[Setting]
    common: list[str]
    benchmark_id: str
    parent_id: str
    folder: Path
    root: Path

    def cells(self) -> dict[str, Setting]:
        """The settings by run id, in the matrix's order."""
        return {s.run_id(self.benchmark_id): s for s in self.settings}


@flow(name="icd-benchmark", log_prints=True)
def benchmark(
    suite: str = "smoke", overrides: list[str] | None = None, benchmark_id: str | None = None
) -> BenchmarkResult:
    """Run a benchmark suite and return where its comparison table is.

    ``suite`` is a suite name or YAML path. ``overrides`` are ``key.path=value`` config
    overrides for every stream run (e.g. ``storage.root=/data/icd``); items starting with
    ``benchmark.`` change the suite instead (``benchmark.limit=64``,
    ``benchmark.seeds=[0,1]``). ``benchmark_id`` names the benchmark folder and parent
    MLflow run (default ``NAME-YYYYmmdd-HHMMSS``); reuse it to resume.

    Returns a :class:`BenchmarkResult`. Children that fail are recorded with their error,
    the others still run; the flow then fails at the end, after writing and logging
    everything, naming the failed runs.
    """
    from icd.flows.stream import stream
    from icd.storage.tracking import Tracker

    log = get_run_logger()
    spec, common, settings = plan_suite(suite, overrides)
    base = load_config(spec.base_preset, overrides=common)
    benchmark_id = benchmark_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = benchmarks_dir(Path(base.storage.root)) / benchmark_id
    folder.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(
        base.storage.resolved_tracking_uri(),
        base.storage.experiment,
        artifact_root=Path(base.storage.root).absolute() / "mlartifacts",
    )
    parent_id = tracker.start(
        benchmark_id,
        config={"suite": spec.model_dump(mode="json"), "run_overrides": common},
        tags={
            "icd.kind": "benchmark",
            "icd.benchmark": spec.name,
            "icd.benchmark_id": benchmark_id,
        },
    )
    matrix = Matrix(
        spec, settings, common, benchmark_id, parent_id, folder, Path(base.storage.root).absolute()
    )
    _write_info(matrix)
    artifacts.name_flow_run(name=benchmark_id, tags=["icd", "benchmark", f"suite:{spec.name}"])
    log.info("benchmark %s: %d runs (parent MLflow run %s)", benchmark_id, len(settings), parent_id)
    try:
        children = _run_matrix(stream, matrix, log=log)
        result = _compare(matrix, children, tracker=tracker)
    except BaseException:
        tracker.finish(None, status="FAILED")
        raise
    _close_parent(matrix, result, tracker=tracker)
    return result


def _write_info(matrix: Matrix) -> None:
    """Write ``benchmark.json``: the suite, its overrides and cells, the parent run (the
    start time of a resumed benchmark is kept)."""
    path = matrix.folder / BENCHMARK_FILE
    previous = json.loads(path.read_text()) if path.exists() else {}
    info = {
        "benchmark_id": matrix.benchmark_id,
        "suite": matrix.spec.model_dump(mode="json"),
        "run_overrides": matrix.common,
        "started": previous.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "parent_mlflow_run_id": matrix.parent_id,
        "settings": [
            asdict(s) | {"run_id": s.run_id(matrix.benchmark_id)} for s in matrix.settings
        ],
        "sweep_points": matrix.spec.sweep_points(),
    }
    atomic_write_text(path, json.dumps(info, indent=2))


def _compare(matrix: Matrix, children: list[Child], *, tracker: Tracker) -> BenchmarkResult:
    """The comparison table of the finished runs (parquet, markdown, a Prefect table
    artifact), the report, all logged to the parent run with each setting's means."""
    folder = matrix.folder
    table = comparison_table(pl.read_parquet(folder / RUNS_FILE))
    table_path = folder / COMPARISON_FILE
    table.write_parquet(table_path)
    markdown = to_markdown(table)
    header, cells = comparison_rows(table)
    artifacts.publish_table(
        [dict(zip(header, row, strict=True)) for row in cells],
        key=f"{matrix.benchmark_id}-comparison",
        description=f"benchmark {matrix.benchmark_id}: mean ± std over stream orders",
    )
    md_path = folder / COMPARISON_MD
    atomic_write_text(md_path, markdown)
    report = build_benchmark_report(folder)
    for path in (table_path, md_path, folder / RUNS_FILE, folder / BENCHMARK_FILE):
        tracker.log_artifact(path)
    for path in (report.html, *report.plots.values()):
        tracker.log_artifact(path, "report")
    tracker.log_metrics(setting_metrics(table), step=0)
    return BenchmarkResult(
        benchmark_id=matrix.benchmark_id,
        folder=str(folder),
        table=str(table_path),
        runs_table=str(folder / RUNS_FILE),
        markdown=markdown,
        markdown_path=str(md_path),
        report=str(report.html),
        plots={k: str(v) for k, v in report.plots.items()},
        parent_mlflow_run_id=matrix.parent_id,
        children=children,
    )


def _close_parent(matrix: Matrix, result: BenchmarkResult, *, tracker: Tracker) -> None:
    """Describe the parent run (what ran, where its table and plot are), tag its counts and
    end it; raise naming the failed children, if any."""
    children, parent_id = result["children"], matrix.parent_id
    failed = [c for c in children if c["error"]]
    plot = result["plots"].get("accuracy_vs_annotation")
    settings = pl.read_parquet(result["table"]).height
    tracker.client.set_tag(
        parent_id,
        "mlflow.note.content",
        benchmark_description(
            matrix.benchmark_id,
            suite=matrix.spec.name,
            settings=settings,
            orders=len(matrix.spec.seeds),
            runs=len(children),
            failed=len(failed),
            plot=f"report/{Path(plot).name}" if plot is not None else None,
            mlflow_run_id=parent_id,
        ),
    )
    # counts of the suite are tags, not metrics: one-point charts would lead the run's page
    tracker.client.set_tag(parent_id, "icd.runs", str(len(children)))
    tracker.client.set_tag(parent_id, "icd.failed_runs", str(len(failed)))
    tracker.finish(None, status="FAILED" if failed else "FINISHED")
    if failed:
        names = ", ".join(c["run_id"] for c in failed)
        raise RuntimeError(
            f"benchmark {matrix.benchmark_id}: {len(failed)} of {len(children)} runs failed "
            f"(results of the others are in {matrix.folder}): {names}"
        )


class _Outcomes:
    """The cells' outcomes as they end: each cell's :class:`Child` and runs-table row; the
    runs table is rewritten as each cell ends (in the matrix's order)."""

    def __init__(self, matrix: Matrix, log: Any) -> None:
        self.matrix, self.log = matrix, log
        self.cells = matrix.cells()
        self.rows: dict[str, dict[str, object]] = {}
        self.children: dict[str, Child] = {}

    def record(self, run_id: str, outcome: fanout.Outcome) -> None:
        s, summary = self.cells[run_id], outcome.summary
        self.children[run_id] = Child(
            dataset=s.dataset,
            variant=s.variant,
            mode=s.mode,
            budget=s.budget,
            seed=s.seed,
            variant_overrides=s.variant_overrides,
            run_id=run_id,
            mlflow_run_id=summary.mlflow_run_id if summary is not None else None,
            run_dir=summary.run_dir if summary is not None else None,
            flow_run_id=outcome.flow_run_id,
            error=outcome.error,
        )
        if outcome.error is not None:
            self.log.error("run %s failed: %s", run_id, outcome.error)
            summary = None
        self.rows[run_id] = summary_row(asdict(s), summary, run_id=run_id, error=outcome.error)
        done = [self.rows[r] for r in self.cells if r in self.rows]  # in the matrix's order
        runs_table(done).write_parquet(self.matrix.folder / RUNS_FILE)

    def in_order(self) -> list[Child]:
        return [self.children[r] for r in self.cells]


def _run_matrix(stream: Any, matrix: Matrix, *, log: Any) -> list[Child]:
    """Run every setting as a ``stream`` run — a sub-flow here (``executor: local``) or a
    run of the stream deployment on a worker (``deployments``, :mod:`icd.flows.fanout`) —
    and return one :class:`Child` per setting, in the matrix's order.

    As each cell ends the runs table is rewritten (the parent logs the settings' means and
    stds over orders once all have ended: :func:`setting_metrics`). A cell that fails is
    recorded with its error and the matrix goes on. Each finished cell has its plots and
    HTML report (the stream flow makes and logs them).
    """
    outcomes = _Outcomes(matrix, log)
    if matrix.spec.executor == "deployments":
        _run_deployments(matrix, outcomes, log=log)
    else:
        _run_local(stream, matrix, outcomes, log=log)
    return outcomes.in_order()


def _run_deployments(matrix: Matrix, outcomes: _Outcomes, *, log: Any) -> None:
    """The cells as runs of the stream deployment (:func:`icd.flows.fanout.run_cells`)."""
    spec = matrix.spec
    cells = [
        fanout.Cell(
            run_id=run_id,
            parameters={
                "preset": spec.base_preset,
                # The workers write where the parent reads: the same storage root.
                "overrides": [*matrix.common, *s.overrides(), f"storage.root={matrix.root}"],
                "run_id": run_id,
                "parent_mlflow_run_id": matrix.parent_id,
            },
            tags=("icd", "benchmark-cell", f"benchmark:{matrix.benchmark_id}", f"mode:{s.variant}"),
        )
        for run_id, s in matrix.cells().items()
    ]
    fanout.run_cells(
        cells,
        deployment=spec.deployment,
        root=matrix.root,
        folder=matrix.folder,
        max_parallel=spec.max_parallel,
        work_queue=spec.work_queue,
        poll_s=spec.poll_s,
        takeover_s=6 * spec.poll_s,
        on_done=lambda cell, outcome: outcomes.record(cell.run_id, outcome),
        log=log,
    )


def _run_local(stream: Any, matrix: Matrix, outcomes: _Outcomes, *, log: Any) -> None:
    """The cells one after another, as sub-flows of this one."""
    cells = matrix.cells()
    for i, (run_id, s) in enumerate(cells.items(), 1):
        log.info("[%d/%d] %s", i, len(cells), run_id)
        try:
            summary = stream.with_options(flow_run_name=run_id)(
                preset=matrix.spec.base_preset,
                overrides=matrix.common + s.overrides(),
                run_id=run_id,
                parent_mlflow_run_id=matrix.parent_id,
            )
        except Exception as e:  # one broken cell must not lose the night's other results
            outcomes.record(run_id, fanout.Outcome(None, f"{type(e).__name__}: {e}", None))
        else:
            outcomes.record(run_id, fanout.Outcome(as_summary(summary), None, None))
