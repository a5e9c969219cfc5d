"""``icd bench student``: the student's ICL prompts through the ``hf`` backend without and
with its processed-image cache (:mod:`icd.models.image_cache`), and through the ``openai``
backend (the local OpenAI-compatible server, :mod:`icd.models.serve`, serving the same
mini-world student on loopback), on the same prompts in the same run.

The student's processor splits each image into crops (``do_image_splitting``, 4x4 crops plus
the whole image, as SmolVLM does at its default size), so preprocessing is real work, as it
is for SmolVLM's real checkpoints. Each demo image comes back in several prompts.

Reported per backend: ICL prompts/s and the ratio to ``hf`` without the cache; for ``hf``
the share of the time spent in the processor (chat template, image preprocessing,
tokenisation), per prompt and as a share of its time, and the image cache's hit rate; the share of answers equal to those of
``hf`` without the cache. For ``openai`` the rank correlation (Spearman) between the exact
``entropy_mean`` of the in-process model and the estimate from the top-``k`` log-probs the
API returns, on the same answers, for k = 5 and 20.

On this CPU the server runs the same model in one process, so the ``openai`` row shows
the HTTP/JSON/base64 overhead, not vLLM's batching: on a GPU, serve the student with vLLM
(docs/reference.md, "Serving the student with vLLM") and compare there.
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


def icl_prompts(count: int, k: int = 3, seed: int = 0, images_seed: int = 11) -> list[Prompt]:
    """``count`` mini-world ICL prompts of ``k`` demos each, drawn from 64 demo images (so
    demos repeat across prompts); the queries are other images."""
    rng = random.Random(seed)

    def image(i: int, s: int) -> Image.Image:
        return Image.open(io.BytesIO(shapes.render_shape(i, s))).convert("RGB")

    demos = [
        (image(i, images_seed), shapes.CLASS_NAMES[shapes.label_of(i, images_seed)])
        for i in range(64)
    ]
    out = []
    for i in range(count):
        chosen = rng.sample(demos, k)
        turns = [(im, shapes.QUESTION, label) for im, label in chosen]
        out.append(build_prompt(shapes.QUESTION, image(i, images_seed + 1), turns))
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


# 4x4 crops of 32 px plus the whole image: 17 crops per image (SmolVLM: 4x4 of 512 px)
SPLITTING = {"do_image_splitting": True, "size": {"longest_edge": 128}}


def run_student_bench(
    *, prompts: int = 96, batch_size: int = 16, cache_mb: float = 1024
) -> list[dict[str, Any]]:
    """One row per backend (see the module docstring)."""
    import torch

    from icd.models.fixtures import STUDENT, resolve_model_path
    from icd.models.hf import HFVLM
    from icd.models.openai import OpenAIOptions, OpenAIStudent
    from icd.models.serve import OpenAIServer

    torch.set_num_threads(1)
    batch = icl_prompts(prompts)
    warm_up = icl_prompts(batch_size, seed=1, images_seed=99)  # other images: a cold cache
    path = str(resolve_model_path(f"fixtures/{STUDENT}"))
    rows: list[dict[str, Any]] = []
    local: list[Any] = []
    plain = HFVLM(path, batch_size=batch_size, max_new_tokens=6, processor_kwargs=SPLITTING)
    vlm = HFVLM(
        path, batch_size=batch_size, max_new_tokens=6, processor_kwargs=SPLITTING,
        image_cache_mb=cache_mb,
    )  # fmt: skip
    # the same prompts: without the cache, with it (its first sight of these images), and
    # again with it (every image cached, as pool images are in a long run)
    timers: dict[int, list[float]] = {}
    for label, model in (("hf", plain), ("hf + image cache", vlm), ("hf + image cache, warm", vlm)):
        if id(model) not in timers:
            model.generate(warm_up)
            timers[id(model)] = _timed_processor(model)
        spent = timers[id(model)]
        spent.clear()
        cache = model.image_cache
        if cache is not None:
            cache.hits = cache.misses = 0
        t0 = time.perf_counter()
        gens = model.generate(batch)
        seconds = time.perf_counter() - t0
        local = local or gens
        rows.append(
            {
                "backend": label,
                "prompts_per_s": len(batch) / seconds,
                "processor_share": sum(spent) / seconds,
                "processor_ms": 1000 * sum(spent) / len(batch),
                "cache_hit_rate": None
                if cache is None
                else cache.hits / max(1, cache.hits + cache.misses),
                "same_answers": float(
                    np.mean([a.text == b.text for a, b in zip(local, gens, strict=True)])
                ),
            }
        )
    exact = uncertainty(local, "entropy_mean")
    with OpenAIServer(vlm, model_name=MODEL_NAME, max_tokens=6) as srv:
        for top in (5, 20):
            options = OpenAIOptions(
                concurrency=8, max_tokens=6, top_logprobs=top, api_key_env="ICD_BENCH_NO_KEY"
            )
            student = OpenAIStudent(srv.url, MODEL_NAME, options)
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
                    "processor_ms": None,
                    "cache_hit_rate": None,
                    "same_answers": float(np.mean(same)),
                    "entropy_spearman": float(spearmanr(exact, estimate).statistic),
                    "entropy_lower_bound": bool(np.all(estimate <= exact + 1e-4)),
                }
            )
    for r in rows:
        r["ratio"] = r["prompts_per_s"] / rows[0]["prompts_per_s"]
    return rows


# SmolVLM's own image processor settings: upscale to 2048 px, split into 512 px crops
SMOLVLM_PROCESSOR = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}


def run_processor_bench(*, prompts: int = 8, k: int = 3) -> list[dict[str, Any]]:
    """SmolVLM's image processor alone (its real settings, no model) on ``prompts`` ICL
    prompts of ``k`` demos and a query, images of 500×375 px (a typical dataset photo):
    without the image cache, with it on first sight of the images, and warm. One row each:
    images/s, ms per prompt, the ratio to no cache; every output equal to the uncached."""
    from transformers import SmolVLMImageProcessorPil

    from icd.models.image_cache import CachedImageProcessor, layout_of

    def photo(i: int, seed: int) -> Image.Image:
        image = Image.open(io.BytesIO(shapes.render_shape(i, seed))).convert("RGB")
        return image.resize((500, 375))

    rng = random.Random(0)
    demos = [photo(i, 11) for i in range(max(k, 2 * k))]
    batch = [[*rng.sample(demos, k), photo(i, 12)] for i in range(prompts)]
    inner = SmolVLMImageProcessorPil(**SMOLVLM_PROCESSOR)
    cached = CachedImageProcessor(inner, layout=layout_of(inner), max_bytes=2**33)
    cached([[photo(0, 99)]], return_tensors="np")  # the option set's one-time check
    want = inner(batch, return_tensors="np")
    rows = []
    for label, call in (
        ("no cache", inner),
        ("image cache", cached),
        ("image cache, warm", cached),
    ):
        t0 = time.perf_counter()
        got = call(batch, return_tensors="np")
        seconds = time.perf_counter() - t0
        same = all(np.array_equal(want[key], got[key]) for key in want if key in got)
        rows.append(
            {
                "processor": label,
                "images_per_s": prompts * (k + 1) / seconds,
                "ms_per_prompt": 1000 * seconds / prompts,
                "same_outputs": same and want.keys() == got.keys(),
            }
        )
    for r in rows:
        r["ratio"] = r["images_per_s"] / rows[0]["images_per_s"]
    return rows


def print_processor_bench(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """The processor bench rows as a rich table."""
    table = Table(
        "SmolVLM image processor", "images/s", "ms per ICL prompt", "× no cache", "same outputs",
        title="image preprocessing alone, SmolVLM's settings (2048 px, 512 px crops)",
    )  # fmt: skip
    for r in rows:
        table.add_row(
            r["processor"],
            f"{r['images_per_s']:.1f}",
            f"{r['ms_per_prompt']:.0f}",
            f"{r['ratio']:.1f}",
            "yes" if r["same_outputs"] else "NO",
        )
    (console or Console()).print(table)


def print_student_bench(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """The bench rows as a rich table."""

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.0f} %"

    table = Table(
        "backend", "ICL prompts/s", "× hf", "processor ms/prompt", "processor share",
        "image cache hits",
        "same answers", "entropy ρ (exact vs top-k)",
        title="icd bench student (same prompts, same run)",
    )  # fmt: skip
    for r in rows:
        table.add_row(
            r["backend"],
            f"{r['prompts_per_s']:.1f}",
            f"{r['ratio']:.2f}",
            "–" if r["processor_ms"] is None else f"{r['processor_ms']:.1f}",
            pct(r["processor_share"]),
            pct(r["cache_hit_rate"]),
            pct(r["same_answers"]),
            "–" if "entropy_spearman" not in r else f"{r['entropy_spearman']:.3f}",
        )
    (console or Console()).print(table)
