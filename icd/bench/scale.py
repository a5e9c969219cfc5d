"""``icd bench scale``: throughput of the stream flow when its stages are pipelined and when
embedding/scoring run on a Dask cluster, against the plain sequential flow, same run.

All runs stream the same smoke samples (fresh run ids, task cache off, a temporary storage
root, one torch thread per process as the smoke preset says):

- ``thread L0``: thread-pool runner, no lookahead — every stage of a chunk one after another
  (the baseline);
- ``thread L2``: thread-pool runner, the embedding and zero-shot scoring of the next two chunks
  run while the current chunk is annotated, pooled and predicted;
- ``dask L2``: the same on a 2-worker local Dask cluster started once for the bench (its
  workers have imported the code and loaded their models in a warm-up run);
- ``dask L2 (cold)``: ``pipeline.task_runner=dask`` as a user runs it — the flow starts and
  closes its own local cluster, so worker start-up and model loading are inside the time.

Warm configurations run ``rounds`` times, interleaved so machine noise hits them alike, and the
fastest round counts. Each row also gives the stage seconds from the run summary
(``embed``+``score`` is the part that can run ahead; ``annotate``, ``pool``, ``icl`` and
``evaluate`` are sequential), the CPU seconds of the whole process tree (this process, the
Prefect server, Dask workers) and ``cores_busy`` = CPU seconds / wall seconds.
"""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import polars as pl
import psutil
from rich.console import Console
from rich.table import Table

from icd.config import Config, load_config

STAGES = ("embed", "score", "annotate", "pool", "icl", "evaluate")
AHEAD = ("embed", "score")  # stages that do not depend on the pool


def quiet_logs() -> None:
    """Keep bench output to the tables: Prefect run logs and Dask chatter at WARNING, here and
    in worker processes started from now on."""
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] = "WARNING"
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "distributed", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process, its reaped children and its
    live child processes (the Prefect server, Dask workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # ended meanwhile (its time is then in RUSAGE_CHILDREN)
            pass
    return total


def bench_config(root: Path, samples: int, *sets: str) -> Config:
    """The smoke preset over ``samples`` samples, cache off, storage under ``root``."""
    return load_config(
        "smoke",
        overrides=[
            f"storage.root={root}",
            f"data.limit={samples}",
            "pipeline.cache=false",
            *sets,
        ],
    )


def timed_flow(cfg: Config, name: str) -> dict[str, Any]:
    """Run the stream flow in this process under a fresh run id; its wall and CPU seconds,
    samples/s and stage seconds, as one table row."""
    from icd.flows.stream import stream

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    load = os.getloadavg()[0]
    summary = stream(config_json=cfg.model_dump_json(), run_id=f"{name}-{uuid.uuid4().hex[:8]}")
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    stages = summary["seconds"]
    return {
        "config": name,
        "runner": cfg.pipeline.task_runner,
        "lookahead": cfg.pipeline.lookahead,
        "samples": summary["samples"],
        "seconds": wall,
        "samples_per_s": summary["samples"] / wall,
        "cpu_s": cpu,
        "cores_busy": cpu / wall,
        "load_avg": load,
        **{f"s_{k}": float(stages.get(k, 0.0)) for k in STAGES},
        "teacher_calls": summary["teacher_calls"],
        "pool_size": summary["pool_size"],
        "run_dir": summary["run_dir"],
    }


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=lambda r: r["samples_per_s"])


def run_scale_bench(samples: int = 512, rounds: int = 2, cold: bool = True) -> pl.DataFrame:
    """Samples/s of the stream flow on ``samples`` smoke samples: lookahead 0 vs 2 on the
    thread runner, and the thread runner vs a 2-worker local Dask cluster (lookahead 2), all
    in this run; ``ratio`` is samples/s relative to ``thread L0``. With ``cold`` a last row
    times a flow that starts its own cluster. Every run must report the same teacher calls
    and pool size (the scheduling may not change results); ``ValueError`` otherwise."""
    import distributed
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from icd.flows.stream import dask_cluster_kwargs

    quiet_logs()
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="icd-bench-scale-")))
        stack.enter_context(temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / "results"}))

        def cfg(n: int, *sets: str) -> Config:
            return bench_config(root, n, *sets)

        warm = min(samples, 64)
        # Warm-up: Prefect server, MLflow store and this process's models.
        timed_flow(cfg(warm), "warmup")
        cluster = stack.enter_context(distributed.LocalCluster(**dask_cluster_kwargs(cfg(warm))))
        dask = (
            "pipeline.task_runner=dask",
            f"pipeline.dask_address={cluster.scheduler_address}",
        )
        timed_flow(cfg(warm, *dask, "pipeline.lookahead=2"), "warmup-dask")

        configs = {
            "thread L0": ("pipeline.lookahead=0",),
            "thread L2": ("pipeline.lookahead=2",),
            "dask L2": (*dask, "pipeline.lookahead=2"),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for _ in range(rounds):
            for name, sets in configs.items():
                runs[name].append(timed_flow(cfg(samples, *sets), name))
        rows = [_best(r) for r in runs.values()]
        cluster.close()

    if cold:
        with ExitStack() as stack:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="icd-bench-scale-")))
            stack.enter_context(temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / "results"}))
            sets = ("pipeline.task_runner=dask", "pipeline.lookahead=2")
            rows.append(timed_flow(bench_config(root, samples, *sets), "dask L2 (cold)"))

    outcomes = {(r["teacher_calls"], r["pool_size"]) for r in rows}
    if len(outcomes) != 1:
        raise ValueError(f"runs disagree on (teacher calls, pool size): {sorted(outcomes)}")
    df = pl.DataFrame(rows).drop("run_dir")
    base = df.filter(pl.col("config") == "thread L0")["samples_per_s"][0]
    return df.with_columns(ratio=pl.col("samples_per_s") / base)


def _ratio(df: pl.DataFrame, a: str, b: str) -> float:
    rate = dict(zip(df["config"], df["samples_per_s"], strict=True))
    return rate[a] / rate[b]


def print_scale_bench(df: pl.DataFrame, console: Console | None = None) -> None:
    """Print the bench table (rich) and its two headline ratios."""
    console = console or Console()
    table = Table(
        title="stream flow: samples/s by task runner and lookahead (same samples, same run)"
    )
    cols = ("config", "samples", "seconds", "samples/s", "ratio", "cpu s", "cores busy")
    for col in (*cols, *(f"{s} s" for s in STAGES), "load avg"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in df.iter_rows(named=True):
        table.add_row(
            r["config"],
            str(r["samples"]),
            f"{r['seconds']:.1f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['ratio']:.2f}x",
            f"{r['cpu_s']:.1f}",
            f"{r['cores_busy']:.2f}",
            *(f"{r[f's_{s}']:.1f}" for s in STAGES),
            f"{r['load_avg']:.1f}",
        )
    console.print(table)
    console.print(
        f"lookahead 2 vs 0 (thread runner): {_ratio(df, 'thread L2', 'thread L0'):.2f}x; "
        f"Dask (2 workers) vs threads, lookahead 2: {_ratio(df, 'dask L2', 'thread L2'):.2f}x "
        f"on {os.cpu_count()} cores"
    )
    console.print(
        "stage seconds: embed+score can run ahead (on other threads or workers); annotate, "
        "pool, icl and evaluate run one chunk after another in the flow."
    )
