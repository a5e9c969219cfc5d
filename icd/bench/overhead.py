"""``icd bench overhead``: what the pipeline costs on top of the method itself.

The same smoke samples go, in one run, through

- ``loop``: a plain Python loop over the chunks calling the same method and model functions
  the flow's tasks call (``icd.method``, ``icd.models.load_*``) with the demonstration pool as
  numpy arrays in memory — no Prefect, no LanceDB, no MLflow, no files;
- ``flow L0``: the ``stream`` flow as ``icd run`` runs it (Prefect tasks with cache keys and
  persisted results, LanceDB pool commits, MLflow metrics per chunk, predictions parquet per
  chunk, a run-state commit per chunk), no lookahead: a chunk's stages in order (the pool
  commit in the background during ICL), then the next chunk;
- ``flow L2``: the flow with embedding and scoring of the next two chunks running ahead;
- the loop and ``flow L0`` again at each larger chunk size asked for.

Models are loaded and the Prefect server is started by a warm-up run first, so the times are
the per-sample work; a flow's time is its whole call. ``ratio`` is samples/s relative to the
loop at the same chunk size (target: ≥ 0.8 at chunk size ≥ 64); ``same`` says whether the
run's final answers equal the loop's. CPU seconds of the process tree (with the Prefect server)
are given too: they are steadier than wall time on a busy machine.

The peak RSS of ``icd run`` at two stream lengths (each in its own child process, read from
the child's resource usage) shows memory does not grow with the stream: it is chunked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.table import Table

from icd.bench.scale import STAGES, bench_config, cpu_seconds, quiet_logs, timed_flow
from icd.config import Config
from icd.data.stream import open_stream
from icd.method import metrics, modes, steps
from icd.method.policy import PolicyState
from icd.method.prompts import build_prompt
from icd.models import load_embedder, load_student, load_teacher
from icd.models.base import Sampling

RSS_SOURCE = "fixture:shapes?n=10000"


def plain_loop(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """ICD over ``cfg``'s stream, chunk by chunk, as a plain loop with an in-memory pool.

    Per chunk, the flow's stages with the same functions and arguments: embed images, student
    zero-shot, policy, teacher votes, pool append, demo selection from the pool as it was
    before the chunk, student ICL, final answer and score. Returns one record per sample
    (``sample_id``, ``final_answer``, ``score``, ``skipped``) and the seconds spent in each
    stage (named as in the flow's summary).
    """
    if cfg.pipeline.torch_threads:
        torch.set_num_threads(cfg.pipeline.torch_threads)
    src = open_stream(cfg.data)
    task, class_names, synonyms = src.task, src.class_names, src.synonyms
    prompt_classes = class_names if cfg.method.list_classes_in_prompt else None
    plan = modes.plan(cfg.method)
    embedder = load_embedder(cfg.models.embedder)
    student = load_student(cfg.models.student)
    teacher = load_teacher(cfg.models.teacher, class_names)

    pool_img = np.zeros((0, embedder.dim), np.float32)
    pool_txt = np.zeros((0, embedder.dim), np.float32)
    pool_labels: list[str] = []
    pool_demos: list[tuple[Any, str, str]] = []  # (image, question, label) per pool row
    state = PolicyState()
    records: list[dict[str, Any]] = []
    seconds = dict.fromkeys(("load", *STAGES), 0.0)
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[stage] += now - t
        t = now

    for chunk in src.chunks(cfg.pipeline.chunk_size):
        records += [
            {"sample_id": s.sample_id, "final_answer": None, "score": None, "skipped": True}
            for s in chunk.samples
            if s.skip_reason is not None
        ]
        valid = chunk.valid
        lap("load")
        if not valid:
            continue
        vecs = embedder.embed_images([s.image for s in valid])
        lap("embed")
        zs_gens = student.generate(
            [
                build_prompt(s.question, s.image, task=task, class_names=prompt_classes)
                for s in valid
            ]
        )
        zs_answers, zs_unc = steps.student_outputs(zs_gens, cfg.method.uncertainty)
        lap("zero_shot")

        votes: dict[str, Any] = {}
        mask, state = steps.teacher_queries(
            len(valid),
            queries=plan.queries,
            uncertainties=zs_unc,
            state=state,
            policy=cfg.method.policy,
            stream_length=src.length,
        )
        asked = [s for s, q in zip(valid, mask, strict=True) if q]
        if asked:
            voting = plan.voting
            prompts = [build_prompt(s.question, s.image, task=task) for s in asked]
            sampling = Sampling(voting.n, voting.temperature, voting.include_greedy, cfg.seed)
            anns = teacher.annotate(asked, prompts, sampling)
            voted = steps.vote_annotations(anns, voting, class_names, synonyms)
            votes = {s.sample_id: v for s, v in zip(asked, voted, strict=True)}
        lap("annotate")

        before = len(pool_labels)  # demos come from the pool as it was before this chunk
        admit = steps.pool_mask([votes.get(s.sample_id) for s in valid])
        admit &= plan.pool
        added = [(int(i), votes[valid[i].sample_id]) for i in np.flatnonzero(admit)]
        if added:
            pool_img = np.concatenate([pool_img, vecs[[i for i, _ in added]]])
            pool_txt = np.concatenate([pool_txt, embedder.embed_texts([v.label for _, v in added])])
            pool_labels += [v.label for _, v in added]
            pool_demos += [(valid[i].image, valid[i].question, v.label) for i, v in added]
        lap("pool")

        icl_answers: list[str | None] = [None] * len(valid)
        need = steps.icl_mask(
            [votes.get(s.sample_id) for s in valid], forward_labels=plan.forward_labels
        )
        need &= plan.uses_icl
        rows = [i for i, n in enumerate(need) if n]
        if rows:
            query_txt = None
            if steps.needs_query_text(plan.selection, pool_size=before):
                query_txt = embedder.embed_texts([zs_answers[i] for i in rows])
            chosen = steps.choose_demos(
                vecs[rows],
                query_txt,
                pool_img[:before],
                pool_txt[:before],
                np.array(pool_labels[:before], dtype=object),
                selection=plan.selection,
                seed=cfg.seed,
                query_ids=[valid[i].sample_id for i in rows],
            )
            prompts = [
                build_prompt(
                    valid[i].question,
                    valid[i].image,
                    [pool_demos[j] for j in idx],
                    task=task,
                    class_names=prompt_classes,
                )
                for i, idx in zip(rows, chosen, strict=True)
            ]
            answers, _ = steps.student_outputs(student.generate(prompts), cfg.method.uncertainty)
            for i, a in zip(rows, answers, strict=True):
                icl_answers[i] = a
        lap("icl")

        finals = steps.final_answers(
            plan, zs_answers, icl_answers, [votes.get(s.sample_id) for s in valid]
        )
        for s, (final, _) in zip(valid, finals, strict=True):
            records.append(
                {
                    "sample_id": s.sample_id,
                    "final_answer": final,
                    "score": metrics.score(final, s.answers, task, synonyms) if s.answers else None,
                    "skipped": False,
                }
            )
        lap("evaluate")
    return records, seconds


def _loop_row(cfg: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    load = os.getloadavg()[0]
    records, seconds = plain_loop(cfg)
    wall = time.perf_counter() - t0
    row = {
        "config": "loop",
        "samples": len(records),
        "seconds": wall,
        "samples_per_s": len(records) / wall,
        "cpu_s": cpu_seconds() - cpu0,
        "load_avg": load,
        **{f"s_{k}": v for k, v in seconds.items()},
    }
    return row, records


def _same_answers(run_dir: Path, records: list[dict[str, Any]]) -> bool:
    """Whether a flow run's final answers are the loop's, sample by sample."""
    flow = pl.read_parquet(run_dir / "predictions.parquet")
    loop = pl.DataFrame(records).select(pl.col("sample_id"), pl.col("final_answer").cast(pl.String))
    cols = ["sample_id", "final_answer"]
    return flow.select(cols).sort("sample_id").equals(loop.sort("sample_id"))


def peak_rss_mb(samples: int, chunk_size: int, root: Path, source: str = RSS_SOURCE) -> float:
    """Peak RSS (MB) of ``icd run`` over ``samples`` smoke samples from ``source``, run in a
    child process (the largest process of its tree: the flow, not the Prefect server)."""
    cmd = [
        sys.executable,
        "-m",
        "icd.cli",
        "run",
        "--preset",
        "smoke",
        "--no-progress",
        *("--set", f"data.limit={samples}"),
        *("--set", f"data.source={source}"),
        *("--set", f"pipeline.chunk_size={chunk_size}"),
        *("--set", "pipeline.cache=false"),
        *("--set", f"storage.root={root}"),
    ]
    env = {**os.environ, "PREFECT_LOCAL_STORAGE_PATH": str(root / "results")}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"icd run over {samples} samples failed ({code}): {tail}")
    return usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def run_overhead_bench(
    samples: int = 2000,
    chunk_size: int = 64,
    rss_samples: tuple[int, ...] = (2000, 10000),
    larger_chunks: tuple[int, ...] = (256,),
    rounds: int = 3,
) -> pl.DataFrame:
    """Samples/s of the stream flow (lookahead 0 and 2) vs the plain loop on the same
    ``samples`` smoke samples with ``chunk_size`` samples per chunk, in this run; each of
    ``larger_chunks`` adds a loop and a lookahead-0 flow row at that chunk size. ``ratio`` is
    samples/s over the loop's at the same chunk size, ``cpu_ratio`` the loop's CPU seconds over
    the row's; the best of ``rounds`` interleaved rounds counts. Then one row per entry of
    ``rss_samples``: the peak RSS of ``icd run`` over that many samples at ``chunk_size``."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    quiet_logs()
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="icd-bench-over-")))
        stack.enter_context(temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / "results"}))

        def cfg(n: int, size: int, *sets: str) -> Config:
            return bench_config(root, n, f"pipeline.chunk_size={size}", *sets)

        timed_flow(cfg(min(samples, 2 * chunk_size), chunk_size), "warmup")  # server, models
        plan = [(chunk_size, (0, 2)), *((size, (0,)) for size in larger_chunks)]
        for _ in range(rounds):
            for size, lookaheads in plan:
                loop, records = _loop_row(cfg(samples, size))
                runs.setdefault(("loop", size), []).append(loop)
                for lookahead in lookaheads:
                    name = f"flow L{lookahead}"
                    run = timed_flow(cfg(samples, size, f"pipeline.lookahead={lookahead}"), name)
                    run["same"] = _same_answers(Path(run.pop("run_dir")), records)
                    runs.setdefault((name, size), []).append(run)

    keep = ("config", "samples", "seconds", "samples_per_s", "cpu_s", "load_avg")
    stages = [f"s_{k}" for k in STAGES]
    rows = []
    for (name, size), rs in runs.items():
        fastest = max(rs, key=lambda r: r["samples_per_s"])
        row = {k: fastest.get(k) for k in (*keep, *stages)}
        # every round's run gave the loop's answers, not just the fastest one
        row.update(chunk_size=size, same=None if name == "loop" else all(r["same"] for r in rs))
        rows.append(row)
    loop = pl.col("config") == "loop"
    df = pl.DataFrame(rows).with_columns(
        ratio=pl.col("samples_per_s")
        / pl.col("samples_per_s").filter(loop).first().over("chunk_size"),
        cpu_ratio=pl.col("cpu_s").filter(loop).first().over("chunk_size") / pl.col("cpu_s"),
    )
    rss = []
    for n in rss_samples:
        with tempfile.TemporaryDirectory(prefix="icd-bench-rss-") as tmp:
            mb = peak_rss_mb(n, chunk_size, Path(tmp))
        rss.append({"config": "icd run", "samples": n, "chunk_size": chunk_size, "peak_rss_mb": mb})
    schema = {"config": pl.String, "samples": pl.Int64, "chunk_size": pl.Int64}
    mem = pl.DataFrame(rss, schema={**schema, "peak_rss_mb": pl.Float64})
    return pl.concat([df, mem], how="diagonal_relaxed")


def print_overhead_bench(df: pl.DataFrame, console: Console | None = None) -> None:
    """Print the throughput table and the peak-RSS table (rich)."""
    console = console or Console()
    runs = df.filter(pl.col("seconds").is_not_null())
    table = Table(title="stream flow vs plain loop: samples/s (same samples, same run)")
    for col in (
        "config",
        "samples",
        "chunk",
        "seconds",
        "samples/s",
        "ratio",
        "cpu s",
        "cpu ratio",
        "same",
        "load avg",
    ):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in runs.iter_rows(named=True):
        table.add_row(
            r["config"],
            str(r["samples"]),
            str(r["chunk_size"]),
            f"{r['seconds']:.1f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['ratio']:.2f}x",
            f"{r['cpu_s']:.1f}",
            f"{r['cpu_ratio']:.2f}x",
            "" if r["same"] is None else ("yes" if r["same"] else "NO"),
            f"{r['load_avg']:.1f}",
        )
    console.print(table)
    stages = Table(title="seconds per stage (the flow's from its run summary)")
    for col in ("config", "chunk", *STAGES):
        stages.add_column(col, justify="left" if col == "config" else "right")
    for r in runs.iter_rows(named=True):
        stages.add_row(r["config"], str(r["chunk_size"]), *(f"{r[f's_{k}']:.1f}" for k in STAGES))
    console.print(stages)
    mem = df.filter(pl.col("peak_rss_mb").is_not_null())
    if mem.height:
        rss = Table(title="peak RSS of `icd run` (child process)")
        for col in ("samples", "peak RSS MB"):
            rss.add_column(col, justify="right")
        for r in mem.iter_rows(named=True):
            rss.add_row(str(r["samples"]), f"{r['peak_rss_mb']:.0f}")
        console.print(rss)
