"""The ``icd`` command: run the stream flow locally, build fixtures, benchmark, report."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from icd.config import Config, ConfigError, load_config, presets
from icd.errors import one_line

if TYPE_CHECKING:
    from icd.method.accounting import RunSummary

app = typer.Typer(
    help="Online In-Context Distillation for small vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Markdown: docstrings and help strings flow as paragraphs whatever their line breaks.
    rich_markup_mode="markdown",
)
bench_app = typer.Typer(
    help="Benchmarks that print ratios against a baseline measured in the same run."
)
pool_app = typer.Typer(help="Inspect a LanceDB demonstration pool.")
app.add_typer(bench_app, name="bench")
app.add_typer(pool_app, name="pool")
console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from icd import __version__

        console.print(f"icd {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Online In-Context Distillation for small vision-language models."""


PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="Shipped preset to start from (see `icd presets`)."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file layered on top of the preset."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one config field, KEY=VALUE with a dotted key, e.g. "
        "--set method.policy.budget=0.04 (repeatable; applied last).",
    ),
]


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    from icd.data.registry import UnknownDataset
    from icd.flows.fanout import FanoutError
    from icd.models import ModelLoadError, ModelOOMError

    return (
        ConfigError,
        FanoutError,
        UnknownDataset,
        ModelLoadError,
        ModelOOMError,
        ValueError,
        FileNotFoundError,
    )


def _resolve(preset: str | None, config: Path | None, sets: list[str] | None) -> Config:
    try:
        return load_config(preset if (preset or config) else "smoke", config, sets)
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable


def _quiet_prefect() -> None:
    """Keep the flow's own log lines; drop per-task state lines and server chatter."""
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
    for name in ("prefect.task_runs", "prefect._internal", "prefect.server", "uvicorn", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _preflight(cfg: Config, run_id: str | None = None) -> None:
    """Fail fast, in one line, on unusable storage, a resume under another config, or a bad
    dataset or model id before the flow starts (storage first: it takes milliseconds).

    Models are loaded into the process cache, so the flow then reuses them.
    """
    from icd.storage.preflight import check_storage
    from icd.storage.runstate import check_resume

    check_storage(cfg.storage)
    check_resume(cfg, run_id)
    from icd.data.stream import open_stream
    from icd.models import load_embedder, load_student, load_teacher

    src = open_stream(cfg.data)
    load_embedder(cfg.models.embedder)
    load_student(cfg.models.student)
    if cfg.method.mode != "student_zero_shot" and cfg.models.teacher.backend != "openai":
        load_teacher(cfg.models.teacher, src.class_names)


def _paths_line(label: str, path: Any) -> None:
    """``label path`` on one line, never wrapped inside the path (it can be copied)."""
    console.print(f"{label} {path}", highlight=False, soft_wrap=True, markup=False)


def _local_server() -> None:
    """Start Prefect's temporary server from the main thread, tied to this process (a
    SIGKILL then leaves no server behind); nothing when PREFECT_API_URL names one."""
    from icd.flows.server import start_local_server

    start_local_server()


@app.command()
def run(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_id: Annotated[
        str | None,
        typer.Option("--run-id", "-r", help="Run id; reuse an existing one to resume that run."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print every number of the summary.")
    ] = False,
) -> None:
    """Run the `stream` flow in this process (Prefect ephemeral mode, no server needed).

    Without --preset or --config the offline `smoke` preset is used. Results (predictions
    parquet, summary) go under STORAGE.ROOT/runs/RUN_ID; metrics and lineage to MLflow.
    """
    cfg = _resolve(preset, config, set_)
    _quiet_prefect()
    try:
        _preflight(cfg, run_id)
    except _user_errors() as e:
        _fail(one_line(e))
    result = _stream_with_progress(
        cfg, preset=preset, config=config, set_=set_, run_id=run_id, progress=progress
    )
    # Nothing of Prefect's (its temporary server stopping at exit) comes after the headline.
    logging.getLogger("prefect").setLevel(logging.WARNING)
    from icd.method.accounting import as_summary
    from icd.report import print_headline, print_summary

    summary = as_summary(result)
    if verbose:
        print_summary(summary, console=console)
    print_headline(summary, console=console)
    print_where(summary, tracking_uri=cfg.storage.resolved_tracking_uri())


def _stream_with_progress(
    cfg: Config,
    *,
    preset: str | None,
    config: Path | None,
    set_: list[str] | None,
    run_id: str | None,
    progress: bool,
) -> RunSummary | Mapping[str, Any]:
    """Run the stream flow in this process under a progress bar of the samples done (on
    stderr; none without ``progress``); what the flow returns. A user error ends the
    command with its one-line message."""
    from icd.flows import stream as stream_mod

    bar = Progress(
        TextColumn("[bold]stream[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        console=err,
        disable=not progress,
    )
    task_id = bar.add_task("stream", total=None)

    def hook(chunks: int, samples: int, total: int | None) -> None:
        bar.update(task_id, completed=samples, total=total)

    stream_mod.CHUNK_HOOKS.append(hook)
    try:
        with bar, _logs_above(bar), stream_mod.in_process_settings():
            _local_server()
            # The flow resolves the same config from what the user gave (so the Prefect UI
            # shows the real parameters, not a serialised config).
            return stream_mod.stream_flow_for(cfg)(
                preset=preset if (preset or config) else "smoke",
                overrides=set_ or None,
                config_file=str(config) if config else None,
                run_id=run_id,
            )
    except _user_errors() as e:
        _fail(one_line(e))
    finally:
        stream_mod.CHUNK_HOOKS.remove(hook)


def print_where(summary: RunSummary, *, tracking_uri: str) -> None:
    """Where a finished run's results are and how to open them, one copyable line each."""
    run_id, mlflow_run = summary.run_id, summary.mlflow_run_id
    _paths_line("results:", summary.run_dir)
    _paths_line("report: ", f"icd report {run_id}")
    link = "http://127.0.0.1:5000"
    if tracking_uri.startswith(("http://", "https://")):
        link = tracking_uri.rstrip("/")
    else:
        _paths_line(
            "MLflow: ",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
            f"{tracking_uri} --host 127.0.0.1 --port 5000 --workers 1",
        )
    if mlflow_run:
        experiment = _experiment_of(tracking_uri, mlflow_run)
        if experiment is not None:
            _paths_line("  open:  ", f"{link}/#/experiments/{experiment}/runs/{mlflow_run}")
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    prefect_ui = api.removesuffix("/").removesuffix("/api") if api else None
    if prefect_ui:
        _paths_line("Prefect:", f"{prefect_ui}/runs (flow run {run_id})")
    else:
        _paths_line("Prefect:", f"prefect server start, then http://127.0.0.1:4200/runs ({run_id})")


def _experiment_of(tracking_uri: str, mlflow_run_id: str) -> str | None:
    try:
        from mlflow import MlflowClient

        return str(MlflowClient(tracking_uri).get_run(mlflow_run_id).info.experiment_id)
    except Exception:  # noqa: BLE001 - the link is a convenience
        return None


@contextlib.contextmanager
def _logs_above(bar: Progress) -> Iterator[None]:
    """Prefect's console log lines printed through the progress bar's console while it is
    live, so each goes on its own line above the bar (never glued onto it)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [
        h
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        if isinstance(logger, logging.Logger)
        for h in logger.handlers
        if isinstance(h, PrefectConsoleHandler)
    ]
    before = [h.console for h in handlers]
    for h in handlers:
        h.console = bar.console
    try:
        yield
    finally:
        for h, c in zip(handlers, before, strict=True):
            h.console = c


@app.command("presets")
def list_presets() -> None:
    """List the shipped presets."""
    for name in presets():
        console.print(name)


@app.command("config")
def show_config(preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fully resolved config (preset + file + overrides) as YAML."""
    import yaml

    cfg = _resolve(preset, config, set_)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command("check")
def check(preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check a config before a long run, loading no weights.

    One line per check (packages, model ids, devices, teacher endpoint and key, storage,
    and each dataset of the preset and of the benchmark suites built on it: source,
    revision, reachable). Exits 0 only if all pass."""
    from icd.check import run_checks

    cfg = _resolve(preset, config, set_)
    results = run_checks(cfg, preset=preset if (preset or config) else "smoke")
    for c in results:
        console.print(
            c.line(),
            style=None if c.ok else "bold red",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    failed = sum(not c.ok for c in results)
    if failed:
        err.print(f"{failed} of {len(results)} checks failed", highlight=False)
        raise typer.Exit(1)


fixtures_app = typer.Typer(
    help="The offline mini-world: the shapes dataset and the tiny trained models.",
    invoke_without_command=True,
)
app.add_typer(fixtures_app, name="fixtures")


@fixtures_app.callback()
def fixtures(
    ctx: typer.Context,
    root: Annotated[
        Path | None,
        typer.Option(help="Where to build (default: $ICD_FIXTURES or ./.icd/fixtures)."),
    ] = None,
    samples: Annotated[int, typer.Option(help="Samples in the shapes dataset.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the shapes dataset.")] = 0,
) -> None:
    """Build the shapes dataset and list the shipped mini-world models.

    The models are a tiny Idefics3 (SmolVLM) student, LLaVA teacher and CLIP embedder,
    trained by `icd fixtures train`."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from icd.data.shapes import build_shapes_dataset
    from icd.models.fixtures import NAMES, fixtures_dir, resolve_model_path

    root = root or fixtures_dir()
    t0 = time.perf_counter()
    try:
        paths = {name: str(resolve_model_path(f"fixtures/{name}")) for name in NAMES}
    except ValueError as e:
        _fail(str(e))
    data = build_shapes_dataset(root, n=samples, seed=seed)
    for name, path in {**paths, "shapes": str(data)}.items():
        console.print(f"{name:>14}: {path}")
    console.print(f"fixtures ready in {time.perf_counter() - t0:.1f}s")


@fixtures_app.command("train")
def fixtures_train(
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the models (default: the shipped icd/miniworld/weights)."
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Train only this model (repeatable): tiny-clip, tiny-llava, tiny-idefics3."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, training images and episodes.")] = 0,
    scale: Annotated[
        float, typer.Option(help="Schedule length factor (1 = the shipped recipe; 0.02 = a test).")
    ] = 1.0,
    threads: Annotated[int, typer.Option(help="torch threads (1 is fastest at this size).")] = 1,
) -> None:
    """Train the mini-world models from their untrained architectures.

    Tens of minutes on 2 CPU cores: embedder, then teacher (starting from the embedder's
    vision tower), then student. The teacher needs a trained embedder in --out."""

    from icd.miniworld.train import Recipe, train_all
    from icd.models.fixtures import NAMES, trained_dir

    names = model or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        _fail(f"no mini-world model {unknown[0]!r} (known: {', '.join(NAMES)})")
    recipe = Recipe(seed=seed, threads=threads)
    recipe = recipe.scaled(scale) if scale != 1 else recipe
    out = out or trained_dir()
    report = train_all(out, recipe=recipe, names=names, log=console.print)
    for name, info in report.items():
        first, last = info["loss_curve"][0][1], info["loss_curve"][-1][1]
        console.print(f"{name:>14}: {info['seconds']:.0f}s, loss {first:.3f} → {last:.3f}")
    console.print(f"models in {out}")


@fixtures_app.command("eval")
def fixtures_eval(
    root: Annotated[
        Path | None,
        typer.Option(help="Evaluate the models in this folder (default: the shipped ones)."),
    ] = None,
    per_class: Annotated[int, typer.Option(help="Held-out query images per class.")] = 20,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the numbers as JSON here.")
    ] = None,
    markdown_out: Annotated[
        Path | None,
        typer.Option("--markdown", help="Also write the table as markdown here (for docs)."),
    ] = None,
) -> None:
    """Measure the mini-world models against their targets; exit 1 if one is missed.

    On held-out images, through ICD's own backends: embedder retrieval, teacher greedy and
    voted accuracy, student zero-shot, uncertainty AUROC and in-context learning."""
    import json

    from icd.miniworld.evaluate import evaluate

    found = evaluate(root=root, per_class=per_class)
    design = found.get("student.design")
    table = Table("metric", "value", "target", "met", title=design and f"student design: {design}")
    for key, check in found["targets"].items():
        met = "[green]yes[/]" if check["met"] else "[red]no[/]"
        table.add_row(key, f"{check['value']:.3f}", check["target"], met)
    for key, value in found.items():
        if key not in found["targets"] and isinstance(value, float):
            table.add_row(key, f"{value:.3f}", "", "")
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(found, indent=2))
        console.print(f"written to {json_out}")
    if markdown_out:
        lines = ["| metric | measured | target | met |", "|---|---|---|---|"]
        for key, check in found["targets"].items():
            met = "yes" if check["met"] else "**no**"
            lines.append(f"| `{key}` | {check['value']:.3f} | {check['target']} | {met} |")
        for key, value in found.items():
            if key not in found["targets"] and isinstance(value, float):
                lines.append(f"| `{key}` | {value:.3f} | | |")
        shipped = (
            f" The student's design is **{design}**: its targets are checked; the other "
            "design's settings are listed for reference."
            if design
            else ""
        )
        markdown_out.write_text(
            f"Generated by `icd fixtures eval --per-class {per_class}` (held-out images, "
            f"the project's own backends).{shipped}\n\n" + "\n".join(lines) + "\n"
        )
        console.print(f"written to {markdown_out}")
    if not found["passed"]:
        raise typer.Exit(1)


@app.command()
def report(
    target: Annotated[
        str,
        typer.Argument(
            help="A run id, `latest` (the newest run, as `icd runs` lists them first), "
            "a benchmark id, a suite name (its latest benchmark) or a folder."
        ),
    ],
    root: Annotated[
        Path | None,
        typer.Option(help="Storage root the run wrote to (default: the config's storage.root)."),
    ] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Every number of the summary, every column."),
    ] = False,
) -> None:
    """Print a finished run's headline or a benchmark's table; write plots and HTML report.

    A benchmark's table has the columns that fit 100 columns, as `icd benchmark` prints it;
    -v prints every number of a run, every column of a benchmark.

    The run is looked up under the storage root of the config given as for `icd run`
    (--preset/--config/--set; the `smoke` preset by default), or under --root."""
    import polars as pl

    from icd.report import build_report, print_comparison, print_headline, print_summary

    if root is None:
        root = Path(_resolve(preset, config, set_).storage.root)
    try:
        paths = build_report(target, root)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
        return
    if verbose and paths.summary is not None:
        print_summary(paths.summary, console=console)
    elif isinstance(paths.summary, pl.DataFrame):
        print_comparison(paths.summary, console=console)
    elif paths.summary:
        print_headline(paths.summary, console=console)
    _paths_line("report:", paths.html)
    for name, p in paths.plots.items():
        _paths_line(f"plot:   {name}:", p)
    if not verbose:
        console.print("every number: add -v", highlight=False)


@app.command("runs")
def list_runs(
    root: Annotated[
        Path | None,
        typer.Option(help="Storage root to list (default: the config's storage.root)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Show at most N runs.")] = 20,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """List the runs under the storage root, newest first.

    Each row: run id, mode, dataset, finished or how many chunks are committed, accuracy,
    annotation rate, and when the run last wrote. The root is found as for `icd report`: --root, or the storage root of the config given
    as for `icd run` (the `smoke` preset by default). An unfinished run shows its numbers
    so far in italics; `icd report latest` reports the first run listed."""
    from icd.report.runs import list_runs as find_runs
    from icd.report.runs import runs_rich_table

    if root is None:
        root = Path(_resolve(preset, config, set_).storage.root)
    runs = find_runs(root, limit=None)
    if not runs:
        console.print(
            f"no runs under {root.absolute()} (start one with `icd run`, or give --root)",
            highlight=False,
            soft_wrap=True,
        )
        return
    shown = runs[: max(limit, 0)]
    console.print(runs_rich_table(shown, width=console.width))
    more = f"; {len(runs) - len(shown)} older not shown (--limit)" if len(runs) > len(shown) else ""
    console.print(
        f"{len(shown)} of {len(runs)} runs under {root.absolute()}{more}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def benchmark(
    suite: Annotated[
        str,
        typer.Argument(help="Benchmark suite: a name in icd/presets/benchmarks or a YAML path."),
    ] = "smoke",
    set_: SetOpt = None,
    bench_id: Annotated[
        str | None,
        typer.Option("--id", help="Benchmark id; reuse an existing one to resume the suite."),
    ] = None,
) -> None:
    """Run a benchmark suite and print its comparison table.

    A suite is dataset × mode × budget × stream order: every setting is a `stream` run and
    an MLflow child run under one parent, and the table shows mean ± std over stream
    orders. The settings run one after another in this process, or, with `--set
    benchmark.executor=deployments` and `PREFECT_API_URL` naming a server, as runs of the
    `icd/stream` deployment on its work pool's workers. `--set benchmark.FIELD=v` changes
    the suite, any other `--set` goes to every run."""
    import polars as pl

    from icd.flows.benchmark import benchmark as benchmark_flow
    from icd.flows.benchmark import plan_suite
    from icd.flows.stream import in_process_settings
    from icd.report import print_comparison

    _quiet_prefect()
    try:
        plan_suite(suite, set_ or [])  # a bad suite fails here, in one line
        with in_process_settings():
            _local_server()
            result = benchmark_flow(suite, set_ or [], benchmark_id=bench_id)
    except _user_errors() as e:
        _fail(one_line(e))
        return
    print_comparison(pl.read_parquet(result["table"]), console=console)
    _paths_line("table: ", f"{result['markdown_path']} (every column; or icd report -v)")
    _paths_line("report:", result["report"])
    _paths_line("again: ", f"icd report {result['benchmark_id']}")


@app.command()
def reproduce(
    preset: Annotated[
        str,
        typer.Option(help="Base preset of every run: smoke (the mini-world) or paper (GPU, hub)."),
    ] = "smoke",
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Where to write the claims report.")] = Path(
        "docs/claims.md"
    ),
) -> None:
    """Run every analysis of the paper and its reviewers; write the claims report.

    The `claims` and `claims-budget` suites: baselines, gate, selection, k, demo order,
    teacher N and a_min, oracle, LoRA, budgets; three stream orders each. The report has one
    row per claim, its numbers (mean ± std) and whether it holds. Rerunning resumes the
    finished runs.

    At paper scale: `--preset paper --set "benchmark.datasets=[cub200,flowers102]"` (GPU,
    hub access)."""
    import time

    from icd.data import shapes
    from icd.flows.benchmark import benchmark as benchmark_flow
    from icd.flows.stream import in_process_settings
    from icd.report.claims import BUDGET_SUITE, CLAIMS_SUITE, build_claims

    _quiet_prefect()
    t0 = time.perf_counter()
    overrides = [f"benchmark.base_preset={preset}", *(set_ or [])]
    folders = []
    try:
        with in_process_settings():
            _local_server()
            for suite in (CLAIMS_SUITE, BUDGET_SUITE):
                console.print(f"suite {suite} ...")
                result = benchmark_flow(suite, overrides, benchmark_id=f"{suite}-{preset}")
                folders.append(Path(result["folder"]))
    except _user_errors() as e:
        _fail(one_line(e))
        return
    minutes = (time.perf_counter() - t0) / 60
    novel = shapes.NOVEL_CLASSES if preset == "smoke" else None
    table, rows = build_claims(folders, novel=novel)
    shown = [o for o in set_ or [] if not o.startswith("storage.")]  # no local paths
    command = " ".join(["icd reproduce", f"--preset {preset}", *(f"--set {o}" for o in shown)])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Claims of the paper, measured\n\n"
        "Generated by `" + command + "` (`icd/report/claims.py`) from the benchmarks in "
        f"{', '.join(f.name for f in folders)}; {minutes:.0f} minutes here. Each row compares "
        "means over stream orders (the ± is the sample std over orders).\n\n" + table
    )
    held = sum(ok for *_, ok in rows)
    console.print(f"{held}/{len(rows)} claims hold; written to {out}")


@pool_app.command("inspect")
def pool_inspect(
    uri: Annotated[str, typer.Argument(help="LanceDB URI or folder of the pool.")],
    run_id: Annotated[str | None, typer.Option(help="Only this run's rows.")] = None,
    chunk: Annotated[
        int | None,
        typer.Option(help="Only rows added by chunks 0..CHUNK: the pool as chunk CHUNK+1 saw it."),
    ] = None,
) -> None:
    """A demonstration pool: its rows, labels, agreement and versions.

    Rows stored, live (selectable), evicted and excluded; the label histogram, agreement
    statistics and the pool's versions."""
    from icd.storage.pool import inspect_pool

    try:
        info = inspect_pool(uri, run_id, through_chunk=chunk)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
        return
    table = Table(title=f"pool {uri}")
    table.add_column("field")
    table.add_column("value")
    for k, v in info.items():
        table.add_row(k, str(v))
    console.print(table)


@bench_app.command("select")
def bench_select(
    quick: Annotated[bool, typer.Option(help="Small pool sizes (seconds, not minutes).")] = False,
    sizes: Annotated[
        list[int] | None, typer.Option("--size", help="LanceDB pool size (repeatable).")
    ] = None,
    ann_sizes: Annotated[
        list[int] | None, typer.Option("--ann-size", help="ANN section pool size (repeatable).")
    ] = None,
    ann_data: Annotated[
        list[str] | None, typer.Option(help="ANN section data: random, clustered (repeatable).")
    ] = None,
    ann_min_rows: Annotated[
        int | None, typer.Option(help="ANN threshold (default: min(config default, size)).")
    ] = None,
    pool: Annotated[bool, typer.Option(help="Run the LanceDB pool section.")] = True,
    ann: Annotated[bool, typer.Option(help="Run the ANN section.")] = True,
) -> None:
    """Demonstration selection speed against numpy brute force, and approximate selection.

    Selection ms/query at pool sizes 1k/10k/100k; upsert ms/row; fragment count after 100
    chunk commits. ANN section: recall@k against exact selection, ms/query against the
    exact path, index build time and memory at 100k and 1M rows, random and clustered."""
    from icd.bench import select

    if pool:
        rows = (
            select.run_select_bench(quick=quick, sizes=tuple(sizes))
            if sizes
            else select.run_select_bench(quick=quick)
        )
        select.print_select_bench(rows)
    if ann:
        opts: dict[str, Any] = {"ann_min_rows": ann_min_rows}
        if quick:
            opts |= {"sizes": (2_000,), "dim": 64, "budget_s": 0.05, "min_rounds": 2}
        if ann_sizes:
            opts["sizes"] = tuple(ann_sizes)
        if ann_data:
            opts["data"] = tuple(ann_data)
        select.print_ann_bench(select.run_ann_bench(**opts))


@bench_app.command("overhead")
def bench_overhead(
    samples: Annotated[int, typer.Option(help="Smoke samples to stream.")] = 2000,
    chunk_size: Annotated[int, typer.Option(help="Chunk size of the flow.")] = 64,
    rounds: Annotated[
        int, typer.Option(help="Interleaved rounds of every row; each row keeps its fastest.")
    ] = 3,
) -> None:
    """What the orchestration costs: the flow's samples/s against a plain loop.

    The plain loop calls the same method and model functions without Prefect, LanceDB or
    MLflow, on the same samples in the same process; peak RSS too."""
    from icd.bench.overhead import print_overhead_bench, run_overhead_bench

    print_overhead_bench(run_overhead_bench(samples=samples, chunk_size=chunk_size, rounds=rounds))


@bench_app.command("teacher")
def bench_teacher(
    samples: Annotated[int, typer.Option(help="Samples to annotate.")] = 64,
    n: Annotated[int, typer.Option(help="Votes per sample.")] = 3,
    concurrency: Annotated[int, typer.Option(help="Concurrent requests to compare with 1.")] = 8,
) -> None:
    """OpenAI-compatible teacher throughput, concurrency 1 vs N, against a local server."""
    from icd.bench.teacher import print_teacher_bench, run_teacher_bench

    print_teacher_bench(run_teacher_bench(samples=samples, n=n, concurrency=concurrency))


@bench_app.command("student")
def bench_student(
    prompts: Annotated[int, typer.Option(help="ICL prompts (3 demos each) per backend.")] = 96,
    batch_size: Annotated[int, typer.Option(help="hf backend batch size.")] = 16,
    processor_prompts: Annotated[
        int, typer.Option(help="ICL prompts for SmolVLM's image processor alone (0: skip).")
    ] = 8,
) -> None:
    """Student in-context prompts/s through the hf and openai backends.

    The hf backend without and with its processed-image cache, and the openai backend (a
    local server on loopback); the processor's time per prompt and share of hf time (the
    student's processor splits images into crops); how well the top-k log-prob entropy
    estimate ranks samples against the exact entropy. Then SmolVLM's image processor alone
    at its real settings, without and with the cache."""
    from icd.bench import student

    student.print_student_bench(student.run_student_bench(prompts=prompts, batch_size=batch_size))
    if processor_prompts:
        student.print_processor_bench(student.run_processor_bench(prompts=processor_prompts))


@bench_app.command("scale")
def bench_scale(
    samples: Annotated[int, typer.Option(help="Smoke samples to stream.")] = 512,
) -> None:
    """Flow samples/s with lookahead 0 vs 2, thread runner vs a 2-worker Dask cluster."""
    from icd.bench.scale import print_scale_bench, run_scale_bench

    print_scale_bench(run_scale_bench(samples=samples))


@bench_app.command("fanout")
def bench_fanout(
    cells: Annotated[int, typer.Option(help="Cells of the suite (smoke streams).")] = 4,
    samples: Annotated[int, typer.Option(help="Samples per cell.")] = 256,
) -> None:
    """A suite's wall time on a work pool of 1 worker against 2.

    Starts a Prefect server on loopback, deploys `icd/stream` from the project folder and
    runs the same suite with `benchmark.executor=deployments` on 1 and on 2 process workers
    (fresh storage each, nothing cached); prints the wall times and their ratio."""
    from icd.bench.fanout import print_fanout_bench, run_fanout_bench

    print_fanout_bench(run_fanout_bench(cells=cells, limit=samples))


@app.command("serve")
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="HF model id or folder to serve (`fixtures/tiny-llava`, `fixtures/tiny-idefics3`: "
            "the mini-world teacher and student)."
        ),
    ],
    *,
    name: Annotated[
        str | None,
        typer.Option(
            help="Model name clients ask for (`model_id` in ICD's config); default: MODEL."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require `Authorization: Bearer KEY` on every request (default: open)."),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Answer length (tokens) for requests that set no max_tokens.")
    ] = 16,
    max_body_mb: Annotated[
        float, typer.Option(min=0.001, help="Request bodies larger than this get a 413 (MiB).")
    ] = 50.0,
    latency_ms: Annotated[
        float, typer.Option(min=0, help="Delay added to every request (simulates a remote API).")
    ] = 0.0,
    revision: Annotated[str, typer.Option(help="Model revision (hub models).")] = "main",
    device: Annotated[
        str, typer.Option(help="Device to run on: cpu, cuda, cuda:N or mps.")
    ] = "cpu",
) -> None:
    """Serve a local VLM over an OpenAI-compatible API, with logprobs.

    Chat completions as the official `openai` client expects them (n, seed, stop, stream,
    images as data URLs, up to 20 top_logprobs), for `models.teacher.backend: openai` (or the
    student's) with `base_url: http://127.0.0.1:8000/v1`. Stop it with Ctrl-C."""
    from icd.models.serve import serve as serve_model

    try:
        serve_model(
            model, name=name, revision=revision, host=host, port=port, api_key=api_key,
            max_tokens=max_tokens, latency_ms=latency_ms, max_body_mb=max_body_mb, device=device,
        )  # fmt: skip
    except _user_errors() as e:
        _fail(one_line(e))


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; committed chunks are kept — rerun with the same --run-id to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
