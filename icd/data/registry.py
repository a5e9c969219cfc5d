"""Named benchmark streams: where each dataset lives and how its columns map onto samples.

``DATASETS`` holds the offline shapes fixture (as a classification set, ``shapes``, and as
a captioning set, ``shapes_captions``) and the fine-grained classification, VQA and
captioning sets commonly used in VLM in-context-learning papers. Hub ids and column
layouts of the public sets were taken from their Hugging Face dataset cards but could not
be loaded on the offline machine this was written on, so they are marked
``verified=False`` with a note saying so; ``icd`` reports a one-line error naming the id
when one cannot be opened.

Every hub entry names its ``revision``: a commit sha where public evidence pins one (the
comment next to it says where), else ``None`` (the default branch), which
:func:`icd.data.revisions.resolve_revision` turns into its commit at the start of a run when
the Hub is reachable. Golden schema tests (``tests/data/schemas``) hold each entry's columns
and split names as its dataset card states them.

More datasets can be registered without editing Python: a YAML file with a ``datasets:``
mapping (:func:`load_registry_file`), named by ``data.registry``; see docs/datasets.md.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from icd.data import shapes

Task = Literal["classification", "vqa", "captioning"]
TASKS: tuple[str, ...] = ("classification", "vqa", "captioning")
SOURCE_KINDS = ("hf", "parquet", "imagefolder", "fixture")


class UnknownDataset(ValueError):
    """A dataset name that is not in the registry (one-line message listing known names)."""


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one benchmark stream.

    ``source`` is ``hf:<hub id>``, ``parquet:<file, folder or glob>``,
    ``imagefolder:<folder>`` or ``fixture:shapes`` (optionally
    ``fixture:shapes?n=200&seed=1&corrupt_every=50``). A classification set names its
    ``label_column`` (class index or name); ``class_names=None`` means "read them from the
    column's ``ClassLabel`` feature". A VQA set names its ``answers_column`` (a list of
    human answers, or the VQAv2 list of ``{"answer": ...}`` dicts); so does a captioning
    set (its reference captions, a list of strings). When the dataset has no question
    column, every sample is asked ``question``. ``prompt`` is a template with a
    ``{question}`` field that turns the dataset's question into what the models are asked
    (e.g. extra context); the answer-format instruction is added by ``icd.method.prompts``,
    so the default ``"{question}"`` is usually right. ``synonyms`` maps a class name to
    other accepted answers. ``readable_names`` turns raw class names such as
    ``001.Black_footed_Albatross`` or ``AnnualCrop`` into ``Black footed Albatross`` /
    ``Annual Crop``. ``class_groups`` names groups of classes whose accuracy is reported
    apart (``base``: classes the student already knows, ``novel``: those it must learn in
    context). ``revision`` is the hub commit (or branch; None: ``main``) a hub source is read
    at; ``config`` its configuration name.
    """

    name: str
    source: str
    split: str
    task: Task = "classification"
    image_column: str = "image"
    question_column: str | None = None
    question: str = "What is shown in the image?"
    label_column: str | None = None
    answers_column: str | None = None
    id_column: str | None = None
    class_names: tuple[str, ...] | None = None
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    class_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prompt: str = "{question}"
    config: str | None = None
    revision: str | None = None
    readable_names: bool = True
    shuffle_buffer: int = 10_000
    verified: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        kind = self.source.split(":", 1)[0]
        if ":" not in self.source or kind not in SOURCE_KINDS or not self.source.split(":", 1)[1]:
            raise ValueError(
                f"dataset {self.name!r}: source {self.source!r} must look like "
                "'hf:<id>', 'parquet:<path>', 'imagefolder:<dir>' or 'fixture:shapes'"
            )
        if self.task not in TASKS:
            raise ValueError(
                f"dataset {self.name!r}: task must be one of {', '.join(TASKS)}, got {self.task!r}"
            )
        if self.task == "classification" and not self.label_column:
            raise ValueError(f"dataset {self.name!r}: a classification set needs label_column")
        if self.task == "vqa" and not self.answers_column:
            raise ValueError(f"dataset {self.name!r}: a VQA set needs answers_column")
        if self.task == "captioning" and not self.answers_column:
            raise ValueError(
                f"dataset {self.name!r}: a captioning set needs answers_column (its captions)"
            )
        if "{question}" not in self.prompt:
            raise ValueError(f"dataset {self.name!r}: prompt must contain '{{question}}'")
        if self.question_column is None and not self.question.strip():
            raise ValueError(f"dataset {self.name!r}: needs question_column or a fixed question")
        if self.shuffle_buffer < 1:
            raise ValueError(f"dataset {self.name!r}: shuffle_buffer must be >= 1")

    @property
    def kind(self) -> str:
        """The source kind: ``hf``, ``parquet``, ``imagefolder`` or ``fixture``."""
        return self.source.split(":", 1)[0]

    @property
    def target(self) -> str:
        """The source without its kind prefix (hub id, path, glob or fixture name)."""
        return self.source.split(":", 1)[1]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able dict (for logging as run parameters)."""
        d = asdict(self)
        d["class_names"] = list(self.class_names) if self.class_names is not None else None
        d["synonyms"] = {k: list(v) for k, v in self.synonyms.items()}
        return d


def readable_name(name: str) -> str:
    """Turn a raw class name into words: drop a leading ``001.`` index, turn ``_`` into
    spaces, split CamelCase words (``SeaLake`` -> ``Sea Lake``) and squeeze whitespace."""
    name = re.sub(r"^\d+\.", "", name.strip())
    name = name.replace("_", " ")
    if " " not in name:
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return " ".join(name.split())


_UNVERIFIED = (
    "Hub id and columns taken from the dataset card; not loadable on the offline machine "
    "this registry was written on — unverified."
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="shapes",
            source="fixture:shapes",
            split="train",
            question_column="question",
            label_column="label",
            id_column="id",
            synonyms={k: tuple(v) for k, v in shapes.SYNONYMS.items()},
            class_groups={"base": tuple(shapes.BASE_CLASSES), "novel": tuple(shapes.NOVEL_CLASSES)},
            verified=True,
            note="Procedural offline fixture (icd.data.shapes): 24 classes (8 base, 16 novel), 2000 samples, "
            "4 deliberately corrupt images.",
        ),
        DatasetSpec(
            name="shapes_captions",
            source="fixture:shapes",
            split="train",
            task="captioning",
            question_column="question",
            answers_column="captions",
            id_column="id",
            verified=True,
            note="The shapes fixture as a captioning set: the same images and ids, each with "
            f"{shapes.N_CAPTIONS} procedural reference captions describing the scene (colour, "
            "shape, size, position, background tint; icd.data.shapes.captions_of).",
        ),
        DatasetSpec(
            name="cub200",
            source="hf:bentrevett/caltech-ucsd-birds-200-2011",
            split="test",
            label_column="label",
            question="What species of bird is shown in the image?",
            note="CUB-200-2011, 200 bird species. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="flowers102",
            source="hf:dpdl-benchmark/oxford_flowers102",
            split="test",
            label_column="label",
            question="What type of flower is shown in the image?",
            note="Oxford Flowers-102. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="aircraft",
            # HuggingFaceM4/FGVC-Aircraft's main revision is a loading script, which datasets
            # >= 4 refuses; its parquet conversion exists only on an open PR. The mteb copy is
            # parquet, split test, label column variant (100 variants), pinned here.
            source="hf:mteb/FGVCAircraft",
            revision="3ae0e4e94e37c610c26df758ec3255fa90d80e67",
            split="test",
            label_column="variant",
            question="Which aircraft model is shown in the image?",
            note="FGVC-Aircraft, 100 variants (mteb's parquet copy). " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="cars",
            source="hf:tanganke/stanford_cars",
            # pinned in public code that checked it against the Hub (16,185 images, labels 0-195)
            revision="9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40",
            split="test",
            label_column="label",
            question="What car model is shown in the image?",
            note="Stanford Cars, 196 classes. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="pets",
            source="hf:timm/oxford-iiit-pet",
            split="test",
            label_column="label",
            id_column="image_id",
            question="What breed of cat or dog is shown in the image?",
            note="Oxford-IIIT Pets, 37 breeds. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="food101",
            source="hf:ethz/food101",
            # the revision mteb pins (Food101Classification, split validation)
            revision="e06acf2a88084f04bce4d4a525165d68e0a36c38",
            split="validation",
            label_column="label",
            question="What dish is shown in the image?",
            note="Food-101 (its 25,250-image 'validation' split is the standard test set). "
            + _UNVERIFIED,
        ),
        DatasetSpec(
            name="dtd",
            source="hf:tanganke/dtd",
            # the revision mteb pins (DTDClassification, split test)
            revision="d2afa97d9f335b1a6b3b09c637aef667f98f966e",
            split="test",
            label_column="label",
            question="What texture is shown in the image?",
            synonyms={"polka-dotted": ("polka dot", "polka dots"), "zigzagged": ("zigzag",)},
            note="Describable Textures (DTD), 47 classes. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="eurosat",
            # tanganke/eurosat renames the classes ("annual crop land", "brushland or
            # shrubland", ...); timm/eurosat-rgb keeps the raw AnnualCrop ... SeaLake names
            # these synonyms are keyed on (5,400 test images).
            source="hf:timm/eurosat-rgb",
            # the revision mteb pins (EuroSATClassification, split test)
            revision="b4e28552cd5f3932b6abc37eb20d3e84901ad728",
            split="test",
            label_column="label",
            question="What kind of land cover is shown in this satellite image?",
            synonyms={
                "annual crop": ("annual crop land", "cropland"),
                "permanent crop": ("permanent crop land", "orchard", "vineyard"),
                "herbaceous vegetation": ("herbaceous vegetation land", "grassland"),
                "highway": ("road", "highway or road"),
                "industrial": ("industrial buildings", "industrial area"),
                "pasture": ("pasture land", "meadow"),
                "residential": ("residential buildings", "residential area", "houses"),
                "sea lake": ("sea or lake", "sea", "lake"),
                "forest": ("woods",),
                "river": ("stream",),
            },
            note="EuroSAT RGB, 10 land-cover classes (raw names like 'SeaLake' are split into "
            "words). " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="vqav2",
            source="hf:lmms-lab-encoder/VQAv2",  # lmms-eval moved lmms-lab/* here
            split="validation",
            task="vqa",
            question_column="question",
            answers_column="answers",
            id_column="question_id",
            note="VQAv2 val (214k questions; use data.limit). 'answers' is a list of "
            "{answer, answer_confidence, answer_id} dicts. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="okvqa",
            source="hf:lmms-lab-encoder/OK-VQA",  # lmms-eval moved lmms-lab/* here
            split="val2014",
            task="vqa",
            question_column="question",
            answers_column="answers",
            id_column="question_id",
            note="OK-VQA val, 5,046 questions needing outside knowledge. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="textvqa",
            source="hf:lmms-lab-encoder/textvqa",  # lmms-eval moved lmms-lab/* here
            split="validation",
            task="vqa",
            question_column="question",
            answers_column="answers",
            id_column="question_id",
            note="TextVQA val, questions about text in the image. " + _UNVERIFIED,
        ),
        DatasetSpec(
            name="flickr30k",
            # nlphuji/flickr30k's main revision is a loading script (refused by datasets >= 4);
            # lmms-lab-encoder/flickr30k is its parquet copy: split test, 31,783 rows,
            # columns caption (5 per image) and img_id, no Karpathy split column.
            source="hf:lmms-lab-encoder/flickr30k",
            split="test",
            task="captioning",
            answers_column="caption",
            id_column="img_id",
            question="What is shown in the image?",
            note="Flickr30k, 5 captions per image, all 31,783 images in one 'test' split (use "
            "data.limit, or a parquet of the 1,000 Karpathy test rows via data.source). "
            + _UNVERIFIED,
        ),
        DatasetSpec(
            name="vizwiz",
            source="hf:lmms-lab-encoder/VizWiz-VQA",
            split="val",
            task="vqa",
            question_column="question",
            answers_column="answers",
            id_column="question_id",
            note="VizWiz-VQA val, 4,319 questions asked by blind people about their photos; "
            "'unanswerable' is a valid answer (scored by VQA accuracy like any other). "
            + _UNVERIFIED,
        ),
        DatasetSpec(
            name="nocaps",
            source="hf:lmms-lab-encoder/NoCaps",
            split="validation",
            task="captioning",
            answers_column="annotations_captions",
            id_column="image_id",
            question="What is shown in the image?",
            note="NoCaps validation, 4,500 images of novel objects, ~10 captions each (CIDEr). "
            + _UNVERIFIED,
        ),
        DatasetSpec(
            name="coco_karpathy",
            source="hf:yerevann/coco-karpathy",
            split="test",
            task="captioning",
            image_column="url",
            answers_column="sentences",
            id_column="cocoid",
            question="What is shown in the image?",
            note="COCO captions, Karpathy test split (5,000 images, ~5 captions each). The "
            "rows carry image URLs, not bytes: each image is fetched from its URL when read. "
            + _UNVERIFIED,
        ),
    ]
}


def get_dataset(name: str, registry_file: str | Path | None = None) -> DatasetSpec:
    """The spec called ``name``: from ``registry_file`` (a YAML registry, see
    :func:`load_registry_file`) when given and it has one, else the built-in registry;
    :class:`UnknownDataset` if neither has it, :class:`RegistryFileError` for a bad file."""
    extra = load_registry_file(registry_file) if registry_file is not None else {}
    if name in extra:
        return extra[name]
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted({*DATASETS, *extra}))
        raise UnknownDataset(
            f"unknown dataset {name!r}: give its data.source (parquet:, imagefolder: or hf:) "
            f"or a registered name ({known})"
        ) from None


# -- YAML registry files ---------------------------------------------------------------


class RegistryFileError(ValueError):
    """A dataset registry file that cannot be read or has an invalid entry (one line)."""


def _entry_model() -> type[Any]:
    """The pydantic model of one YAML entry, derived from :class:`DatasetSpec`: its fields
    less ``name`` (the entry's key) and ``verified`` (said of shipped entries only), with
    their types and defaults; no other keys."""
    from typing import get_type_hints

    from pydantic import ConfigDict, Field, create_model

    hints = get_type_hints(DatasetSpec)

    def default(f: Any) -> Any:
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            return Field(default_factory=f.default_factory)
        return ...  # required

    # name -> (type form, default); values typed Any because create_model's ** also
    # binds its typed dunder keywords
    entry: dict[str, Any] = {
        f.name: (hints[f.name], default(f))
        for f in fields(DatasetSpec)
        if f.name not in ("name", "verified")
    }
    return create_model("DatasetEntry", __config__=ConfigDict(extra="forbid"), **entry)


def load_registry_file(path: str | Path) -> dict[str, DatasetSpec]:
    """The datasets a YAML registry file declares, by name.

    The file holds ``datasets:``, a mapping from a name to an entry with
    :class:`DatasetSpec`'s fields (``source`` and ``split`` required; unknown keys are
    errors). A relative ``parquet:`` or ``imagefolder:`` path is taken relative to the
    file's folder. Raises :class:`RegistryFileError` with a one-line message naming the
    file, the dataset and the key.
    """
    import yaml
    from pydantic import ValidationError

    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as e:
        raise RegistryFileError(
            f"dataset registry {str(file)!r}: cannot read it ({e.strerror})"
        ) from None
    except yaml.YAMLError as e:
        raise RegistryFileError(
            f"dataset registry {str(file)!r}: not valid YAML ({type(e).__name__})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict):
        raise RegistryFileError(
            f"dataset registry {str(file)!r}: expected a top-level 'datasets:' mapping of "
            "name -> entry"
        )
    unknown_top = set(data) - {"datasets"}
    if unknown_top:
        raise RegistryFileError(
            f"dataset registry {str(file)!r}: unknown top-level key(s) "
            f"{', '.join(sorted(map(str, unknown_top)))}"
        )
    model = _entry_model()
    out: dict[str, DatasetSpec] = {}
    for name, raw in data["datasets"].items():
        where = f"dataset registry {str(file)!r}: dataset {str(name)!r}"
        if not isinstance(raw, dict):
            raise RegistryFileError(f"{where}: expected a mapping of fields")
        try:
            entry = model.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise RegistryFileError(f"{where}: unknown key {key!r}") from None
            raise RegistryFileError(f"{where}: {key}: {err['msg']}") from None
        values = entry.model_dump()  # tuples where DatasetSpec has them
        values["source"] = _relative_to(values["source"], file.parent)
        try:
            out[str(name)] = DatasetSpec(name=str(name), **values)
        except ValueError as e:
            raise RegistryFileError(
                f"{where}: {e}".replace(f"dataset {str(name)!r}: ", "")
            ) from None
    return out


def _relative_to(source: str, folder: Path) -> str:
    kind, _, target = source.partition(":")
    if (
        kind in ("parquet", "imagefolder")
        and target
        and not Path(target).expanduser().is_absolute()
    ):
        return f"{kind}:{folder / target}"
    return source
