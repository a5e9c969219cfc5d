"""``icd bench student``: the student's ICL prompts through the ``hf`` backend and through
the ``openai`` backend (the local OpenAI-compatible server, :mod:`icd.models.serve`, serving
the same mini-world student on loopback), on the same prompts in the same run.

Reported per backend: ICL prompts/s, and for ``hf`` the share of the time spent in the
processor (chat template, image preprocessing, tokenisation) — what a demo-image cache
could save. For ``openai`` the rank correlation (Spearman) between the exact
``entropy_mean`` of the in-process model and the estimate from the top-``k`` log-probs the
API returns, on the same answers, for k = 5 and 20.

On this CPU the server runs the same model in one process, so the ``openai`` row shows
the HTTP/JSON/base64 overhead, not vLLM's batching: on a GPU, serve the student with vLLM
(README) and time it with ``--url``.
"""

from __future__ import annotations

import io
import random
import time
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from icd.data import shapes
from icd.method.prompts import build_prompt
from icd.method.types import Prompt
from icd.method.uncertainty import uncertainty

MODEL_NAME = "bench-student"


def icl_prompts(count: int, k: int = 3, seed: int = 0) -> list[Prompt]:
    """``count`` mini-world ICL prompts of ``k`` demos each (held-out images)."""
    rng = random.Random(seed)

    def image(i: int, s: int) -> Image.Image:
        return Image.open(io.BytesIO(shapes.render_shape(i, s))).convert("RGB")

    demos = [(image(i, 11), shapes.CLASS_NAMES[shapes.label_of(i, 11)]) for i in range(64)]
    out = []
    for i in range(count):
        chosen = rng.sample(demos, k)
        turns = [(im, shapes.QUESTION, label) for im, label in chosen]
        out.append(build_prompt(shapes.QUESTION, image(i, 12), turns))
    return out


def _timed_processor(vlm: Any) -> list[float]:
    """Wrap ``vlm``'s processor call to add its seconds to the returned list."""
    spent: list[float] = []
    processor = vlm.processor
    call = type(processor).__call__

    class Timed(type(processor)):  # type: ignore[misc]
        def __call__(self, *args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return call(self, *args, **kw)
            finally:
                spent.append(time.perf_counter() - t0)

    processor.__class__ = Timed
    return spent


def run_student_bench(*, prompts: int = 96, batch_size: int = 16) -> list[dict[str, Any]]:
    """One row per backend (see the module docstring)."""
    import torch

    from icd.models.fixtures import STUDENT, resolve_model_path
    from icd.models.hf import HFVLM
    from icd.models.openai import OpenAIStudent, OpenAITeacher
    from icd.models.serve import OpenAIServer

    torch.set_num_threads(1)
    batch = icl_prompts(prompts)
    vlm = HFVLM(
        str(resolve_model_path(f"fixtures/{STUDENT}")), batch_size=batch_size, max_new_tokens=6
    )
    vlm.generate(batch[:batch_size])  # warm-up
    spent = _timed_processor(vlm)
    t0 = time.perf_counter()
    local = vlm.generate(batch)
    hf_s = time.perf_counter() - t0
    rows = [
        {
            "backend": "hf",
            "prompts_per_s": len(batch) / hf_s,
            "processor_share": sum(spent) / hf_s,
            "ratio": 1.0,
        }
    ]
    exact = uncertainty(local, "entropy_mean")
    with OpenAIServer(vlm, model_name=MODEL_NAME, max_tokens=6) as srv:
        for top in (5, 20):
            client = OpenAITeacher(
                srv.url, MODEL_NAME, concurrency=8, max_tokens=6, top_logprobs=top,
                api_key_env="ICD_BENCH_NO_KEY", role="student",
            )  # fmt: skip
            student = OpenAIStudent(client)
            t0 = time.perf_counter()
            remote = student.generate(batch)
            seconds = time.perf_counter() - t0
            same = [a.text == b.text for a, b in zip(local, remote, strict=True)]
            estimate = uncertainty(remote, "entropy_mean")
            rows.append(
                {
                    "backend": f"openai (top-{top} logprobs)",
                    "prompts_per_s": len(batch) / seconds,
                    "processor_share": None,
                    "ratio": (len(batch) / seconds) / rows[0]["prompts_per_s"],
                    "same_answers": float(np.mean(same)),
                    "entropy_spearman": float(spearmanr(exact, estimate).statistic),
                    "entropy_lower_bound": bool(np.all(estimate <= exact + 1e-4)),
                }
            )
    return rows


def print_student_bench(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """The bench rows as a rich table."""
    table = Table(
        "backend", "ICL prompts/s", "× hf", "processor share", "same answers",
        "entropy ρ (exact vs top-k)", title="icd bench student (same prompts, same run)",
    )  # fmt: skip
    for r in rows:
        table.add_row(
            r["backend"],
            f"{r['prompts_per_s']:.1f}",
            f"{r['ratio']:.2f}",
            "–" if r["processor_share"] is None else f"{100 * r['processor_share']:.0f} %",
            "–" if "same_answers" not in r else f"{100 * r['same_answers']:.0f} %",
            "–" if "entropy_spearman" not in r else f"{r['entropy_spearman']:.3f}",
        )
    (console or Console()).print(table)
