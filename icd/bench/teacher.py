"""``icd bench teacher``: throughput of the ``openai`` teacher, concurrency 1 vs C.

Starts the local OpenAI-compatible server (:mod:`icd.models.serve`) on loopback, serving the tiny fixture teacher through the ``hf`` backend, and annotates the
same samples (same seed, same N) with concurrency 1 and with concurrency C, in the same
run, in three settings:

- ``server only``: bound by the model's CPU time, which the one-process server
  serialises, so concurrency gains little;
- ``+L ms latency``: the same plus ``latency_ms`` per request (network and queueing of a
  remote teacher), which concurrency overlaps;
- ``+L ms, spare capacity``: the latency alone, the answers memoised by the server after
  a warm-up pass — a remote teacher with capacity to spare (a GPU server batching
  concurrent requests); this isolates what the client's concurrency buys.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from icd.data.types import Sample
from icd.method.types import Prompt
from icd.models.base import Sampling
from icd.models.openai import OpenAIOptions, OpenAITeacher
from icd.models.serve import OpenAIServer

QUESTION = "What shape is shown in the image?"
MODEL_NAME = "bench-teacher"


def _teacher(url: str, concurrency: int, max_tokens: int) -> OpenAITeacher:
    options = OpenAIOptions(
        concurrency=concurrency,
        max_tokens=max_tokens,
        api_key_env="ICD_BENCH_NO_KEY",  # the local server needs no key
    )
    return OpenAITeacher(url, MODEL_NAME, options)


def bench_samples(count: int, seed: int = 0) -> tuple[list[Sample], list[Prompt]]:
    """``count`` deterministic samples (a coloured shape on a plain background) and their
    zero-shot prompts."""
    rng = np.random.default_rng(seed)
    samples, prompts = [], []
    for i in range(count):
        bg, fg = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        img = Image.new("RGB", (64, 64), bg)
        x0, y0 = (int(v) for v in rng.integers(4, 28, 2))
        ImageDraw.Draw(img).ellipse((x0, y0, x0 + 30, y0 + 30), fill=fg)
        samples.append(Sample(f"bench-{i}", i, QUESTION, ["circle"], image=img))
        prompts.append(
            Prompt(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": QUESTION}],
                    }
                ],
                images=[img],
            )
        )
    return samples, prompts


def run_teacher_bench(
    samples: int = 64,
    n: int = 3,
    concurrency: int = 8,
    latency_ms: float = 100.0,
    max_new_tokens: int = 6,
) -> pl.DataFrame:
    """Samples/s of the ``openai`` teacher at concurrency 1 and ``concurrency`` against the
    local server, in the three settings of this module's docstring.

    One row per (setting, concurrency): seconds, samples/s, requests, p50/p95 latency, and
    ``speedup`` = samples/s over the same setting's concurrency-1 row.
    """
    from icd.models.fixtures import TEACHER, resolve_model_path
    from icd.models.hf import HFVLM

    path = resolve_model_path(f"fixtures/{TEACHER}")
    model = HFVLM(str(path), max_new_tokens=max_new_tokens)
    data, prompts = bench_samples(samples)
    rows = []
    settings = [
        ("server only", 0.0, False),
        (f"+{latency_ms:g} ms latency", latency_ms, False),
        (f"+{latency_ms:g} ms, spare capacity", latency_ms, True),
    ]
    with OpenAIServer(model, model_name=MODEL_NAME, max_tokens=max_new_tokens) as srv:
        sampling = Sampling(n, temperature=0.7, include_greedy=True, seed=0)
        _teacher(srv.url, concurrency, max_new_tokens).annotate(data[:2], prompts[:2], sampling)
        for setting, delay, memoize in settings:
            if memoize:  # the warm-up pass fills the server's memo with these very requests
                srv.latency_ms, srv.memoize = 0.0, True
                _teacher(srv.url, concurrency, max_new_tokens).annotate(data, prompts, sampling)
            srv.latency_ms, srv.memoize = delay, memoize
            base = None
            for conc in (1, concurrency):
                teacher = _teacher(srv.url, conc, max_new_tokens)
                t0 = time.perf_counter()
                anns = teacher.annotate(data, prompts, sampling)
                seconds = time.perf_counter() - t0
                st = teacher.stats()
                rate = samples / seconds
                base = base or rate
                rows.append(
                    {
                        "setting": setting,
                        "latency_ms": delay,
                        "concurrency": conc,
                        "samples": samples,
                        "n": n,
                        "requests": st["requests"],
                        "errors": sum(a.error is not None for a in anns),
                        "seconds": round(seconds, 3),
                        "samples_per_s": round(rate, 2),
                        "speedup": round(rate / base, 2),
                        "p50_ms": round(st["latency_p50_ms"], 1),
                        "p95_ms": round(st["latency_p95_ms"], 1),
                    }
                )
    return pl.DataFrame(rows)


def print_teacher_bench(df: pl.DataFrame, console: Console | None = None) -> None:
    """Print the bench table (rich), one row per (setting, concurrency)."""
    table = Table(title="openai teacher: samples/s, concurrency 1 vs C (same samples, same run)")
    for col in (
        "setting",
        "concurrency",
        "requests",
        "seconds",
        "samples_per_s",
        "speedup",
        "p50_ms",
        "p95_ms",
        "errors",
    ):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for row in df.iter_rows(named=True):
        table.add_row(
            row["setting"],
            str(row["concurrency"]),
            str(row["requests"]),
            f"{row['seconds']:.2f}",
            f"{row['samples_per_s']:.2f}",
            f"{row['speedup']:.2f}x",
            f"{row['p50_ms']:.0f}",
            f"{row['p95_ms']:.0f}",
            str(row["errors"]),
        )
    (console or Console()).print(table)
