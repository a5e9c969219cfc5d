"""``python -m icd.bench.sampler``: decode steps/s of the HF teacher's seeded sampling.

The teacher draws each sampled answer from its own (seed, sample id, draw) generator. This
benchmark decodes the same prompts with the same seeds on a tiny LLaVA whose language model
has a Qwen-sized vocabulary (152,064 tokens), in the same run, with

- ``host, row by row`` (the baseline): the full-vocabulary probabilities copied to the host
  and one ``torch.multinomial`` per row per step, CPU generators;
- ``on device, one buffer``: :class:`icd.models.hf._RowSampler` — generators on the model's
  device, each row's exponential noise drawn into one buffer, one argmax for all rows.

It prints steps/s of both and their ratio, and checks that both give the same answers (on
CPU they must: the exponential race is how ``torch.multinomial`` draws one sample). On a GPU
the baseline also pays a device-to-host copy of ``rows × vocabulary`` floats and a sync per
step, which the on-device sampler does not.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor

import icd.models.hf as hf
from icd.data.types import Sample
from icd.method.prompts import build_prompt
from icd.models.base import Sampling

VOCAB = 152_064  # Qwen2 / Qwen2.5-VL


class HostRowSampler(LogitsProcessor):
    """The baseline: probabilities on the host, one ``torch.multinomial`` per row."""

    def __init__(self, temperature: float, seeds: Sequence[int]) -> None:
        self.temperature = temperature
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)
        picks = torch.cat(
            [
                torch.multinomial(p, 1, generator=g)
                for p, g in zip(probs, self.generators, strict=True)
            ]
        )
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), picks.to(scores.device)] = 0.0
        return out


def build_big_vocab_teacher(folder: Path, vocab: int = VOCAB) -> Path:
    """The fixture LLaVA teacher's architecture and processor with a ``vocab``-sized LM head
    (random weights), saved to ``folder``."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from icd.models.fixtures import TEACHER, build_model_fixtures

    src = build_model_fixtures(folder / "src", names=[TEACHER])[TEACHER]
    config = AutoConfig.from_pretrained(src)
    config.text_config.vocab_size = vocab
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    out = folder / "big-vocab-llava"
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(src).save_pretrained(out)
    gc_path = src / "generation_config.json"
    if gc_path.exists():
        (out / "generation_config.json").write_text(gc_path.read_text())
    return out


def _prompts(n: int) -> tuple[list[Sample], list[Any]]:
    from PIL import Image

    samples, prompts = [], []
    for i in range(n):
        img = Image.new("RGB", (32, 32), ((40 * i) % 256, 90, 160))
        samples.append(Sample(sample_id=f"b{i}", stream_pos=i, question="q", answers=["x"]))
        prompts.append(build_prompt("What shape is shown?", img))
    return samples, prompts


def run_sampler_bench(
    prompts: int = 8, draws: int = 4, new_tokens: int = 8, rounds: int = 3, device: str = "cpu"
) -> dict[str, Any]:
    """Steps/s (decode steps of ``prompts × draws`` rows) of the baseline and the on-device
    sampler, fastest of ``rounds`` each, interleaved, and whether their answers agree."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_big_vocab_teacher(Path(tmp))
        load = hf.HFLoad(device=device)
        vlm = hf.HFVLM(str(path), load=load, batch_size=prompts, max_new_tokens=new_tokens)
        samples, ps = _prompts(prompts)
        sampling = Sampling(n=draws, temperature=0.7, include_greedy=False, seed=0)
        timings: dict[str, float] = {"host": float("inf"), "device": float("inf")}
        answers: dict[str, list[list[str]]] = {}
        steps = new_tokens
        current = hf._RowSampler
        try:
            for _ in range(rounds):
                for name, cls in (("host", HostRowSampler), ("device", current)):
                    hf._RowSampler = cls  # type: ignore[misc]
                    t0 = time.perf_counter()
                    anns = vlm.annotate(samples, ps, sampling)
                    timings[name] = min(timings[name], time.perf_counter() - t0)
                    answers[name] = [[g.text for g in a.generations] for a in anns]
        finally:
            hf._RowSampler = current  # type: ignore[misc]
    host, dev = steps / timings["host"], steps / timings["device"]
    return {
        "vocab": VOCAB,
        "rows": prompts * draws,
        "steps": steps,
        "host_steps_per_s": host,
        "device_steps_per_s": dev,
        "ratio": dev / host,
        "same_answers": answers["host"] == answers["device"],
        "device": device,
    }


def main() -> None:  # pragma: no cover - command line
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    r = run_sampler_bench(a.prompts, a.draws, a.new_tokens, a.rounds, a.device)
    print(json.dumps(r, indent=2))
    print(
        f"{r['rows']} rows x {r['vocab']} vocab on {r['device']}: host row-by-row "
        f"{r['host_steps_per_s']:.2f} steps/s, on-device {r['device_steps_per_s']:.2f} steps/s "
        f"(x{r['ratio']:.2f}); same answers: {r['same_answers']}"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
