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

The student's episodes (one prompt each):

- ``zs_base``: a base-class image, no demos → its class name;
- ``zs_novel``: a novel-class image, no demos → a random base class name (so the student
  answers novel classes wrongly and, across episodes, uncertainly);
- ``icl_novel``: a novel-class query and k demos, exactly one of its class, the others
  distractors that share its colour, its shape, or nothing → that demo's label. Novel shape
  names are permuted at random per episode (demos and target alike), so the only way to
  answer is to read the label off the matching demo — names cannot be memorised;
- ``icl_base``: a base-class query with k demos, with or without one of its class → its
  class name (demos must not wreck what the student knows).

k follows a curriculum: 1–2 demos first, 1–4 later.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from icd.data import shapes
from icd.method.prompts import build_prompt
from icd.models import fixtures
from icd.models.finetune import answer_loss, encode_answers

TRAIN_SEED = 1000  # image seeds of the training banks (benchmark streams use small seeds)
TASK = "classification"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on (recorded next to the weights)."""

    seed: int = 0
    per_class: int = 250  # training images per class
    embedder_steps: int = 1200
    teacher_steps: int = 1200
    student_steps: int = 5000
    # An optional second student phase (matching among 2-4 demos with decoys). Off: 2,500
    # steps of it took k=3 novel ICL from 62% to 52% and broke the hard-distractor case
    # (99% -> 40%) instead of teaching image matching at this model size.
    match_steps: int = 0
    match_lr: float = 1e-3
    # First phase: the share of novel in-context episodes whose distractors are decoys (all
    # one other novel shape, so the most frequent shape word is wrong), how much more likely
    # a distractor of any class is than one sharing the query's colour or shape, and the
    # weight of an aux class loss on the image tokens the LM reads. Off in the shipped
    # recipe: decoys 0.35 + any_distractors 2 + token aux 0.5 after 4,000 steps left k=3
    # one-match ICL at 0.58 (from 0.59) and the hard-distractor case at 0.54 (from 0.98).
    decoys: float = 0.0
    any_distractors: int = 1
    token_aux_weight: float = 0.0
    # A supervised contrastive loss on the image tokens (same class close, others far),
    # so that matching a query to its demo is an equality test. Off: with decoys 0.5 and
    # any_distractors 2 it left k=3 one-match ICL at 0.61 (2,000 steps) and 0.59 (3,000).
    token_contrast_weight: float = 0.0
    batch_size: int = 32
    lr: float = 3e-3
    aux_weight: float = 0.5  # auxiliary vision class loss
    threads: int = 1  # fastest for models of this size on CPU
    checkpoint_every: int = 1000  # the student is saved this often (a long run can be inspected)

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every schedule ``factor`` times as long (tests use ~0.02)."""
        return replace(
            self,
            per_class=max(4, int(self.per_class * factor)),
            embedder_steps=max(2, int(self.embedder_steps * factor)),
            teacher_steps=max(2, int(self.teacher_steps * factor)),
            student_steps=max(2, int(self.student_steps * factor)),
            match_steps=int(self.match_steps * factor),
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


def _save(model: Any, processor: Any, out: Path, info: dict[str, Any]) -> None:
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / fixtures.MARKER).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


class _Meter:
    """Running loss and progress lines every ``every`` steps."""

    def __init__(self, name: str, steps: int, log: Log, every: int = 100) -> None:
        every = max(1, min(every, steps // 5))  # short schedules still log a curve
        self.name, self.steps, self.log, self.every = name, steps, log, every
        self.t0 = time.perf_counter()
        self.total, self.count, self.curve = 0.0, 0, []

    def add(self, step: int, loss: float) -> None:
        self.total, self.count = self.total + loss, self.count + 1
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            mean = self.total / self.count
            self.curve.append((step + 1, round(mean, 4)))
            rate = (step + 1) / (time.perf_counter() - self.t0)
            self.log(f"{self.name} step {step + 1}/{self.steps} loss {mean:.4f} ({rate:.1f} it/s)")
            self.total, self.count = 0.0, 0

    def info(self) -> dict[str, Any]:
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


def encode_episodes(processor: Any, bank: Bank, episodes: Sequence[Episode]) -> dict[str, Any]:
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
        module.register_forward_hook(self._hook)

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
_NOVEL_SHAPES = [s for s in shapes.SHAPES if s not in shapes.BASE_SHAPES]


def _split(c: int) -> tuple[str, str]:
    colour, shape = shapes.CLASS_NAMES[c].split(" ", 1)
    return colour, shape


_KINDS = ["zs_base", "zs_novel", "icl_novel", "icl_base"]
_MIX = (2, 1, 5, 2)  # first phase: episode kinds in these proportions
_MATCH_MIX = (2, 1, 6, 2)  # matching phase


def student_episode(
    rng: random.Random,
    bank: Bank,
    max_k: int,
    *,
    min_k: int = 1,
    mix: Sequence[int] = _MIX,
    any_distractors: int = 1,
    decoys: float = 0.0,
) -> Episode:
    """One training prompt for the student (see the module docstring). Each distractor
    shares the query's colour, or its shape, or is any other class — the last
    ``any_distractors`` times as likely as each of the first two. With probability
    ``decoys`` a novel query's distractors instead all share one other novel shape, so the
    shape word most demos carry is the wrong one: only the matching image tells."""
    kind = rng.choices(_KINDS, mix)[0]
    perm = dict(zip(_NOVEL_SHAPES, rng.sample(_NOVEL_SHAPES, len(_NOVEL_SHAPES)), strict=True))

    def name(c: int) -> str:
        colour, shape = _split(c)
        return f"{colour} {perm.get(shape, shape)}"

    def pick(c: int, avoid: int = -1) -> int:
        while True:
            i = int(rng.choice(bank.by_class[c]))
            if i != avoid:
                return i

    q_class = rng.choice(_BASE if kind.endswith("base") else _NOVEL)
    query = pick(q_class)
    if kind == "zs_base":
        return Episode(query, [], shapes.CLASS_NAMES[q_class], kind)
    if kind == "zs_novel":
        return Episode(query, [], shapes.CLASS_NAMES[rng.choice(_BASE)], kind)
    k = rng.randint(min_k, max_k)
    colour, shape = _split(q_class)
    others = [c for c in range(len(shapes.CLASS_NAMES)) if c != q_class]
    same_colour = [c for c in others if _split(c)[0] == colour]
    same_shape = [c for c in others if _split(c)[1] == shape]
    match = kind == "icl_novel" or rng.random() < 0.5
    demo_classes = [q_class] if match else []
    if kind == "icl_novel" and decoys and rng.random() < decoys:
        decoy = rng.choice([s for s in _NOVEL_SHAPES if s != shape])
        same_shape = others = [c for c in _NOVEL if _split(c)[1] == decoy]
        same_colour = others
    while len(demo_classes) < k:
        demo_classes.append(
            rng.choice(rng.choice([same_colour, same_shape, *[others] * any_distractors]))
        )
    rng.shuffle(demo_classes)
    demos = [(pick(c, avoid=query), name(c)) for c in demo_classes]
    return Episode(query, demos, name(q_class), kind)


def train_student(*, start: Path, out: Path, bank: Bank, recipe: Recipe, log: Log) -> dict:
    """Base classes by name, novel ones from matching demonstrations (module docstring)."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    torch.manual_seed(recipe.seed + 2)
    rng = random.Random(recipe.seed + 3)
    model = Idefics3ForConditionalGeneration.from_pretrained(start).train()
    processor = AutoProcessor.from_pretrained(start)
    # The image tokens the language model reads (one per image) learn to name the class as
    # well as the vision tower's patches do: a query's token then lies closest to its class's
    # demo tokens, which is what matching a demonstration reads.
    tower, connector = model.model.vision_model, model.model.connector
    taps = [
        (_Tap(tower, hidden=tower.config.hidden_size), recipe.aux_weight),
        (_Tap(connector, hidden=model.config.text_config.hidden_size), recipe.token_aux_weight),
    ]
    aux, opt, sched, params = _with_aux(model, taps, recipe.lr, recipe.student_steps)
    meter = _Meter("student", recipe.student_steps, log)
    for step in range(recipe.student_steps):
        max_k = 2 if step < recipe.student_steps // 5 else 4
        eps = [
            student_episode(
                rng, bank, max_k, any_distractors=recipe.any_distractors, decoys=recipe.decoys
            )
            for _ in range(recipe.batch_size)
        ]
        loss = answer_loss(model, encode_episodes(processor, bank, eps))
        seen = bank.labels[[i for ep in eps for i in _images_of(ep)]]
        loss = loss + aux.loss(seen)
        if recipe.token_contrast_weight:
            contrast = _supcon(taps[1][0].pooled, torch.as_tensor(seen))
            loss = loss + recipe.token_contrast_weight * contrast
        _step(opt, sched, loss, params)
        meter.add(step, loss.item())
        if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.student_steps:
            _save(model, processor, out, {"model": fixtures.STUDENT, "partial": step + 1})
            model.train()
    info = {"model": fixtures.STUDENT, "recipe": asdict(recipe), **meter.info()}
    if recipe.match_steps:
        info["match_phase"] = match_phase(
            model, bank=bank, processor=processor, recipe=recipe, log=log
        )
    _save(model, processor, out, info)
    return info


def match_phase(model: Any, *, bank: Bank, processor: Any, recipe: Recipe, log: Log) -> dict:
    """The student's second phase: ``recipe.match_steps`` steps on a fresh schedule at
    ``recipe.match_lr``, answer loss only, with more in-context episodes of 2–4 demos whose
    distractors are mostly unrelated classes or decoys sharing another shape — so the
    student must find the demo whose image matches the query, not the shape word most
    demos carry (a shortcut the first phase's distractors leave open)."""
    rng = random.Random(recipe.seed + 4)
    model.train()
    opt, sched = _optimizer(model, recipe.match_lr, recipe.match_steps)
    params = list(model.parameters())
    meter = _Meter("student (matching)", recipe.match_steps, log)
    for step in range(recipe.match_steps):
        eps = [
            student_episode(rng, bank, 4, min_k=2, mix=_MATCH_MIX, any_distractors=2, decoys=0.5)
            for _ in range(recipe.batch_size)
        ]
        loss = answer_loss(model, encode_episodes(processor, bank, eps))
        _step(opt, sched, loss, params)
        meter.add(step, loss.item())
    model.eval()
    return meter.info()


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
            report[name] = train(
                start=untrained[name], out=out / name, bank=bank, recipe=recipe, log=log
            )
    shutil.rmtree(out / ".untrained", ignore_errors=True)
    return report
