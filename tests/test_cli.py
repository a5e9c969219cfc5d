"""The `icd` command: help, config resolution, and one-line errors for user mistakes."""

from __future__ import annotations

from typing import Any

import pytest
import typer
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
        (["run", "--set", "method.budget=2"], "did you mean 'method.policy.budget'"),
        # the preset's source is the shapes data: it is not streamed under another name
        (["run", "--set", "data.dataset=mine"], "unknown dataset 'mine': give its data.source"),
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


def test_an_unregistered_dataset_keeps_only_a_source_of_its_own() -> None:
    assert load_config("smoke", overrides=["data.dataset=mine"]).data.source is None
    given = ["data.dataset=mine", "data.source=parquet:/d/*.parquet"]
    assert load_config("smoke", overrides=given).data.source == "parquet:/d/*.parquet"
    smoke = load_config("smoke").data.source  # a registered name reads the preset's source
    assert load_config("smoke", overrides=["data.dataset=shapes_captions"]).data.source == smoke


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'pipeline.chunk_size'"):
        load_config("smoke", overrides=["pipeline.chunk_size=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("smoke", overrides=["pipeline.chunk_size"])


def _command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group under ``group`` (a click-like group), as argument paths."""
    paths = [prefix]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            paths += _command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def _help(path: tuple[str, ...]) -> list[str]:
    out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert out.exit_code == 0, (path, out.output)
    return out.output.splitlines()


def test_every_help_text_flows_at_100_columns() -> None:
    """Each command's description reads as paragraphs filled to the width: no line ends
    where the next word would still have fitted, whatever the docstring's line breaks."""
    paths = _command_paths(typer.main.get_command(app))
    assert ("runs",) in paths and ("bench", "student") in paths
    for path in paths:
        lines = _help(path)
        assert max(len(line) for line in lines) <= 100, path
        start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
        end = next((i for i, line in enumerate(lines) if line.startswith("╭")), len(lines))
        prose = [line.strip() for line in lines[start:end]]
        for line, after in zip(prose, prose[1:], strict=False):
            if line and after:  # two lines of one paragraph
                fits = len(line) + 1 + len(after.split()[0]) <= 96
                assert not fits, f"icd {' '.join(path)}: ragged line {line!r}"


def test_command_lists_give_one_line_per_command() -> None:
    for group in [(), ("fixtures",), ("bench",), ("pool",)]:
        panel = _help(group)
        start = next(i for i, line in enumerate(panel) if "Commands" in line)
        rows = [line for line in panel[start + 1 :] if line.startswith("│")]
        assert rows and all(row[2] != " " for row in rows), "\n".join(rows)


def test_help_keeps_square_brackets() -> None:
    text = " ".join(_help(("reproduce",)))
    assert '"benchmark.datasets=[cub200,flowers102]"' in text


def test_where_lines_are_whole_at_any_width(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """The commands and paths after a run are never wrapped mid-token: each can be copied."""
    from rich.console import Console

    from icd import cli
    from icd.method.accounting import RunSummary

    console = Console(record=True, width=60, force_terminal=False)
    monkeypatch.setattr(cli, "console", console)
    run_dir = tmp_path / "a-rather-long-folder-name" / "runs" / "shapes-icd-20261206-055507-c2c4cd"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = RunSummary(run_id="shapes-icd-20261206-055507-c2c4cd", run_dir=str(run_dir))
    cli.print_where(summary, tracking_uri=uri)
    lines = console.export_text().splitlines()
    assert f"results: {run_dir}" in lines
    assert "report:  icd report shapes-icd-20261206-055507-c2c4cd" in lines
    assert any(line.endswith(f"--backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1")
               for line in lines)  # fmt: skip
    assert any(line.startswith("Prefect:") and "4200" in line for line in lines)


def test_the_headline_says_when_teacher_answers_were_reused() -> None:
    from rich.console import Console

    from icd.method.accounting import RunSummary
    from icd.report import print_headline

    console = Console(record=True, width=100, force_terminal=False)
    summary = {"run_id": "r", "mode": "icd", "accuracy": 0.5, "queried": 10, "accepted": 9,
               "annotation_rate": 0.1, "teacher_calls": 0}  # fmt: skip
    print_headline(RunSummary.from_json(summary), console=console)
    assert "answers reused (cache)" in console.export_text()
    print_headline(RunSummary.from_json({**summary, "teacher_calls": 50}), console=console)
    assert "50 answers generated" in console.export_text()
    print_headline(
        RunSummary.from_json({**summary, "teacher_calls": 0, "teacher_calls_reused": 35}),
        console=console,
    )
    assert "(10 queried, 9 pooled, 35 answers reused)" in console.export_text()
