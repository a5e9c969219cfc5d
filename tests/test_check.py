"""``icd check``: one line per check, exit code 0 only when every check passes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from icd.check import run_checks
from icd.cli import app
from icd.config import load_config
from icd.models.fixtures import EMBEDDER, STUDENT, TEACHER
from icd.models.serve import OpenAIServer

runner = CliRunner()
KEY_ENV = "ICD_CHECK_KEY"


@pytest.fixture(scope="module")
def paths():
    from icd.models.fixtures import build_model_fixtures, fixtures_dir

    return build_model_fixtures(fixtures_dir())


def _invoke(args: list[str]):
    return runner.invoke(app, ["check", *args], terminal_width=400)


def _lines(output: str) -> dict[str, str]:
    """check name -> the line's status and detail"""
    out = {}
    for line in output.strip().splitlines():
        status, rest = line.split(None, 1)
        name = rest[:16].strip()
        out[name] = f"{status} {rest[16:].strip()}"
    return out


def test_real_preset_offline_fails_with_one_clear_line_per_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    res = _invoke(["--preset", "smolvlm", "--set", f"storage.root={tmp_path / 'root'}"])
    assert res.exit_code == 1
    lines = _lines(res.stdout)
    for role, model in [
        ("student", "HuggingFaceTB/SmolVLM-256M-Instruct"),
        ("teacher", "Qwen/Qwen2.5-VL-7B-Instruct"),
        ("embedder", "google/siglip-base-patch16-224"),
    ]:
        assert lines[f"model {role}"].startswith(f"FAIL '{model}': ")
        assert "not in the Hugging Face cache, and the hub is unreachable" in lines[f"model {role}"]
        assert lines[f"device {role}"].startswith("FAIL 'cuda': CUDA is not available")
    assert lines["storage"].startswith("ok ")
    assert lines["dataset"].startswith("FAIL 'pets'")
    assert lines["deps"].startswith("FAIL missing torchvision (for teacher")
    assert "pip install 'icd[gpu]'" in lines["deps"]
    assert "checks failed" in res.stderr


def test_a_local_cpu_config_passes(paths, tmp_path):
    sets = [
        f"models.student.model_id={paths[STUDENT]}",
        f"models.teacher.model_id={paths[TEACHER]}",
        f"models.embedder.model_id={paths[EMBEDDER]}",
        f"storage.root={tmp_path}",
    ]
    res = _invoke(["--preset", "smoke", *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.stdout
    lines = _lines(res.stdout)
    assert all(v.startswith("ok ") for v in lines.values())
    assert {"deps", "model student", "device teacher", "storage", "dataset"} <= set(lines)


def test_the_image_cache_line_says_whether_the_student_gets_it(tmp_path):
    base = ["--preset", "smoke", "--set", f"storage.root={tmp_path}"]
    on = _lines(_invoke(base).stdout)["image cache"]
    assert on == "ok student: on, up to 4096 MB (Idefics3ImageProcessor, padded_crops layout)"
    off = _lines(_invoke([*base, "--set", "models.student.image_cache_mb=0"]).stdout)
    assert off["image cache"] == "ok student: off (image_cache_mb: 0)"
    folder = tmp_path / "llava-next"  # a checkpoint whose image processor has no known layout
    folder.mkdir()
    config = {"image_processor_type": "LlavaNextImageProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    other = _lines(_invoke([*base, "--set", f"models.student.model_id={folder}"]).stdout)
    assert "LlavaNextImageProcessor has no known batch layout" in other["image cache"]


def test_storage_dataset_and_missing_packages_fail(paths, tmp_path, monkeypatch):
    import icd.models.hf as hf

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config(
        "smoke",
        overrides=[
            f"models.student.model_id={paths[STUDENT]}",
            "models.student.device_map=auto",
            "data.source=parquet:/no/such/dir/*.parquet",
            "data.dataset=mine",
            f"storage.root={blocker / 'sub'}",
        ],
    )
    monkeypatch.setattr(hf, "has_module", lambda name: False)
    checks = {c.name: c for c in run_checks(cfg)}
    assert not checks["storage"].ok and "not writable" in checks["storage"].detail
    assert not checks["dataset"].ok and "does not exist" in checks["dataset"].detail
    assert not checks["deps"].ok and "accelerate (for student" in checks["deps"].detail


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(model=None, model_name="served-teacher", api_key="sk-right") as srv:
        yield srv


@pytest.mark.parametrize(
    ("key", "model", "ok", "needle"),
    [
        ("sk-right", "served-teacher", True, "answers; serves 'served-teacher'"),
        ("sk-wrong", "served-teacher", False, f"HTTP 401 — check {KEY_ENV}"),
        ("sk-right", "other-model", False, "model 'other-model' not served (served-teacher)"),
    ],
)
def test_teacher_endpoint(server, monkeypatch, tmp_path, key, model, ok, needle):
    monkeypatch.setenv(KEY_ENV, key)
    cfg = load_config(
        "smoke",
        values={
            "models": {
                "teacher": {
                    "backend": "openai",
                    "model_id": model,
                    "base_url": server.url,
                    "api_key_env": KEY_ENV,
                }
            }
        },
        overrides=[f"storage.root={tmp_path}"],
    )
    checks = {c.name: c for c in run_checks(cfg)}
    assert checks["teacher key"].ok
    assert checks["teacher api"].ok is ok and needle in checks["teacher api"].detail


def test_hosted_teacher_without_key_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = load_config("paper", overrides=[f"storage.root={tmp_path}"])
    checks = {c.name: c for c in run_checks(cfg)}
    assert (
        not checks["teacher key"].ok and "OPENAI_API_KEY is not set" in checks["teacher key"].detail
    )


def test_paper_preset_reports_each_dataset_source_revision_and_reachability(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from icd.config import PRESET_DIR, read_yaml
    from icd.data.registry import get_dataset

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    res = _invoke(["--preset", "paper", "--set", f"storage.root={tmp_path / 'root'}"])
    rows = [line for line in res.stdout.splitlines() if line.split()[1:2] == ["dataset"]]
    suite = read_yaml(PRESET_DIR / "benchmarks" / "paper.yaml")["datasets"]
    assert len(rows) == len(suite)  # one line each; the preset's own (cub200) is among them
    for name, row in zip(suite, rows, strict=True):
        spec = get_dataset(name)
        assert row.startswith(f"FAIL  dataset          {name!r} ({spec.source} @ ")
        if spec.revision is not None:
            assert f"@ {spec.revision[:12]} (pinned))" in row
        else:
            assert "@ main (unpinned; resolved at run start))" in row
        assert row.endswith("the hub is unreachable (HF_HUB_OFFLINE is set)")


def test_a_script_only_hub_dataset_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    import icd.check as check
    from icd.data import revisions

    class StandInHfApi:  # the Hub is unreachable here: answers as it does for a script repo
        def dataset_info(self, repo_id, *, revision=None, timeout=None, **kw):
            files = ["README.md", "birds.py"]
            return SimpleNamespace(
                sha="c" * 40, siblings=[SimpleNamespace(rfilename=f) for f in files]
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHfApi)
    monkeypatch.setattr(revisions, "hub_offline", lambda: False)
    monkeypatch.setattr(check, "_hub_reachable", lambda: True)
    sets = ["data.dataset=cub200", "data.source=null", f"storage.root={tmp_path}"]
    cfg = load_config("smoke", overrides=sets)
    (line,) = [c for c in run_checks(cfg) if c.name == "dataset"]
    assert not line.ok and "\n" not in line.detail
    assert "'cub200' (hf:bentrevett/caltech-ucsd-birds-200-2011 @ main -> cccccccccccc" in (
        line.detail
    )
    assert "loading script" in line.detail and "data.revision=refs/convert/parquet" in line.detail

    StandInHfApi.dataset_info = lambda self, repo_id, **kw: SimpleNamespace(  # type: ignore[method-assign]
        sha="c" * 40, siblings=[SimpleNamespace(rfilename="data/test-0.parquet")]
    )
    (line,) = [c for c in run_checks(cfg) if c.name == "dataset"]
    assert line.ok and line.detail.endswith("the hub is reachable")
