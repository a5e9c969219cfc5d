"""Training recipes of the mini-world (``icd fixtures train``).

Order: embedder → teacher (its vision tower starts from the trained embedder's) → student.
Every model starts from the untrained architecture of :mod:`icd.models.fixtures` and is
trained on prompts rendered exactly as the pipeline renders them: :func:`build_prompt`, the
processor's chat template, the processor's own image preprocessing and tokenisation. The
loss covers the answer tokens up to the end-of-sequence token (what ``generate`` emits);
an auxiliary class loss on pooled vision features (a linear head used only in training,
not saved) makes the tiny vision towers learn shapes quickly.

Training images are drawn from the shapes world with seeds ``TRAIN_SEED + seed`` and up,
never the seeds of the benchmark streams, so every evaluation is on held-out images.

The student's episodes (one prompt each), over the shapes world and the glyph world
(:mod:`icd.miniworld.world`, 600 categories that are not the evaluation world):

- ``zs_base``: a base-class image, no demos → its class name;
- ``zs_novel``: a novel-class image, no demos → a random base class name (so the student
  answers novel classes wrongly and, across episodes, uncertainly);
- ``icl_glyph``: a glyph query and k demos, one (sometimes two) of its category, the others
  sharing its colour, its template, or nothing → the label its demo carries;
- ``icl_shapes``: the same with a novel shapes-world query;
- ``icl_base``: a base-class query with k demos, with or without one of its class → its
  class name (demos must not wreck what the student knows).

Labels: a base class shows under its real name; every other class gets a label drawn at
random per episode from thousands of names (:func:`icd.miniworld.world.label_pool`), so no
label can be memorised, a novel class's name is never a label or a target, and the only
way to answer is to read the label of the demo whose image matches. k follows a
curriculum: 1–3 demos for the first fifth, then 1–5.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from icd.data import shapes
from icd.method.prompts import build_prompt
from icd.miniworld import world
from icd.models import fixtures
from icd.models.finetune import answer_loss, encode_answers
from icd.storage.locks import file_lock, lock_path, publish_dir, staging_dir

TRAIN_SEED = 1000  # image seeds of the training banks (benchmark streams use small seeds)
TASK = "classification"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on (recorded next to the weights)."""

    seed: int = 0
    per_class: int = 250  # training images per class
    # The teacher sees four times as many images, each about twice: it learns how likely
    # each class is for an ambiguous image (calibrated, so its sampled answers disagree
    # there) instead of memorising a small bank.
    teacher_per_class: int = 1000
    embedder_steps: int = 1200
    # Short enough that the teacher stays unsure where rings and crosses look like circles
    # and squares (1,200 steps: greedy 0.915, but its five sampled answers almost always
    # agreed, so votes and the agreement filter had nothing to do).
    teacher_steps: int = 500
    # How the student uses its demonstrations (docs/miniworld.md): "copier" (shipped) reads
    # the label of the demonstration nearest the query when the query looks unfamiliar and
    # keeps its own answer when it does not; "matching" meta-trains it to find the demo
    # whose image matches wherever it sits (its circuit did not emerge in 7,000 steps).
    design: str = "copier"
    student_steps: int = 3000
    # An optional warm restart after the first cycle (fresh optimizer, head and episodes).
    # Off: 2,000 steps of it at 1e-3 left the matching design's k=3 one-match ICL where it
    # was (0.51 vs 0.52); 500 steps of copier episodes on that matching student reached
    # less than 3,000 copier steps from scratch (nearest 0.93, base among others 0.75).
    student_cycle2_steps: int = 0
    cycle2_lr: float = 1e-3
    glyph_per_class: int = 12  # training images per glyph-world category
    # Supervised contrast on the image tokens the student's LM reads (same class close).
    token_contrast_weight: float = 0.2
    batch_size: int = 32
    lr: float = 3e-3
    aux_weight: float = 0.5  # auxiliary vision class loss
    threads: int = 1  # fastest for models of this size on CPU
    checkpoint_every: int = 500  # the student is saved this often (a long run can be inspected)

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every schedule ``factor`` times as long (tests use ~0.02)."""
        return replace(
            self,
            per_class=max(4, int(self.per_class * factor)),
            teacher_per_class=max(4, int(self.teacher_per_class * factor)),
            embedder_steps=max(2, int(self.embedder_steps * factor)),
            teacher_steps=max(2, int(self.teacher_steps * factor)),
            student_steps=max(2, int(self.student_steps * factor)),
            checkpoint_every=max(1, int(self.checkpoint_every * factor)),
            student_cycle2_steps=int(self.student_cycle2_steps * factor),
            glyph_per_class=max(2, int(self.glyph_per_class * factor)),
        )


@dataclass
class Bank:
    """Rendered training images and their class indices."""

    images: list[Image.Image]
    labels: np.ndarray
    by_class: list[np.ndarray]


def render_bank(per_class: int, seed: int) -> Bank:
    """``per_class`` images of every class from the shapes world with image seed ``seed``."""
    n = per_class * len(shapes.CLASS_NAMES)
    images = [Image.open(io.BytesIO(shapes.render_shape(i, seed))).convert("RGB") for i in range(n)]
    labels = np.array([shapes.label_of(i, seed) for i in range(n)])
    by_class = [np.flatnonzero(labels == c) for c in range(len(shapes.CLASS_NAMES))]
    return Bank(images, labels, by_class)


# ---------------------------------------------------------------------------- common
def _optimizer(model: torch.nn.Module, lr: float, steps: int) -> tuple[Any, Any]:
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )
    warm = max(1, min(100, steps // 10))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _step(opt: Any, sched: Any, loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _features(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _save(model: Any, processor: Any, out: Path, info: Mapping[str, object]) -> None:
    """Write the model to ``out`` through a temporary folder renamed into place, under
    ``out``'s lock: a run loading ``out`` meanwhile reads the old weights or the new ones."""
    model.eval()
    with file_lock(lock_path(out)), staging_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / fixtures.MARKER).write_text(json.dumps(info, indent=2))
        publish_dir(tmp, out)


class RunInfo(TypedDict):
    """How long a training run took and its loss curve ((step, mean loss) points)."""

    seconds: float
    loss_curve: list[tuple[int, float]]


class _Meter:
    """Running loss and progress lines every ``every`` steps."""

    def __init__(self, name: str, steps: int, log: Log, every: int = 100) -> None:
        every = max(1, min(every, steps // 5))  # short schedules still log a curve
        self.name, self.steps, self.log, self.every = name, steps, log, every
        self.t0 = time.perf_counter()
        self.total, self.count = 0.0, 0
        self.curve: list[tuple[int, float]] = []

    def add(self, step: int, loss: float) -> None:
        self.total, self.count = self.total + loss, self.count + 1
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            mean = self.total / self.count
            self.curve.append((step + 1, round(mean, 4)))
            rate = (step + 1) / (time.perf_counter() - self.t0)
            self.log(f"{self.name} step {step + 1}/{self.steps} loss {mean:.4f} ({rate:.1f} it/s)")
            self.total, self.count = 0.0, 0

    def info(self) -> RunInfo:
        return {"seconds": round(time.perf_counter() - self.t0, 1), "loss_curve": self.curve}


# ---------------------------------------------------------------------------- embedder
def train_embedder(*, start: Path, out: Path, bank: Bank, recipe: Recipe, log: Log) -> dict:
    """Contrastive image↔class-name training (names and synonyms) plus a supervised
    image↔image contrastive term, through ``get_image_features`` / ``get_text_features``."""
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng([recipe.seed, 1])
    model = CLIPModel.from_pretrained(start).train()
    processor = CLIPProcessor.from_pretrained(start)
    pixels = processor.image_processor(bank.images, return_tensors="pt")["pixel_values"]
    names = [[c, *shapes.SYNONYMS.get(c, [])] for c in shapes.CLASS_NAMES]
    labels = torch.as_tensor(bank.labels)
    opt, sched = _optimizer(model, recipe.lr, recipe.embedder_steps)
    params = list(model.parameters())
    meter = _Meter("embedder", recipe.embedder_steps, log)
    batch = recipe.batch_size * 4
    for step in range(recipe.embedder_steps):
        idx = torch.as_tensor(rng.integers(0, len(labels), batch))
        texts = [alts[rng.integers(len(alts))] for alts in names]
        tok = processor.tokenizer(texts, padding=True, return_tensors="pt")
        img = F.normalize(_features(model.get_image_features(pixel_values=pixels[idx])), dim=-1)
        txt = F.normalize(_features(model.get_text_features(**tok)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        y = labels[idx]
        loss = F.cross_entropy(scale * img @ txt.T, y)
        same = (y[:, None] == y[None, :]).float().fill_diagonal_(0)
        sim = (scale * img @ img.T).fill_diagonal_(-1e4)
        logp = sim.log_softmax(-1)
        loss = loss + 0.5 * -((logp * same).sum(-1) / same.sum(-1).clamp(min=1)).mean()
        _step(opt, sched, loss, params)
        meter.add(step, loss.item())
    info = {"model": fixtures.EMBEDDER, "recipe": asdict(recipe), **meter.info()}
    _save(model, processor, out, info)
    return info


# ---------------------------------------------------------------------------- VLM episodes
@dataclass
class Episode:
    query: int  # bank index
    demos: list[tuple[int, str]]  # (bank index, label text)
    target: str
    kind: str


def encode_episodes(
    processor: Any, bank: Bank, episodes: Sequence[Episode]
) -> dict[str, torch.Tensor]:
    """Model inputs and labels for ``episodes``, rendered the way ``HFVLM`` renders prompts
    (``build_prompt`` + the chat template + the processor) with the answer turn appended;
    labels cover the answer tokens through the first end-of-sequence token
    (:func:`icd.models.finetune.encode_answers`)."""
    prompts = [
        build_prompt(
            shapes.QUESTION,
            bank.images[ep.query],
            [(bank.images[i], shapes.QUESTION, label) for i, label in ep.demos],
            TASK,
        )
        for ep in episodes
    ]
    return encode_answers(processor, prompts, [ep.target for ep in episodes])


class _Tap:
    """Captures a module's output pooled over its sequence — a vision tower's patches (real
    images, in prompt order) or the connector's image tokens — for an auxiliary class loss."""

    def __init__(self, module: torch.nn.Module, *, hidden: int, drop_cls: bool = False) -> None:
        self.hidden = hidden
        self.drop_cls = drop_cls
        self.pooled: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        h = getattr(output, "last_hidden_state", output)
        self.pooled = (h[:, 1:] if self.drop_cls else h).mean(1)


def _images_of(ep: Episode) -> list[int]:
    """Bank indices of an episode's images in prompt order (demos, then the query)."""
    return [*(d for d, _ in ep.demos), ep.query]


class _AuxHeads:
    """Linear class heads on tapped features (training only), weighted into one loss."""

    def __init__(self, taps: Sequence[tuple[_Tap, float]]) -> None:
        self.taps = [(tap, w) for tap, w in taps if w]
        n = len(shapes.CLASS_NAMES)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(t.hidden, n) for t, _ in self.taps)

    def loss(self, labels: np.ndarray) -> torch.Tensor:
        y = torch.as_tensor(labels)
        return sum(
            w * F.cross_entropy(head(tap.pooled), y)
            for (tap, w), head in zip(self.taps, self.heads, strict=True)
        )


def _supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one batch of features."""
    z = F.normalize(features, dim=-1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    has = positives.any(1)
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1))
    return per_anchor[has].mean() if has.any() else sim.new_zeros(())


def _with_aux(
    model: torch.nn.Module, taps: Sequence[tuple[_Tap, float]], lr: float, steps: int
) -> tuple[_AuxHeads, Any, Any, list[torch.nn.Parameter]]:
    """Auxiliary class heads on ``taps`` and one optimizer over the model and the heads."""
    aux = _AuxHeads(taps)
    opt, sched = _optimizer(torch.nn.ModuleList([model, aux.heads]), lr, steps)
    return aux, opt, sched, [*model.parameters(), *aux.heads.parameters()]


# ---------------------------------------------------------------------------- teacher
def train_teacher(
    *, start: Path, out: Path, embedder: Path, bank: Bank, recipe: Recipe, log: Log
) -> dict:
    """Zero-shot answers for every class; the CLIP vision tower starts from the trained
    embedder's."""
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    torch.manual_seed(recipe.seed + 1)
    rng = np.random.default_rng([recipe.seed, 2])
    model = LlavaForConditionalGeneration.from_pretrained(start).train()
    processor = AutoProcessor.from_pretrained(start)
    tower = model.model.vision_tower
    tower.load_state_dict(CLIPModel.from_pretrained(embedder).vision_model.state_dict())
    tap = _Tap(tower, hidden=tower.config.hidden_size, drop_cls=True)
    aux, opt, sched, params = _with_aux(
        model, [(tap, recipe.aux_weight)], recipe.lr, recipe.teacher_steps
    )
    meter = _Meter("teacher", recipe.teacher_steps, log)
    for step in range(recipe.teacher_steps):
        idx = rng.integers(0, len(bank.labels), recipe.batch_size)
        eps = [Episode(int(i), [], shapes.CLASS_NAMES[bank.labels[i]], "zs") for i in idx]
        loss = answer_loss(model, encode_episodes(processor, bank, eps))
        loss = loss + aux.loss(bank.labels[idx])
        _step(opt, sched, loss, params)
        meter.add(step, loss.item())
    info = {"model": fixtures.TEACHER, "recipe": asdict(recipe), **meter.info()}
    _save(model, processor, out, info)
    return info


# ---------------------------------------------------------------------------- student
_BASE = [shapes.CLASS_NAMES.index(c) for c in shapes.BASE_CLASSES]
_NOVEL = [shapes.CLASS_NAMES.index(c) for c in shapes.NOVEL_CLASSES]
N_SHAPES = len(shapes.CLASS_NAMES)  # classes 0..23 of a bank are the shapes world's


def _split(c: int) -> tuple[str, str]:
    colour, shape = shapes.CLASS_NAMES[c].split(" ", 1)
    return colour, shape


def render_glyph_bank(per_class: int, seed: int, bank: Bank) -> Bank:
    """``bank`` (the shapes world, classes 0..23) extended by ``per_class`` images of every
    glyph-world category (:mod:`icd.miniworld.world`, classes 24 and up)."""
    images = list(bank.images)
    labels = list(bank.labels)
    for cat in range(world.N_CATEGORIES):
        for i in range(per_class):
            images.append(world.render(cat, i, seed))
            labels.append(N_SHAPES + cat)
    y = np.array(labels)
    by_class = [np.flatnonzero(y == c) for c in range(N_SHAPES + world.N_CATEGORIES)]
    return Bank(images, y, by_class)


# Episode kinds and their proportions (see the module docstring).
_KINDS = ("zs_base", "zs_novel", "icl_glyph", "icl_shapes", "icl_base")
_MIX = (2, 1, 4, 3, 2)


def _related(c: int) -> tuple[list[int], list[int]]:
    """Classes sharing ``c``'s colour and those sharing its shape/template (any world)."""
    if c < N_SHAPES:
        colour, shape = _split(c)
        others = [o for o in range(N_SHAPES) if o != c]
        return [o for o in others if _split(o)[0] == colour], [
            o for o in others if _split(o)[1] == shape
        ]
    t, col = world.split(c - N_SHAPES)
    same_colour = [N_SHAPES + t2 * world.N_COLOURS + col for t2 in range(world.N_TEMPLATES)]
    same_shape = [N_SHAPES + t * world.N_COLOURS + c2 for c2 in range(world.N_COLOURS)]
    return [o for o in same_colour if o != c], [o for o in same_shape if o != c]


def _pick(rng: random.Random, bank: Bank, c: int, avoid: int = -1) -> int:
    """A random bank image of class ``c`` other than ``avoid``."""
    while True:
        i = int(rng.choice(bank.by_class[c]))
        if i != avoid:
            return i


def _zero_shot_episode(rng: random.Random, bank: Bank, kind: str) -> Episode:
    """No demos: a base image → its name; a novel image → a random base name (so the
    student is wrong there and, across episodes, unsure)."""
    if kind == "zs_base":
        q_class = rng.choice(_BASE)
        return Episode(_pick(rng, bank, q_class), [], shapes.CLASS_NAMES[q_class], kind)
    q_class = rng.choice(_NOVEL)
    query = _pick(rng, bank, q_class)
    return Episode(query, [], shapes.CLASS_NAMES[rng.choice(_BASE)], kind)


def _query_class(rng: random.Random, kind: str, n_classes: int) -> int:
    """The query's class of an in-context episode of ``kind``."""
    if kind == "icl_glyph":
        return rng.randrange(N_SHAPES, n_classes)
    return rng.choice(_NOVEL if kind == "icl_shapes" else _BASE)


def _distractor(rng: random.Random, q_class: int, n_classes: int) -> int:
    """A demo class for a query of ``q_class`` (possibly ``q_class`` itself): sharing its
    colour, its shape or template, or any class of either world, each pool equally likely."""
    same_colour, same_shape = _related(q_class)
    pool = rng.choice(["colour", "shape", "glyph", "shapes"])
    choices = {
        "colour": same_colour,
        "shape": same_shape,
        "glyph": range(N_SHAPES, n_classes),
        "shapes": range(N_SHAPES),
    }[pool]
    return rng.choice(choices)


def _icl_query(
    rng: random.Random,
    pick: Callable[[int], int],
    kind: str,
    *,
    n_classes: int,
    k_range: tuple[int, int],
) -> tuple[int, int, int]:
    """An in-context episode's query class, its bank image and how many demos it shows (drawn
    in this order, the same for both designs)."""
    q_class = _query_class(rng, kind, n_classes)
    query = pick(q_class)
    return q_class, query, rng.randint(*k_range)


def student_episode(
    rng: random.Random,
    bank: Bank,
    max_k: int,
    *,
    labels: tuple[list[str], list[str]],
    min_k: int = 1,
) -> Episode:
    """One training prompt for the student (see the module docstring): ``bank`` holds the
    shapes world (classes 0..23) and the glyph world; ``labels`` is the pool episode labels
    are drawn from."""
    kind = rng.choices(_KINDS, _MIX)[0]

    pick = partial(_pick, rng, bank)
    if kind in ("zs_base", "zs_novel"):
        return _zero_shot_episode(rng, bank, kind)
    n_classes = len(bank.by_class)
    q_class, query, k = _icl_query(rng, pick, kind, n_classes=n_classes, k_range=(min_k, max_k))
    match = kind != "icl_base" or rng.random() < 0.5
    demo_classes = [q_class] * (1 + (match and k > 2 and rng.random() < 0.2)) if match else []
    while len(demo_classes) < k:
        c = _distractor(rng, q_class, n_classes)
        if c != q_class:
            demo_classes.append(c)
    rng.shuffle(demo_classes)
    # A base class shows under its real name (as in the pipeline: the student knows it);
    # every other class in the episode — glyphs and the shapes world's novel classes — gets
    # a label drawn at random, so a novel class's name is never a label, let alone a target,
    # and whether a context's labels look familiar tells nothing about whether to copy.
    drawn = iter(world.draw_labels(rng, labels, len(set(demo_classes))))
    names: dict[int, str] = {}
    for c in demo_classes:
        if c not in names:
            names[c] = shapes.CLASS_NAMES[c] if c in _BASE else next(drawn)
    demos = [(pick(c, avoid=query), names[c]) for c in demo_classes]
    target = shapes.CLASS_NAMES[q_class] if kind == "icl_base" else names[q_class]
    return Episode(query, demos, target, kind)


# The nearest-demo copier's episodes (``Recipe.design == "copier"``).
_COPIER_KINDS = ("zs_base", "zs_novel", "icl_glyph", "icl_shapes", "icl_base")
_COPIER_MIX = (2, 1, 3, 3, 3)


def whole_word_pool(tokenizer: Any) -> tuple[list[str], list[str]]:
    """The copier's episode labels, half from each list: colour-and-shape names (other
    worlds' and the shapes world's *novel* class names, so the evaluation's names are
    producible) and two-word names of the tokenizer's other words — only names whose every
    word is one token where an answer puts it, so a copied label is copied whole and two
    labels cannot blend piece by piece. Base class names stay their classes' own."""
    things, other = world.label_pool()

    def whole(label: str) -> bool:
        return len(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) == 2

    novel = [n for n in shapes.NOVEL_CLASSES if whole(n)]
    return sorted({*filter(whole, things), *novel}), [n for n in other if whole(n)]


def copier_episode(
    rng: random.Random,
    bank: Bank,
    max_k: int,
    *,
    labels: tuple[list[str], list[str]],
    min_k: int = 1,
) -> Episode:
    """One training prompt of the nearest-demo copier: the demo of an unfamiliar query's
    class always sits last, nearest the query, and its (random) label is the target; a
    base-class query keeps its own name whatever the demos say, its class last or absent."""
    kind = rng.choices(_COPIER_KINDS, _COPIER_MIX)[0]

    pick = partial(_pick, rng, bank)
    if kind in ("zs_base", "zs_novel"):
        return _zero_shot_episode(rng, bank, kind)
    n_classes = len(bank.by_class)
    q_class, query, k = _icl_query(rng, pick, kind, n_classes=n_classes, k_range=(min_k, max_k))
    last = kind != "icl_base" or rng.random() < 0.3
    demo_classes: list[int] = []
    while len(demo_classes) < k - last:
        c = _distractor(rng, q_class, n_classes)
        if c != q_class and c not in demo_classes:
            demo_classes.append(c)
    if last:
        demo_classes.append(q_class)
    drawn = iter(world.draw_labels(rng, labels, len(demo_classes)))
    names = {c: shapes.CLASS_NAMES[c] if c in _BASE else next(drawn) for c in demo_classes}
    demos = [(pick(c, avoid=query), names[c]) for c in demo_classes]
    target = shapes.CLASS_NAMES[q_class] if kind == "icl_base" else names[q_class]
    return Episode(query, demos, target, kind)


def train_student(*, start: Path, out: Path, bank: Bank, recipe: Recipe, log: Log) -> dict:
    """Base classes by name, anything else from matching demonstrations (module docstring),
    in two cosine cycles: ``recipe.student_steps`` at ``recipe.lr`` (k up to 3 for its
    first fifth, then up to 5), then a warm restart of ``recipe.student_cycle2_steps`` at
    ``recipe.cycle2_lr`` with a fresh optimizer, auxiliary head and episode stream (so it
    can also be run on saved weights alone). Resumable within a cycle: every
    ``recipe.checkpoint_every`` steps the model, optimizer, schedule and random state go to
    the cycle's checkpoint file next to ``out``; a run with the same recipe continues."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    torch.manual_seed(recipe.seed + 2)
    model = Idefics3ForConditionalGeneration.from_pretrained(start).train()
    processor = AutoProcessor.from_pretrained(start)
    t0 = time.perf_counter()
    bank = render_glyph_bank(recipe.glyph_per_class, TRAIN_SEED + recipe.seed, bank)
    log(
        f"rendered the glyph world ({world.N_CATEGORIES} categories) in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    info: dict[str, object] = {"model": fixtures.STUDENT, "recipe": asdict(recipe)}
    info.update(
        student_cycle(
            model, processor=processor, bank=bank, recipe=recipe, out=out, cycle=1, log=log
        )
    )
    if recipe.student_cycle2_steps:
        info["cycle2"] = student_cycle(
            model, processor=processor, bank=bank, recipe=recipe, out=out, cycle=2, log=log
        )
    _save(model, processor, out, info)
    return info


def student_cycle(
    model: Any, *, processor: Any, bank: Bank, recipe: Recipe, out: Path, cycle: int, log: Log
) -> RunInfo:
    """One cosine cycle of the student's training on ``bank`` (the shapes world extended by
    the glyph world); returns its seconds and loss curve. The model keeps its weights."""
    first_cycle = cycle == 1
    steps = recipe.student_steps if first_cycle else recipe.student_cycle2_steps
    lr = recipe.lr if first_cycle else recipe.cycle2_lr
    if not first_cycle:  # a fresh, seeded start: the cycle depends on the weights alone
        torch.manual_seed(recipe.seed + 12)
    rng = random.Random(recipe.seed + (3 if first_cycle else 13))
    if recipe.design == "copier":
        labels, episode = whole_word_pool(processor.tokenizer), copier_episode
    else:
        labels, episode = world.label_pool(), student_episode
    model.train()
    # Auxiliary class losses (training only): the vision tower's patches name every class
    # of both worlds, and the image tokens the language model reads are pulled together by
    # class (supervised contrast), so matching a query to its demo is close to an equality
    # test for the attention that reads them.
    tower, connector = model.model.vision_model, model.model.connector
    tower_tap = _Tap(tower, hidden=tower.config.hidden_size)
    token_tap = _Tap(connector, hidden=model.config.text_config.hidden_size)
    head = torch.nn.Linear(tower.config.hidden_size, len(bank.by_class))
    opt, sched = _optimizer(torch.nn.ModuleList([model, head]), lr, steps)
    params = [*model.parameters(), *head.parameters()]
    meter = _Meter("student" if first_cycle else f"student (cycle {cycle})", steps, log)
    suffix = "" if first_cycle else f".cycle{cycle}"
    run = _CycleRun(
        model, head, opt, sched, rng, meter, out.parent / f".{out.name}{suffix}.ckpt.pt"
    )
    first = run.resume(recipe)
    if first:
        log(f"student: resumed cycle {cycle} at step {first}")
    try:
        for step in range(first, steps):
            max_k = 3 if first_cycle and step < steps // 5 else 5
            eps = [episode(rng, bank, max_k, labels=labels) for _ in range(recipe.batch_size)]
            loss = answer_loss(model, encode_episodes(processor, bank, eps))
            seen = torch.as_tensor(bank.labels[[i for ep in eps for i in _images_of(ep)]])
            loss = loss + recipe.aux_weight * F.cross_entropy(head(tower_tap.pooled), seen)
            if recipe.token_contrast_weight:
                loss = loss + recipe.token_contrast_weight * _supcon(token_tap.pooled, seen)
            _step(opt, sched, loss, params)
            meter.add(step, loss.item())
            if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < steps:
                run.checkpoint(recipe, step + 1)
                partial = {"model": fixtures.STUDENT, "partial": step + 1, "cycle": cycle}
                _save(model, processor, out, partial)
                model.train()
    finally:
        tower_tap.remove()
        token_tap.remove()
    run.ckpt.unlink(missing_ok=True)
    return meter.info()


@dataclass
class _CycleRun:
    """What a student cycle's checkpoint (``ckpt``) holds: the weights, the auxiliary
    head, optimizer, schedule, the episode and torch random states and the loss curve."""

    model: Any
    head: torch.nn.Module
    opt: Any
    sched: Any
    rng: random.Random
    meter: _Meter
    ckpt: Path

    def resume(self, recipe: Recipe) -> int:
        """Load the checkpoint if one of this recipe exists; the step to go on from (0:
        none)."""
        if not self.ckpt.exists():
            return 0
        state = torch.load(self.ckpt, weights_only=False)
        if state["recipe"] != asdict(recipe):
            return 0
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        self.meter.curve = state["curve"]
        return int(state["step"])

    def checkpoint(self, recipe: Recipe, step: int) -> None:
        """Write the checkpoint after ``step`` steps (through a temporary file)."""
        state = {
            "recipe": asdict(recipe),
            "step": step,
            "model": self.model.state_dict(),
            "head": self.head.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "curve": self.meter.curve,
        }
        torch.save(state, self.ckpt.with_suffix(".tmp"))
        self.ckpt.with_suffix(".tmp").replace(self.ckpt)


# ---------------------------------------------------------------------------- all
def train_all(
    out: Path,
    *,
    recipe: Recipe = Recipe(),
    names: Sequence[str] = fixtures.NAMES,
    log: Log = print,
) -> dict[str, Any]:
    """Train the mini-world models named in ``names`` into ``out/<name>`` (the teacher needs
    the embedder: trained in the same call or already in ``out``). Returns per-model info
    (seconds, loss curve), also written to ``out/<name>/fixture.json``."""
    torch.set_num_threads(recipe.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    untrained = fixtures.build_model_fixtures(out / ".untrained", seed=recipe.seed)
    t0 = time.perf_counter()
    bank = render_bank(recipe.per_class, TRAIN_SEED + recipe.seed)
    log(f"rendered {len(bank.labels)} training images in {time.perf_counter() - t0:.1f}s")
    recipes = {  # in dependency order: the teacher starts from the embedder's vision tower
        fixtures.EMBEDDER: train_embedder,
        fixtures.TEACHER: partial(train_teacher, embedder=out / fixtures.EMBEDDER),
        fixtures.STUDENT: train_student,
    }
    report: dict[str, Any] = {}
    for name, train in recipes.items():
        if name in names:
            images = bank
            if name == fixtures.TEACHER:
                images = render_bank(recipe.teacher_per_class, TRAIN_SEED + recipe.seed)
            report[name] = train(
                start=untrained[name], out=out / name, bank=images, recipe=recipe, log=log
            )
    shutil.rmtree(out / ".untrained", ignore_errors=True)
    return report
