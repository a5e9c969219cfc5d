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
fastest round counts (a flow run's end waits for Prefect's heartbeat thread, which sleeps in
1 s steps, so single wall times are coarse). Each row also gives the stage seconds from the run
summary (``embed`` and ``score``: time inside those tasks, the part that can run ahead;
``annotate``, ``pool``, ``icl``, ``evaluate``: time of the sequential stages in the flow), the
CPU seconds of the whole process tree (this process, the Prefect server, Dask workers) and
``cores_busy`` = CPU seconds / wall seconds.
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
from icd.tasks.runner import STAGES as RUNNER_STAGES

STAGES = tuple(s for s in RUNNER_STAGES if s != "adapt")  # no fine-tuning in these benches


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
    """Run the stream flow in this process under a fresh run id; as one table row: its wall
    seconds (``seconds``, the whole call; ``stream_seconds``, until the last chunk was
    committed, without the run's closing summary and artifacts), samples/s of each, CPU
    seconds and the stage seconds of the summary."""
    from icd.flows import stream as stream_mod

    commits: list[float] = []

    def hook(chunks: int, samples: int, total: int | None) -> None:
        commits.append(time.perf_counter())

    stream_mod.CHUNK_HOOKS.append(hook)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    load = os.getloadavg()[0]
    try:
        with stream_mod.in_process_settings():  # as `icd run` runs it
            summary = stream_mod.stream(
                config_json=cfg.model_dump_json(), run_id=f"{name}-{uuid.uuid4().hex[:8]}"
            )
    finally:
        stream_mod.CHUNK_HOOKS.remove(hook)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    to_last = (commits[-1] if commits else time.perf_counter()) - t0
    stages = summary["seconds"]
    return {
        "config": name,
        "runner": cfg.pipeline.task_runner,
        "lookahead": cfg.pipeline.lookahead,
        "samples": summary["samples"],
        "seconds": wall,
        "samples_per_s": summary["samples"] / wall,
        "stream_seconds": to_last,
        "stream_per_s": summary["samples"] / to_last,
        "cpu_s": cpu,
        "cores_busy": cpu / wall,
        "load_avg": load,
        **{f"s_{k}": float(stages.get(k, 0.0)) for k in STAGES},
        "teacher_calls": summary["teacher_calls"],
        "pool_size": summary["pool_size"],
        "run_dir": summary["run_dir"],
    }


def run_scale_bench(samples: int = 512, rounds: int = 3, cold: bool = True) -> pl.DataFrame:
    """Samples/s of the stream flow on ``samples`` smoke samples: lookahead 0 vs 2 on the
    thread runner, and the thread runner vs a 2-worker local Dask cluster (lookahead 2), all
    in this run; ``ratio`` is ``stream_per_s`` (samples/s until the last chunk commit, which
    leaves out the run's fixed closing work) relative to ``thread L0``. With ``cold`` a last row
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
        runs: dict[str, list[dict[str, Any]]] = {}
        with distributed.LocalCluster(**dask_cluster_kwargs(cfg(warm))) as cluster:
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
            for _ in range(rounds):
                for name, sets in configs.items():
                    runs.setdefault(name, []).append(timed_flow(cfg(samples, *sets), name))
        if cold:
            sets = ("pipeline.task_runner=dask", "pipeline.lookahead=2")
            runs["dask L2 (cold)"] = [timed_flow(cfg(samples, *sets), "dask L2 (cold)")]

    outcomes = {(r["teacher_calls"], r["pool_size"]) for rs in runs.values() for r in rs}
    if len(outcomes) != 1:
        raise ValueError(f"runs disagree on (teacher calls, pool size): {sorted(outcomes)}")
    rows = [max(rs, key=lambda r: r["stream_per_s"]) for rs in runs.values()]
    df = pl.DataFrame(rows).drop("run_dir")
    base = df.filter(pl.col("config") == "thread L0")["stream_per_s"][0]
    return df.with_columns(ratio=pl.col("stream_per_s") / base)


def _ratio(df: pl.DataFrame, a: str, b: str) -> float:
    rate = dict(zip(df["config"], df["stream_per_s"], strict=True))
    return rate[a] / rate[b]


def print_scale_bench(df: pl.DataFrame, console: Console | None = None) -> None:
    """Print the bench tables (rich) and the two headline ratios."""
    console = console or Console()
    table = Table(title="stream flow: samples/s by task runner and lookahead (same run)")
    cols = ("config", "samples", "stream s", "samples/s", "ratio", "total s", "cpu s", "cores")
    for col in (*cols, "load"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in df.iter_rows(named=True):
        table.add_row(
            r["config"],
            str(r["samples"]),
            f"{r['stream_seconds']:.1f}",
            f"{r['stream_per_s']:.1f}",
            f"{r['ratio']:.2f}x",
            f"{r['seconds']:.1f}",
            f"{r['cpu_s']:.1f}",
            f"{r['cores_busy']:.2f}",
            f"{r['load_avg']:.1f}",
        )
    console.print(table)
    stages = Table(title="seconds per stage (run summary; embed and score can run ahead)")
    for col in ("config", *STAGES):
        stages.add_column(col, justify="left" if col == "config" else "right")
    for r in df.iter_rows(named=True):
        stages.add_row(r["config"], *(f"{r[f's_{k}']:.1f}" for k in STAGES))
    console.print(stages)
    console.print(
        "stream s: until the last chunk commit; total s: the whole flow call; cores: CPU "
        "seconds of this process, the Prefect server and Dask workers per wall second."
    )
    console.print(
        f"lookahead 2 vs 0 (thread runner): {_ratio(df, 'thread L2', 'thread L0'):.2f}x; "
        f"Dask (2 workers) vs threads at lookahead 2: {_ratio(df, 'dask L2', 'thread L2'):.2f}x; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
