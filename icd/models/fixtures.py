"""The mini-world's tiny models of the real architectures: how they are built and found.

Three models load through the same ``from_pretrained`` path as hub checkpoints:

- ``tiny-idefics3``: the student, ``Idefics3ForConditionalGeneration`` (SmolVLM architecture)
  with an ``Idefics3Processor`` (no image splitting, 32 px images, one image token each).
- ``tiny-llava``: the teacher, ``LlavaForConditionalGeneration`` (CLIP vision tower, Qwen2
  language model, ChatML template as in LLaVA-OneVision-Qwen2) with a ``LlavaProcessor``
  (32 px images, 16 image tokens each). Qwen2-VL is not used: its processor requires a video
  processor, which needs torchvision.
- ``tiny-clip``: the embedder, ``CLIPModel`` with a ``CLIPProcessor`` (32 px, 64-d space).
  SigLIP is not used: its tokenizer is SentencePiece, which ``tokenizers`` cannot train.

Each tokenizer is a byte-level BPE trained locally on a corpus built from the
coloured-shapes vocabulary, inside the architecture's own tokenizer class
(``GPT2Tokenizer``, ``Qwen2Tokenizer``, ``CLIPTokenizer``) with the special tokens the
processor needs and the architecture's chat template.

``build_model_fixtures`` writes these architectures *untrained* (weights fully determined
by the seed): the starting point of ``icd fixtures train`` (:mod:`icd.miniworld.train`).
The trained weights ship with the package (``icd/miniworld/weights``); ``fixtures/<name>``
model ids resolve there (:func:`resolve_model_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from icd.data import shapes
from icd.method.prompts import format_question
from icd.storage.locks import file_lock, publish_dir, staging_dir

FIXTURE_VERSION = 2
STUDENT = "tiny-idefics3"
TEACHER = "tiny-llava"
EMBEDDER = "tiny-clip"
NAMES = (STUDENT, TEACHER, EMBEDDER)
MARKER = "fixture.json"

IMAGE_SIZE = 32  # pixels fed to every vision tower
PATCH_SIZE = 8
# One vision-tower shape for the embedder and the teacher, so the teacher's tower can start
# from the trained embedder's.
VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)
BPE_VOCAB_SIZE = 640  # byte-level BPE: 256 bytes + specials + ~370 merges
BPE_MERGES = 360  # end-of-word BPE (CLIP): 512 byte symbols + these merges

COLOURS = [*shapes.COLOURS, "purple", "orange", "pink", "cyan", "brown", "gray"]
SHAPES = [*shapes.SHAPES, "hexagon", "diamond", "pentagon", "heart"]
_WORDS = [
    "what", "shape", "is", "shown", "in", "the", "image", "answer", "with", "a", "short",
    "phrase", "options", "which", "one", "of", "following", "best", "describes", "picture",
    "question", "this", "object", "colour", "color", "kind", "here", "there", "you", "are",
    "helpful", "assistant", "user", "system", "yes", "no", "it", "its", "an", "on", "at",
    "to", "for", "and", "or",
]  # fmt: skip

# SmolVLM's chat template (Idefics3 processors use "User:"/"Assistant:" turns).
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# ChatML template (as in LLaVA-OneVision-Qwen2) with images kept in message order.
LLAVA_QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fixtures_dir() -> Path:
    """Where fixtures live: ``$ICD_FIXTURES`` or ``<cwd>/.icd/fixtures``."""
    return Path(os.environ.get("ICD_FIXTURES") or Path.cwd() / ".icd" / "fixtures").absolute()


def _corpus(seed: int) -> list[str]:
    """Sentences covering the shapes vocabulary, prompts, digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    world = [*shapes.CLASS_NAMES, *(a for alts in shapes.SYNONYMS.values() for a in alts)]
    for k in range(900):
        c = world[k % len(world)] if k % 3 else rng.choice(classes)
        opts = ", ".join(rng.sample(classes, 4))
        lines += [
            f"What shape is shown in the image? Answer with a short phrase. {c.capitalize()}.",
            f"Which one of the following best describes the picture? Options: {opts}. {c}",
            f'Q{rng.randint(0, 999)}: is it a {c}? yes; no! ({rng.randint(0, 9)}) - "{c}"',
            f"User: What is shown here?\nAssistant: {c}\nuser\nassistant\nsystem",
        ]
    # The prompts' own instructions, so they tokenise into few pieces (the tasks these
    # untrained fixtures were built for; pinned so adding a task does not change them).
    for task in ("classification", "vqa"):
        lines += [format_question("", task)] * 50
    lines.append(" ".join(_WORDS + COLOURS + SHAPES))
    lines.append("0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) [ ] - _ / + = * & % $ # @")
    return lines


def _train_bpe(tokenizer_cls: type, special_tokens: list[str], seed: int, **kwargs: Any) -> Any:
    """Train a byte-level BPE with ``tokenizers``' trainer inside ``tokenizer_cls``'s own
    normaliser/pre-tokeniser pipeline, then rebuild ``tokenizer_cls`` from the learned
    vocab and merges. Deterministic: the whole byte alphabet is registered up front, so
    symbol ids, and hence tie-breaks between equally frequent pairs, never vary."""
    from tokenizers import pre_tokenizers, trainers

    backend = tokenizer_cls(**kwargs).backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(seed), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return tokenizer_cls(vocab=model["vocab"], merges=merges, **kwargs)


def _train_bpe_end_of_word(
    tokenizer_cls: type, special_tokens: list[str], seed: int, suffix: str = "</w>", **kwargs: Any
) -> Any:
    """Train a CLIP-style BPE whose word-final symbols carry ``suffix``.

    Words come from ``tokenizer_cls``'s ``tokenizers`` normaliser and pre-tokeniser. The
    merges are learned here rather than by ``tokenizers.trainers.BpeTrainer``: that trainer
    numbers the suffixed symbols in hash-map order, so ties between equally frequent pairs
    break differently from one process to the next. This learner breaks ties by the pair
    itself, so the same corpus always gives the same tokenizer.
    """
    from collections import Counter

    from tokenizers import pre_tokenizers

    backend = tokenizer_cls(**kwargs).backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus(seed):
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(
            backend.normalizer.normalize_str(line)
        ):
            if piece not in special_tokens:
                words[(*piece[:-1], piece[-1] + suffix)] += 1
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {
        t: i for i, t in enumerate([*special_tokens, *alphabet, *(a + suffix for a in alphabet)])
    }
    merges: list[tuple[str, str]] = []
    while len(merges) < BPE_MERGES:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        vocab.setdefault(merged, len(vocab))
        words = Counter({_merge(word, best, merged): c for word, c in words.items()})
    return tokenizer_cls(vocab=vocab, merges=merges, **kwargs)


def _merge(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _build_student(out: Path, seed: int) -> None:
    from transformers import (
        GPT2Tokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>"]
    extras = ["<fake_token_around_image>", "<image>", "<global-img>", *grid]
    tok = _train_bpe(
        GPT2Tokenizer,
        specials + extras,
        seed,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
    )
    tok.add_special_tokens({"additional_special_tokens": extras})
    scale = IMAGE_SIZE // PATCH_SIZE  # pixel shuffle of the whole 4x4 grid: one image token
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // scale**2
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(VISION),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        ),
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    _set_generation_ids(model, tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_teacher(out: Path, seed: int) -> None:
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Tokenizer,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = _train_bpe(
        Qwen2Tokenizer, specials, seed, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    patch = PATCH_SIZE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_QWEN2_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **VISION, projection_dim=64),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok),
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed + 1)
    model = LlavaForConditionalGeneration(config).eval()
    _set_generation_ids(model, tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_embedder(out: Path, seed: int) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    tok = _train_bpe_end_of_word(CLIPTokenizer, ["<|startoftext|>", "<|endoftext|>"], seed)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(VISION),
        projection_dim=64,
    )
    torch.manual_seed(seed + 2)
    model = CLIPModel(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _set_generation_ids(model: Any, tok: Any) -> None:
    gc = model.generation_config
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    gc.do_sample = False


_BUILDERS = {STUDENT: _build_student, TEACHER: _build_teacher, EMBEDDER: _build_embedder}


def trained_dir() -> Path:
    """Where the trained mini-world models ship: ``icd/miniworld/weights``."""
    return Path(__file__).resolve().parents[1] / "miniworld" / "weights"


def resolve_model_path(model_id: str) -> Path | None:
    """The local folder a model id loads from: ``fixtures/<name>`` is the trained mini-world
    model shipped in :func:`trained_dir`; an existing directory is itself; anything else (a
    hub id) is None.

    Raises ``ValueError`` for a ``fixtures/`` id that names no fixture, or one whose
    weights are missing (rebuilt by ``icd fixtures train``).
    """
    if model_id.startswith("fixtures/"):
        name = model_id.removeprefix("fixtures/")
        if name not in NAMES:
            raise ValueError(f"no fixture model {name!r} (known: {', '.join(NAMES)})")
        path = trained_dir() / name
        if not (path / "config.json").is_file():
            raise ValueError(
                f"the mini-world model {name!r} is not in {trained_dir()}: "
                "run `icd fixtures train` to rebuild it"
            )
        return path
    path = Path(model_id).expanduser()
    return path if path.is_dir() else None


def build_model_fixtures(
    root: Path, seed: int = 0, names: Sequence[str] | None = None
) -> dict[str, Path]:
    """Build (or reuse) the *untrained* tiny models under ``root``; return name -> folder.

    ``names`` picks a subset of :data:`NAMES` (default: all three). A folder whose
    ``fixture.json`` records the same seed and fixture version is reused as is, so a second
    call returns at once. Building all three takes a few seconds on CPU. Concurrent
    builders (threads or processes) are serialised by a lock file in ``root``.
    """
    root = Path(root)
    names = list(NAMES if names is None else names)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"no fixture model {unknown[0]!r} (known: {', '.join(NAMES)})")
    stamp = _build_stamp()
    markers = {n: {"name": n, "seed": seed, **stamp} for n in names}
    paths = {name: root / name for name in names}
    if all(_is_built(paths[n], markers[n]) for n in names):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):
        for name in names:
            out, marker = paths[name], markers[name]
            if _is_built(out, marker):
                continue
            t0 = time.perf_counter()
            with staging_dir(out) as tmp:
                with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
                    _BUILDERS[name](tmp, seed)
                info = {**marker, "build_seconds": round(time.perf_counter() - t0, 3)}
                (tmp / MARKER).write_text(json.dumps(info, indent=2))
                publish_dir(tmp, out)
    return paths


def _build_stamp() -> dict[str, str | int]:
    """What a built fixture depends on besides its seed: this builder's code and the
    library versions. Any change rebuilds the fixtures instead of reusing stale ones."""
    import tokenizers
    import transformers

    return {
        "version": FIXTURE_VERSION,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
    }


def _is_built(out: Path, marker: dict[str, Any]) -> bool:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(k) == v for k, v in marker.items())
