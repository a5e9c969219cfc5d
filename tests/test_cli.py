"""The `icd` command: help, config resolution, and one-line errors for user mistakes."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from icd.cli import app
from icd.config import ConfigError, load_config, presets

runner = CliRunner()


def test_help_documents_every_run_option() -> None:
    out = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert out.exit_code == 0
    for option in ("--preset", "--config", "--set", "--run-id", "--progress"):
        assert option in out.output


def test_every_preset_resolves() -> None:
    assert {"smoke", "smolvlm", "qwen7b", "paper"} <= set(presets())
    for name in presets():
        cfg = load_config(name)
        assert cfg.models.student.model_id


def test_config_file_then_overrides(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {"selection": {"k": 4}, "policy": {"budget": 0.2}}}))
    cfg = load_config("smoke", path, ["method.policy.budget=0.05", "data.limit=null"])
    assert cfg.method.selection.k == 4
    assert cfg.method.policy.budget == 0.05
    assert cfg.data.limit is None
    assert cfg.models.student.model_id == "fixtures/tiny-idefics3"  # from the preset


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--set", "method.kk=3"], "unknown config key 'method.kk'"),
        (["run", "--set", "method.policy.budget=2"], "method.policy.budget"),
        (["run", "--set", "method.selection.strategy=best"], "method.selection.strategy"),
        (
            ["run", "--set", "data.dataset=imagenet-9000", "--set", "data.source=null"],
            "unknown dataset 'imagenet-9000'",
        ),
        (["run", "--set", "models.student.model_id=fixtures/no-such-model"], "no-such-model"),
        (["run", "--set", "models.student.model_id=nobody/does-not-exist"], "does-not-exist"),
        (["run", "--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_user_mistakes_give_one_line_errors(args: list[str], needle: str) -> None:
    out = runner.invoke(app, args, terminal_width=200)
    assert out.exit_code == 2, out.output
    text = out.output.strip()
    assert needle in text
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'pipeline.chunk_size'"):
        load_config("smoke", overrides=["pipeline.chunk_size=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("smoke", overrides=["pipeline.chunk_size"])
