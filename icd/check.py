"""``icd check``: is this machine ready for a run of this config? One line per check.

Checks, without loading any weights or reading the stream:

- ``deps``: the packages each configured model needs (sentencepiece for SigLIP, torchvision
  for the Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision processors, accelerate for ``device_map``,
  flash-attn for ``flash_attention_2``), with the install command when one is missing;
- ``model <role>``: the model id loads: a local folder or fixture, a Hugging Face cache
  entry, or a reachable hub (the offline answer: "not in the Hugging Face cache and the hub
  is unreachable");
- ``device <role>``: the configured ``device`` exists here (CUDA / MPS / CPU);
- ``teacher api``: for an OpenAI-compatible teacher, the API key variable is set (required
  for api.openai.com) and ``base_url`` answers ``GET /models`` listing the model;
- ``storage``: the storage root is writable;
- ``dataset``: one line per dataset (the config's, plus those of the shipped benchmark
  suites built on the preset): its source, the pinned revision (or the branch resolved at
  run start) and whether it is reachable (registry entry; local path exists; fixture; hub
  dataset in the cache or the hub reachable, and not a bare loading script).

:func:`run_checks` returns :class:`Check` rows; the command exits 0 only if all pass.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from icd.config import Config, ModelConfig
from icd.errors import one_line
from icd.jsontypes import JSONObject, JSONValue

# Model types whose processors need torchvision (their video processors), SentencePiece.
TORCHVISION_TYPES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video"}
TORCHVISION_IDS = re.compile(r"qwen2(\.5)?-vl|qwen3-vl|llava-onevision|llava-next-video", re.I)
SENTENCEPIECE_TYPES = {"siglip", "siglip2"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':<4}  {self.name:<16} {self.detail}"


def _hub_offline() -> bool:
    from huggingface_hub.constants import is_offline_mode

    return bool(is_offline_mode())


def _hub_reachable() -> bool:
    from icd.models.hf import _hub_reachable as probe

    return not _hub_offline() and probe()


def _unreachable() -> str:
    return "the hub is unreachable" + (" (HF_HUB_OFFLINE is set)" if _hub_offline() else "")


def _hub_cached(cfg: ModelConfig, name: str) -> Path | None:
    """The file ``name`` of hub model ``cfg.model_id`` in the Hugging Face cache (None: not
    there); nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(cfg.model_id, name, revision=cfg.revision)
    except Exception:  # a malformed repo id
        cached = None
    return Path(cached) if isinstance(cached, str) else None


def _local_config(cfg: ModelConfig) -> tuple[str | None, JSONObject | None, str | None]:
    """(where the model is, its config.json, the error) without downloading anything."""
    from icd.models.fixtures import resolve_model_path

    try:
        path = resolve_model_path(cfg.model_id)
    except ValueError as e:
        return None, None, str(e)
    if path is not None:
        conf = path / "config.json"
        data = json.loads(conf.read_text()) if conf.is_file() else None
        return f"local folder {path}", data, None
    cached = _hub_cached(cfg, "config.json")
    if cached is not None:
        return "in the Hugging Face cache", json.loads(cached.read_text()), None
    return None, None, None


def _model_type(data: JSONObject | None) -> set[str]:
    if not data:
        return set()
    types = {str(data.get("model_type", ""))}
    for sub in ("text_config", "vision_config"):
        part = data.get(sub)
        if isinstance(part, dict):
            types.add(str(part.get("model_type", "")))
    return types - {""}


def needed_packages(cfg: ModelConfig, config: JSONObject | None) -> list[str]:
    """Optional packages the model of ``cfg`` needs (import names)."""
    if cfg.backend != "hf":
        return []
    types = _model_type(config)
    need = []
    if types & TORCHVISION_TYPES or TORCHVISION_IDS.search(cfg.model_id):
        need.append("torchvision")
    if types & SENTENCEPIECE_TYPES or "siglip" in cfg.model_id.lower():
        need.append("sentencepiece")
    if cfg.device_map is not None:
        need.append("accelerate")
    if cfg.attn_implementation == "flash_attention_2":
        need.append("flash_attn")
    return need


def _roles(cfg: Config) -> list[tuple[str, ModelConfig]]:
    roles = [("student", cfg.models.student), ("embedder", cfg.models.embedder)]
    if cfg.method.mode != "student_zero_shot":
        roles.insert(1, ("teacher", cfg.models.teacher))
    return roles


def check_deps(
    roles: list[tuple[str, ModelConfig]], configs: Mapping[str, JSONObject | None]
) -> Check:
    from icd.models.hf import OPTIONAL_DEPENDENCIES, has_module

    missing: dict[str, list[str]] = {}
    present: set[str] = set()
    for role, m in roles:
        for pkg in needed_packages(m, configs.get(role)):
            if has_module(pkg):
                present.add(pkg)
            else:
                missing.setdefault(pkg, []).append(f"{role} {m.model_id!r}")
    if missing:
        parts = [
            f"{pkg} (for {', '.join(who)}): {OPTIONAL_DEPENDENCIES[pkg][1]}"
            for pkg, who in missing.items()
        ]
        return Check("deps", False, "missing " + "; ".join(parts))
    have = ", ".join(sorted(present)) or "no optional packages needed"
    return Check("deps", True, have)


def check_model(role: str, m: ModelConfig) -> tuple[Check, JSONObject | None]:
    name = f"model {role}"
    if m.backend == "oracle":
        return Check(name, True, f"oracle {m.model_id!r} (ground truth)"), None
    if m.backend == "openai":
        return Check(name, True, f"{m.model_id!r} served at {m.base_url} (see teacher api)"), None
    if not m.model_id.strip():
        return Check(name, False, "model_id is empty"), None
    where, data, error = _local_config(m)
    if error is not None:
        return Check(name, False, f"{m.model_id!r}: {error}"), None
    if where is not None:
        return Check(name, True, f"{m.model_id!r}: {where}"), data
    if _hub_reachable():
        return Check(name, True, f"{m.model_id!r}: not cached, the hub is reachable"), None
    return (
        Check(
            name,
            False,
            f"{m.model_id!r}: not a local folder, not in the Hugging Face cache, and "
            + _unreachable(),
        ),
        None,
    )


def _image_processor_type(m: ModelConfig) -> str | None:
    """The image processor class a model's saved processor names, read from the local folder
    or the Hugging Face cache (None: not here, or not named)."""
    from icd.models.fixtures import resolve_model_path

    try:
        folder = resolve_model_path(m.model_id)
    except ValueError:
        return None
    for name, path in (
        ("processor_config.json", ("image_processor",)),
        ("preprocessor_config.json", ()),
    ):
        file = folder / name if folder is not None else _hub_cached(m, name)
        if file is None or not file.is_file():
            continue
        data: JSONValue = json.loads(file.read_text())
        for key in path:
            data = data.get(key) if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("image_processor_type"):
            return str(data["image_processor_type"])
    return None


def check_image_cache(m: ModelConfig) -> Check | None:
    """Whether the hf student's processed-image cache will be on (nothing is loaded)."""
    from icd.models.image_cache import layout_for

    if m.backend != "hf":
        return None
    name = "image cache"
    if m.image_cache_mb <= 0:
        return Check(name, True, "student: off (image_cache_mb: 0)")
    kind = _image_processor_type(m)
    if kind is None:
        return Check(
            name,
            True,
            f"student: up to {m.image_cache_mb:g} MB once its processor is here, if its image processor's layout is known",
        )
    layout = layout_for(kind)
    if layout is None:
        return Check(
            name,
            True,
            f"student: off — {kind} has no known batch layout; each image is processed per prompt",
        )
    return Check(
        name, True, f"student: on, up to {m.image_cache_mb:g} MB ({kind}, {layout} layout)"
    )


def check_device(role: str, m: ModelConfig) -> Check | None:
    if m.backend != "hf":
        return None
    import torch

    name = f"device {role}"
    if m.device_map is not None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Check(name, True, f"device_map {m.device_map!r} over {gpus} GPU(s) + CPU")
    dev = m.device
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            return Check(name, False, f"{dev!r}: CUDA is not available (torch {torch.__version__})")
        index = int(dev.split(":", 1)[1]) if ":" in dev else 0
        if index >= torch.cuda.device_count():
            return Check(name, False, f"{dev!r}: only {torch.cuda.device_count()} GPU(s) here")
        return Check(name, True, f"{dev!r}: {torch.cuda.get_device_name(index)}")
    if dev == "mps" and not torch.backends.mps.is_available():
        return Check(name, False, "'mps' is not available here")
    if dev not in ("cpu", "mps"):
        return Check(name, False, f"unknown device {dev!r}")
    return Check(name, True, repr(dev))


def check_teacher_api(m: ModelConfig, timeout: float = 5.0) -> list[Check]:
    import httpx

    out = []
    key = os.environ.get(m.api_key_env)
    hosted = "api.openai.com" in (m.base_url or "")
    if key:
        out.append(Check("teacher key", True, f"{m.api_key_env} is set"))
    elif hosted:
        out.append(
            Check("teacher key", False, f"{m.api_key_env} is not set (needed by {m.base_url})")
        )
    else:
        out.append(Check("teacher key", True, f"{m.api_key_env} not set (the server needs none?)"))
    if not m.base_url:
        out.append(Check("teacher api", False, "models.teacher.base_url is not set"))
        return out
    url = m.base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout)
    except (httpx.HTTPError, ValueError) as e:
        out.append(Check("teacher api", False, f"{url}: unreachable ({type(e).__name__})"))
        return out
    if resp.status_code != 200:
        hint = f" — check {m.api_key_env}" if resp.status_code in (401, 403) else ""
        out.append(Check("teacher api", False, f"{url}: HTTP {resp.status_code}{hint}"))
        return out
    try:
        ids = [d.get("id") for d in resp.json().get("data", [])]
    except (ValueError, AttributeError):
        ids = []
    if ids and m.model_id not in ids:
        shown = ", ".join(map(str, ids[:5]))
        out.append(Check("teacher api", False, f"{url}: model {m.model_id!r} not served ({shown})"))
    else:
        out.append(Check("teacher api", True, f"{url} answers; serves {m.model_id!r}"))
    return out


def check_storage(cfg: Config) -> Check:
    root = Path(cfg.storage.root).expanduser().absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".icd-check-"):
            pass
    except OSError as e:
        return Check("storage", False, f"{root}: not writable ({e.strerror or type(e).__name__})")
    return Check("storage", True, f"{root} is writable")


def preset_datasets(cfg: Config, preset: str | None = None) -> list[str]:
    """The datasets a check covers: the config's own, then those of the shipped benchmark
    suites built on ``preset`` (their ``base_preset``), each once, in that order."""
    from icd.config import PRESET_DIR, read_yaml

    names = [cfg.data.dataset]
    if preset is not None:
        for path in sorted((PRESET_DIR / "benchmarks").glob("*.yaml")):
            suite = read_yaml(path)
            if suite.get("base_preset", "smoke") == preset:
                names += [str(n) for n in suite.get("datasets") or []]
    return list(dict.fromkeys(names))


def _revision_label(revision: str | None, resolved: str | None = None) -> str:
    from icd.data.revisions import DEFAULT_BRANCH, is_commit

    if is_commit(revision):
        return f"{str(revision)[:12]} (pinned)"
    branch = revision or DEFAULT_BRANCH
    if resolved:
        return f"{branch} -> {resolved[:12]} (unpinned)"
    return f"{branch} (unpinned; resolved at run start)"


def check_dataset(cfg: Config, name: str | None = None) -> Check:
    """One line for dataset ``name`` (default: the config's): its source, for a hub source
    the revision (pinned commit, or the branch resolved at run start), and whether it can be
    read here (local path exists; fixture; hub dataset in the cache or the hub reachable).
    A hub revision that is only a loading script fails with the fix, not a traceback. The
    config's own dataset takes ``data.source``/``data.revision`` into account."""
    from icd.data.registry import DatasetSpec, RegistryFileError, UnknownDataset, get_dataset
    from icd.data.revisions import SCRIPT_FIX, repo_files, resolve_revision, script_only

    own = name is None or name == cfg.data.dataset
    name = name or cfg.data.dataset
    revision: str | None = None
    try:
        spec = get_dataset(name, cfg.data.registry)
        source = (cfg.data.source if own else None) or spec.source
        revision = (cfg.data.revision if own else None) or spec.revision
    except RegistryFileError as e:
        return Check("dataset", False, one_line(e))
    except UnknownDataset as e:
        if not own or cfg.data.source is None:
            return Check("dataset", False, one_line(e))
        source, revision = cfg.data.source, cfg.data.revision
    try:
        probe = DatasetSpec(name=name, source=source, split="x", label_column="l")
    except ValueError as e:
        return Check("dataset", False, str(e))
    kind, target = probe.kind, probe.target
    if kind != "hf":
        label = f"{name!r} ({source})"
        if kind == "fixture":
            return Check("dataset", True, f"{label}: built locally")
        if not glob.glob(os.path.expanduser(target)):
            return Check("dataset", False, f"{label}: {target} does not exist")
        return Check("dataset", True, f"{label}: found")
    from huggingface_hub.constants import HF_HUB_CACHE

    label = f"{name!r} ({source} @ {_revision_label(revision)})"
    if not _hub_reachable():
        cached = Path(HF_HUB_CACHE) / f"datasets--{target.replace('/', '--')}"
        if cached.is_dir():
            return Check("dataset", True, f"{label}: in the Hugging Face cache")
        return Check(
            "dataset", False, f"{label}: not in the Hugging Face cache, and " + _unreachable()
        )
    resolved = resolve_revision(target, revision, warn=False)
    label = f"{name!r} ({source} @ {_revision_label(revision, resolved.commit)})"
    if resolved.status == "unresolved":
        return Check("dataset", False, f"{label}: the hub does not serve it ({resolved.reason})")
    try:
        files = repo_files(target, resolved.effective)
    except Exception as e:
        return Check("dataset", False, f"{label}: cannot list its files ({one_line(e)})")
    if script_only(files):
        return Check(
            "dataset",
            False,
            f"{label}: a loading script, which datasets >= 4 refuses; {SCRIPT_FIX}",
        )
    return Check("dataset", True, f"{label}: the hub is reachable")


def run_checks(cfg: Config, preset: str | None = None) -> list[Check]:
    """Every check for ``cfg``, in display order; one ``dataset`` line per dataset of
    :func:`preset_datasets` (the config's, and for a shipped ``preset`` those of the
    benchmark suites built on it)."""
    roles = _roles(cfg)
    checks: list[Check] = []
    configs: dict[str, JSONObject | None] = {}  # each model's config.json
    model_checks = []
    for role, m in roles:
        c, data = check_model(role, m)
        model_checks.append(c)
        configs[role] = data
    checks.append(check_deps(roles, configs))
    checks += model_checks
    for role, m in roles:
        d = check_device(role, m)
        if d is not None:
            checks.append(d)
    cache = check_image_cache(cfg.models.student)
    if cache is not None:
        checks.append(cache)
    if cfg.method.mode != "student_zero_shot" and cfg.models.teacher.backend == "openai":
        checks += check_teacher_api(cfg.models.teacher)
    if cfg.models.student.backend == "openai":  # the same endpoint checks for a served student
        checks += check_teacher_api(cfg.models.student)
    checks.append(check_storage(cfg))
    checks += [check_dataset(cfg, name) for name in preset_datasets(cfg, preset)]
    return checks
