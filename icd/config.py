"""One typed configuration for a run: data, models, method, storage, pipeline.

Load a preset (``icd/presets/NAME.yaml``) or a YAML file, then apply ``key.path=value``
overrides. Unknown keys and invalid values raise :class:`ConfigError` with a one-line
message naming the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A user mistake in a config file, preset name or override (one-line message)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the benchmark stream comes from."""

    dataset: str = Field(
        "shapes", description="Registered dataset name (see `icd/data/registry.py`)"
    )
    source: str | None = Field(
        None,
        description="Override the registry source: 'hf:<id>', 'parquet:<path>', "
        "'imagefolder:<path>' or 'fixture:shapes'",
    )
    split: str | None = Field(None, description="Split to stream (default: the registry's)")
    limit: int | None = Field(None, ge=1, description="Stop after this many samples")
    order_seed: int | None = Field(
        None, description="Shuffle the stream order with this seed (None keeps source order)"
    )
    question_column: str | None = Field(
        None,
        description="Column holding each sample's question (default: the registry's; for an "
        "unregistered source, 'question' when the source has one, else a fixed question)",
    )
    revision: str | None = Field(
        None,
        description="Hub commit, branch or tag to read (default: the registry's; a branch is "
        "resolved to its commit at the start of a run when the Hub is reachable)",
    )
    registry: str | None = Field(
        None,
        description="YAML file of extra dataset entries (a 'datasets:' mapping, see "
        "docs/datasets.md); its names are looked up before the built-in registry",
    )


class ModelConfig(_Strict):
    """One model: a student, a teacher or the embedder."""

    backend: Literal["hf", "openai", "oracle"] = "hf"
    model_id: str = ""
    revision: str = "main"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    # hf backends: how the weights load and the inputs are prepared
    processor_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Processor options, at load and at every call (e.g. do_image_splitting, "
        "size, min_pixels, max_pixels)",
    )
    device_map: str | None = Field(
        None, description="Place the weights with accelerate ('auto': over all GPUs); not device"
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        "sdpa", description="Attention kernel (flash_attention_2 needs flash-attn)"
    )
    image_cache_mb: float = Field(
        4096,
        ge=0,
        description="hf VLMs: MB of processed images kept (each pool image is processed "
        "once, not once per prompt it is a demo in; least recently used go first; 0: off)",
    )
    # oracle teacher
    noise: float = Field(0.0, ge=0.0, le=1.0, description="Oracle: rate of wrong labels")
    # openai teacher
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    top_logprobs: int = Field(
        20,
        ge=-1,
        le=20,
        description="openai: alternatives per token (-1: no logprobs; at most 20, the API's "
        "limit and vLLM's default cap)",
    )
    length_answers: Literal["keep", "drop"] = Field(
        "keep",
        description="openai: answers cut off by max_tokens (finish_reason 'length') are "
        "counted as 'truncated' and kept as votes (keep) or left out of the vote (drop)",
    )
    sampling_extensions: bool | None = Field(
        None,
        description="Send top_k and repetition_penalty (vLLM/SGLang extensions; None: unless "
        "the endpoint is api.openai.com)",
    )
    image_ids: bool | None = Field(
        None,
        description="openai: send each image's stable id as its content part's 'uuid', so "
        "vLLM's multimodal cache reuses a repeated demo's processing (None: unless the "
        "endpoint is api.openai.com; a server that rejects the field gets no more)",
    )


class PolicyConfig(_Strict):
    """When the teacher is asked (docs/design.md §2.3)."""

    threshold: Literal["adaptive", "fixed", "always", "never"] = "adaptive"
    tau: float = Field(0.5, description="Fixed threshold on the uncertainty")
    budget: float | None = Field(0.04, ge=0.0, le=1.0, description="Fraction ρ of samples seen")
    budget_count: int | None = Field(None, ge=0, description="Absolute budget (overrides ρ)")
    warmup: int = Field(8, ge=0, description="First W samples queried unconditionally")
    invert: bool = Field(
        default=False,
        description="Ablation (breaks the gate on purpose): ask where the student is most "
        "certain instead of most uncertain",
    )


class IclGateConfig(_Strict):
    """Which samples get the student's second, in-context pass (docs/design.md §10)."""

    mode: Literal["always", "uncertain"] = Field(
        "always",
        description="always: every sample not answered by the teacher (the paper); uncertain: "
        "only those whose zero-shot uncertainty is high, the rest keep their zero-shot answer",
    )
    threshold: Literal["fixed", "adaptive"] = Field(
        "adaptive",
        description="fixed: ICL iff the uncertainty is above tau; adaptive: a running quantile "
        "so that about icl_rate of the candidates get ICL (paced like the query policy)",
    )
    tau: float = Field(0.5, description="Fixed threshold on the zero-shot uncertainty")
    icl_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="Adaptive: share of the candidates that get ICL"
    )


class VotingConfig(_Strict):
    """Teacher test-time scaling (docs/design.md §2.4)."""

    n: int = Field(5, ge=1, description="Teacher answers per queried sample")
    temperature: float = Field(0.7, ge=0.0)
    include_greedy: bool = True
    aggregation: Literal["majority", "consensus", "best_of_n"] = Field(
        "majority",
        description="majority (= consensus: the answer closest to the others; for closed-set "
        "and VQA answers a plurality vote, for captions the caption most similar to the "
        "other samples) or best_of_n (the teacher's most likely answer)",
    )
    a_min: float = Field(0.6, ge=0.0, le=1.0, description="Minimum agreement to enter the pool")
    fuzzy_threshold: float = Field(0.85, ge=0.0, le=1.0)
    minority: bool = Field(
        default=False,
        description="Ablation (breaks the vote on purpose): label a sample by its least-voted "
        "answer; agreement is that answer's share",
    )


class SelectionConfig(_Strict):
    """Demonstration selection (docs/design.md §2.6)."""

    strategy: Literal["random", "rices", "cross_modal", "combined", "cascade"] = "combined"
    k: int = Field(3, ge=0)
    w_ii: float = 1.0
    w_it: float = 1.0
    w_tt: float = 0.5
    shortlist: int = Field(32, ge=1, description="Cascade: K_it rows shortlisted by image→text")
    per_label_cap: int | None = Field(None, ge=1, description="At most m demos per label")
    most_similar_last: bool = True
    least_similar: bool = Field(
        default=False,
        description="Ablation (breaks retrieval on purpose): choose the k least similar demos "
        "by the strategy's score (random ignores it)",
    )
    ann_min_rows: int | None = Field(
        200_000,
        ge=0,
        description="Pool rows from which rices/combined/cascade rank an approximate index's "
        "shortlist (icd.storage.pool.ann); below it, and with None or 0, selection is exact",
    )
    ann_nprobe: int = Field(64, ge=1, description="Index lists searched per query")
    ann_retrain_growth: float = Field(
        2.0, gt=1.0, description="Retrain the index's clusters when the pool grows this much"
    )


class FinetuneConfig(_Strict):
    """Online LoRA adaptation of the student (modes ``finetune_lora`` and
    ``finetune_lora_icd``): after each chunk's pool commit, ``steps_per_chunk`` steps on
    the pool's labels (all of the run's rows, or the latest ``window``)."""

    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(
        default=["q_proj", "v_proj"], min_length=1, description="LM projections to adapt"
    )
    lr: float = Field(1e-3, gt=0)
    steps_per_chunk: int = Field(8, ge=0, description="Optimiser steps after each chunk")
    batch_size: int = Field(8, ge=1)
    replay: Literal["all", "window"] = "all"
    window: int = Field(256, ge=1, description="Latest pool rows trained on (replay=window)")


class PoolConfig(_Strict):
    """Curation of the demonstration pool (docs/design.md §10), after each chunk's
    admissions (:mod:`icd.method.curation`): a label audit, then a cap on the rows left
    for selection. Curated rows stay in the table, marked, so every chunk's pool can be
    checked out."""

    max_rows: int | None = Field(
        None, ge=1, description="Most rows the pool keeps for selection (None: unbounded)"
    )
    evict: Literal["oldest", "redundant"] = Field(
        "oldest",
        description="Which rows a capped pool evicts first: the oldest in the stream, or the "
        "most redundant (the older of the closest same-label pair by image embedding)",
    )
    audit: bool = Field(
        False, description="Exclude demos whose label disagrees with their neighbours' labels"
    )
    audit_k: int = Field(5, ge=1, description="Audit: nearest pool neighbours compared")
    audit_threshold: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Audit: exclude a demo when more than this share of its audit_k nearest "
        "neighbours (by image embedding) carry one and the same other label",
    )

    @property
    def curates(self) -> bool:
        """Whether any rule can take rows out of the pool."""
        return self.max_rows is not None or self.audit


# The run modes (icd.method.modes.MODES says what each runs).
ModeName = Literal[
    "icd",
    "student_zero_shot",
    "teacher_zero_shot",
    "teacher_forward",
    "random_demos",
    "rices",
    "pool_vote",
    "finetune_lora",
    "finetune_lora_icd",
]


class MethodConfig(_Strict):
    mode: ModeName = "icd"
    uncertainty: Literal["entropy_mean", "nll_mean", "entropy_first", "margin", "random"] = Field(
        "entropy_mean",
        description="What gates teacher queries (random: the ungated baseline, same budget)",
    )
    policy: PolicyConfig = PolicyConfig()
    icl_gate: IclGateConfig = IclGateConfig()
    voting: VotingConfig = VotingConfig()
    selection: SelectionConfig = SelectionConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    pool: PoolConfig = PoolConfig()
    final_from_teacher: bool = Field(
        True, description="Annotated samples take the teacher's voted label as final answer"
    )
    list_classes_in_prompt: bool = False


class ModelsConfig(_Strict):
    student: ModelConfig = ModelConfig(model_id="HuggingFaceTB/SmolVLM-256M-Instruct")
    teacher: ModelConfig = ModelConfig(model_id="Qwen/Qwen2.5-VL-7B-Instruct", batch_size=4)
    embedder: ModelConfig = ModelConfig(model_id="google/siglip-base-patch16-224", batch_size=32)


class StorageConfig(_Strict):
    root: str = Field(".icd", description="Folder for pools, results, MLflow store and cache")
    pool_uri: str | None = Field(None, description="LanceDB URI (default: ROOT/pool)")
    tracking_uri: str | None = Field(
        None, description="MLflow URI (default: sqlite:///ROOT/mlflow.db)"
    )
    experiment: str = "icd"
    compact_every: int = Field(
        16, ge=1, description="Compact the pool every N chunk commits (and at the end of a run)"
    )
    cache_dir: str | None = Field(
        None,
        description="Persisted task results, the cache that makes re-runs and resumes call "
        "no model twice (default: ROOT/cache; point several machines at a shared folder)",
    )

    def resolved_pool_uri(self) -> str:
        return self.pool_uri or str(Path(self.root).absolute() / "pool")

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{Path(self.root).absolute() / 'mlflow.db'}"

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir or Path(self.root) / "cache").absolute()

    def results_dir(self, run_id: str) -> Path:
        return Path(self.root).absolute() / "runs" / run_id


class PipelineConfig(_Strict):
    chunk_size: int = Field(64, ge=1)
    lookahead: int = Field(0, ge=0, description="Chunks whose pool-independent stages run ahead")
    task_runner: Literal["thread", "dask"] = "thread"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = Field(None, description="Existing Dask scheduler (default: local)")
    dask_workers: int = Field(2, ge=1)
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (1 is fastest for tiny models on CPU)"
    )
    cache: bool = Field(
        True,
        description="Share cached task results across runs (within a run they are always "
        "reused: that is what makes resume call no model twice)",
    )


class Config(_Strict):
    run_id: str | None = Field(None, description="Identifies the run; reuse it to resume")
    seed: int = 0
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    method: MethodConfig = MethodConfig()
    pipeline: PipelineConfig = PipelineConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.method.mode.startswith("finetune_lora") and self.models.student.backend != "hf":
            raise ValueError(f"method.mode {self.method.mode!r}: LoRA needs an 'hf' student")
        if self.models.student.backend not in ("hf", "openai"):
            raise ValueError("models.student.backend: the student must be 'hf' or 'openai'")
        if self.models.embedder.backend != "hf":
            raise ValueError("models.embedder.backend: the embedder must be an 'hf' model")
        return self

    def fingerprint(self, *paths: str) -> str:
        """A stable hash of the named config sections/fields (all of it if none given)."""
        data = self.model_dump(mode="json")
        picked = {p: _get(data, p) for p in paths} if paths else data
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; ConfigError (one line) for bad YAML or no mapping."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, bools, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. method.k=3")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Resolve a config: preset, then YAML file, then ``values`` (nested dict), then overrides."""
    data: dict[str, Any] = {}
    if preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(presets())})")
        data = _merge(data, read_yaml(path))
    if file is not None:
        path = Path(file)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = _merge(data, read_yaml(path))
    if values:
        data = _merge(data, values)
    section = data.get("data")
    preset_data = dict(section) if isinstance(section, dict) else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    _drop_foreign_source(data, preset_data, overrides or [])
    return validate(data)


def _drop_foreign_source(
    data: dict[str, Any], before: dict[str, Any], overrides: list[str]
) -> None:
    """An override naming an *unregistered* ``data.dataset`` without a ``data.source`` of
    its own does not inherit the preset's or file's source: that source is the old
    dataset's data, which would otherwise be streamed under the new name. Opening the
    stream then fails in one line (unknown dataset). A registered name keeps it (the
    entry read from that source, e.g. the smoke preset's fixture as ``shapes_captions``)."""
    section = data.get("data")
    if not isinstance(section, dict) or section.get("dataset") == before.get("dataset"):
        return
    if any(parse_override(item)[0] == ["data", "source"] for item in overrides):
        return
    from icd.data.registry import DATASETS, RegistryFileError, load_registry_file

    registry = section.get("registry")
    try:
        extra = load_registry_file(registry) if isinstance(registry, str) else {}
    except RegistryFileError:
        return  # reported, in one line, when the stream is opened
    if section.get("dataset") not in {*DATASETS, *extra}:
        section.pop("source", None)


def validate(data: dict[str, Any]) -> Config:
    """Validate a nested dict into a :class:`Config`, with a one-line error naming the key."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            near = closest_keys(key)
            hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
            raise ConfigError(f"unknown config key {key!r}{hint}") from None
        raise ConfigError(f"invalid value for {key!r}: {err['msg']}") from None


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (``method.policy.budget``, ...)."""
    model = model or Config
    keys: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [
            t
            for t in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if nested:
            keys.extend(config_keys(nested[0], f"{key}."))
        else:
            keys.append(key)
    return keys


def closest_keys(key: str, n: int = 3) -> list[str]:
    """The valid config keys nearest to the unknown ``key``: those ending in the same
    field name first, then the closest spellings."""
    known = config_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    same_leaf.sort(key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
    spelled = difflib.get_close_matches(key, known, n=n, cutoff=0.6)
    return list(dict.fromkeys([*same_leaf, *spelled]))[:n]
