"""The tiny model fixtures: real architectures, local tokenizers, deterministic, cached."""

from __future__ import annotations

import hashlib
import json

import pytest

from icd.models.fixtures import (
    COLOURS,
    EMBEDDER,
    MARKER,
    NAMES,
    SHAPES,
    STUDENT,
    TEACHER,
    build_model_fixtures,
    fixtures_dir,
    resolve_model_path,
    trained_dir,
)


def _digest(folder, skip=(MARKER,)):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in skip
    }


def test_each_fixture_loads_through_from_pretrained(fixture_paths):
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    expected = {
        STUDENT: ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
        TEACHER: ("LlavaForConditionalGeneration", "LlavaProcessor"),
    }
    for name, (model_cls, proc_cls) in expected.items():
        model = AutoModelForImageTextToText.from_pretrained(fixture_paths[name])
        proc = AutoProcessor.from_pretrained(fixture_paths[name])
        assert type(model).__name__ == model_cls and type(proc).__name__ == proc_cls
        assert proc.chat_template
        assert model.generation_config.eos_token_id == proc.tokenizer.eos_token_id
        assert model.generation_config.pad_token_id == proc.tokenizer.pad_token_id
        assert model.num_parameters() < 1_000_000
    clip = AutoModel.from_pretrained(fixture_paths[EMBEDDER])
    assert type(clip).__name__ == "CLIPModel"
    assert type(AutoProcessor.from_pretrained(fixture_paths[EMBEDDER])).__name__ == "CLIPProcessor"


@pytest.mark.parametrize("name", NAMES)
def test_tokenizers_cover_the_shapes_vocabulary(fixture_paths, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_paths[name])
    for colour in COLOURS:
        for shape in SHAPES:
            label = f"{colour} {shape}"
            ids = tok(label, add_special_tokens=False)["input_ids"]
            assert len(ids) <= 4, (label, tok.convert_ids_to_tokens(ids))  # learned merges
            assert tok.decode(ids, skip_special_tokens=True).strip() == label
    assert tok.unk_token_id not in tok("What shape is shown? 0123456789 .,;:!?")["input_ids"][1:-1]


def test_special_tokens_are_single_tokens(fixture_paths):
    from transformers import AutoProcessor

    student = AutoProcessor.from_pretrained(fixture_paths[STUDENT]).tokenizer
    for t in ["<image>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>"]:
        assert len(student(t, add_special_tokens=False)["input_ids"]) == 1
    teacher = AutoProcessor.from_pretrained(fixture_paths[TEACHER]).tokenizer
    for t in ["<image>", "<|im_start|>", "<|im_end|>"]:
        assert len(teacher(t, add_special_tokens=False)["input_ids"]) == 1


def test_second_call_reuses_the_folders(untrained_paths):
    before = {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in untrained_paths.items()}
    again = build_model_fixtures(fixtures_dir() / "untrained")
    assert again == untrained_paths
    assert {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in again.items()} == before
    marker = json.loads((again[STUDENT] / MARKER).read_text())
    assert marker["seed"] == 0 and marker["version"] >= 1


def test_build_is_deterministic_from_the_seed(untrained_paths, tmp_path):
    rebuilt = build_model_fixtures(tmp_path / "a", seed=0)
    for name in NAMES:
        assert _digest(rebuilt[name]) == _digest(untrained_paths[name]), name
    other = build_model_fixtures(tmp_path / "b", seed=1, names=[EMBEDDER])
    assert (
        _digest(other[EMBEDDER])["model.safetensors"]
        != _digest(rebuilt[EMBEDDER])["model.safetensors"]
    )


def test_a_stale_marker_triggers_a_rebuild(tmp_path):
    [path] = build_model_fixtures(tmp_path, names=[EMBEDDER]).values()
    (path / MARKER).write_text(json.dumps({"name": EMBEDDER, "seed": 0, "version": 0}))
    (path / "model.safetensors").unlink()
    build_model_fixtures(tmp_path, names=[EMBEDDER])
    assert (path / "model.safetensors").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_model_ids_resolve_to_the_shipped_trained_models(tmp_path, monkeypatch):
    monkeypatch.setenv("ICD_FIXTURES", str(tmp_path))  # only datasets live there
    path = resolve_model_path(f"fixtures/{STUDENT}")
    assert path == trained_dir() / STUDENT and (path / "model.safetensors").is_file()
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert resolve_model_path("HuggingFaceTB/SmolVLM-256M-Instruct") is None
    with pytest.raises(ValueError, match="no fixture model 'nope'"):
        resolve_model_path("fixtures/nope")
