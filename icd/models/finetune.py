"""Supervised answers for a VLM: prompts with their answer turn, the loss on the answer
tokens, and online LoRA adaptation of the student on the teacher's labels (the
``finetune_lora`` baselines, with peft).

Prompts are rendered exactly as :class:`~icd.models.hf.HFVLM` renders them for
``generate`` (the processor's chat template with the generation prompt), with the answer
turn appended; the loss covers the answer tokens through the first end-of-sequence token
(what ``generate`` emits). The mini-world's training recipes use the same two functions.
"""

from __future__ import annotations

import copy
import random
import resource
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icd.config import FinetuneConfig
from icd.data.images import to_rgb
from icd.method.types import Prompt

ADAPTER_FILE = "adapter_config.json"


@dataclass(frozen=True)
class AdaptCost:
    """What one :func:`train_adapter` round cost: optimizer ``steps``, ``tokens`` trained
    on (prompt and answer), wall ``seconds``, ``flops`` (≈ 6 · parameters · tokens),
    the process's ``peak_rss_mb`` and the pool ``examples`` drawn from."""

    steps: int
    tokens: int
    seconds: float
    flops: float
    peak_rss_mb: float
    examples: int


def _assistant(text: str) -> dict[str, object]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def encode_answers(
    processor: Any,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    processor_kwargs: Mapping[str, object] | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for ``prompts`` with their ``answers`` as the assistant's turn, and
    ``labels`` on the answer tokens through the first end-of-sequence token (-100
    elsewhere). ``ValueError`` if the chat template renders the answer turn unlike
    generation."""
    texts, images, suffixes = [], [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        head = processor.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=False
        )
        full = processor.apply_chat_template([*prompt.messages, _assistant(answer)], tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template renders the answer turn unlike generation")
        texts.append(full)
        images.append([to_rgb(im) for im in prompt.images])
        suffixes.append(full[len(head) :])
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "right"
    try:
        kwargs: dict[str, object] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):
            kwargs["images"] = images
            kwargs.update(processor_kwargs or {})
        enc = processor(**kwargs)
    finally:
        tok.padding_side = side
    ids = enc["input_ids"]
    labels = torch.full_like(ids, -100)
    eos = tok.eos_token_id
    lengths = enc["attention_mask"].sum(1).tolist()
    for row, (suffix, length) in enumerate(zip(suffixes, lengths, strict=True)):
        s_ids = tok(suffix, add_special_tokens=False)["input_ids"]
        begin = length - len(s_ids)
        if ids[row, begin:length].tolist() != s_ids:
            raise ValueError("answer tokens differ inside and outside the prompt")
        n = s_ids.index(eos) + 1 if eos in s_ids else len(s_ids)
        labels[row, begin : begin + n] = ids[row, begin : begin + n]
    out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    out["labels"] = labels
    return out


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions of ``batch``."""
    return model(**batch).loss


def lora_targets(cfg: FinetuneConfig) -> str:
    """The peft ``target_modules`` pattern: ``cfg.targets`` inside the language model only
    (``text_model`` in Idefics3/SmolVLM, ``language_model`` in LLaVA and Qwen2.5-VL)."""
    names = "|".join(cfg.targets)
    return rf".*(text_model|language_model)\..*\.({names})$"


def train_adapter(
    *,
    vlm: Any,
    examples: Sequence[tuple[Prompt, str]],
    start: Path | None,
    out: Path,
    cfg: FinetuneConfig,
    seed: int,
) -> AdaptCost:
    """``cfg.steps_per_chunk`` AdamW steps of LoRA on ``vlm``'s model over ``examples``
    (prompt, answer), in batches of ``cfg.batch_size`` drawn with a generator seeded by
    ``seed``, starting from the adapter at ``start`` (a fresh one when None). Saves the
    adapter to ``out`` (replaced atomically) and returns the :class:`AdaptCost` (``flops``
    ≈ 6 · parameters · tokens: forward and backward through the whole model;
    ``peak_rss_mb`` the process's peak resident memory).

    The LoRA layers go into ``vlm``'s own weights for the round, not into a copy (a copy
    would double the memory of a large student), and come out again afterwards, failure
    included: ``vlm`` is then as it was, bit for bit. Meanwhile no other call runs on it
    (the model's lock is held)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    with vlm._lock:
        base = vlm.model
        trainable = {name: p.requires_grad for name, p in base.named_parameters()}
        if start is not None:
            model = PeftModel.from_pretrained(base, str(start), is_trainable=True)
        else:
            lora = LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # (a float scale works)
                lora_dropout=cfg.dropout,
                target_modules=lora_targets(cfg),
            )
            model = get_peft_model(base, lora)
        try:
            tokens, n_params = _train(vlm=vlm, model=model, examples=examples, cfg=cfg, rng=rng)
            tmp = out.with_name(f".{out.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
        finally:
            model.unload()  # the LoRA layers out, nothing merged: the weights as they were
            for name, p in base.named_parameters():
                p.requires_grad_(trainable[name])
            base.eval()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    steps = cfg.steps_per_chunk if examples else 0
    return AdaptCost(
        steps=steps,
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        flops=6.0 * n_params * tokens,
        peak_rss_mb=_peak_rss_mb(),
        examples=len(examples),
    )


def _train(
    *,
    vlm: Any,
    model: Any,
    examples: Sequence[tuple[Prompt, str]],
    cfg: FinetuneConfig,
    rng: random.Random,
) -> tuple[int, int]:
    """The round's AdamW steps on ``model`` (LoRA over ``vlm``'s weights); returns the
    tokens trained on and the parameter count (base and adapter)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = 0
    for _ in range(cfg.steps_per_chunk if examples else 0):
        batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
        enc = encode_answers(
            vlm.processor, [p for p, _ in batch], [a for _, a in batch], vlm.processor_kwargs
        )
        enc = {k: v.to(vlm.device) for k, v in enc.items()}
        loss = answer_loss(model, enc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += int(enc["attention_mask"].sum())
    return tokens, n_params


def with_adapter(vlm: Any, adapter: Path) -> Any:
    """A copy of ``vlm`` whose model has the LoRA adapter at ``adapter`` merged into its
    weights (``vlm`` itself is unchanged)."""
    from peft import PeftModel

    if not (Path(adapter) / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"no LoRA adapter at {adapter}")
    adapted = copy.copy(vlm)
    with vlm._lock:  # not while a training round has LoRA layers in the weights
        weights = copy.deepcopy(vlm.model)
    merged = PeftModel.from_pretrained(weights, str(adapter))
    adapted.model = merged.merge_and_unload().eval()
    return adapted


def parameter_count(vlm: Any) -> int:
    """Parameters of ``vlm``'s model (for compute estimates: ≈ 2 · N FLOPs per token); 0
    for a model behind an API."""
    model = getattr(vlm, "model", None)
    return int(sum(p.numel() for p in model.parameters())) if model is not None else 0


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
