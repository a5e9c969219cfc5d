"""The benchmark flow: suite files, the matrix, and an end-to-end smoke benchmark checked
against MLflow and against the per-sample predictions of every child run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from icd.config import ConfigError, load_config
from icd.flows.benchmark import (
    BenchmarkConfig,
    Setting,
    expand,
    load_benchmark,
    suites,
)
from icd.method.modes import mode_spec
from tests.report import assert_png

try:
    import icd.flows.stream  # noqa: F401

    STREAM_MISSING = None
except Exception as e:  # the stream flow or one of its parts is not importable yet
    STREAM_MISSING = f"icd.flows.stream cannot be imported ({type(e).__name__}: {e})"

# ---------------------------------------------------------------------------- suites and matrix


def test_shipped_suites_load_and_resolve():
    assert {"smoke", "paper"} <= set(suites())
    for name in suites():
        suite = load_benchmark(name)
        for s in expand(suite):
            cfg = load_config(suite.base_preset, overrides=[*suite.overrides, *s.overrides()])
            assert cfg.method.mode == s.mode and cfg.data.dataset == s.dataset
            assert cfg.data.order_seed == s.seed
            if s.budget is not None:
                assert cfg.method.policy.budget == s.budget


def test_paper_suite_is_the_papers_setting():
    suite = load_benchmark("paper")
    cfg = load_config(suite.base_preset)
    assert cfg.models.student.model_id == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    assert cfg.models.teacher.backend == "openai"
    assert min(suite.budgets) == 0.04 and max(suite.budgets) == 0.15
    assert len(suite.seeds) >= 3
    modes = {v.mode for v in suite.variants()}
    assert modes == {
        "student_zero_shot",
        "teacher_zero_shot",
        "teacher_forward",
        "random_demos",
        "rices",
        "pool_vote",
        "icd",
    }
    oracle = [v for v in suite.variants() if "models.teacher.backend=oracle" in v.overrides]
    assert len(oracle) == 1 and oracle[0].mode == "icd"
    oracle_cfg = load_config(suite.base_preset, overrides=[*oracle[0].overrides])
    assert oracle_cfg.models.teacher.backend == "oracle"


def test_expand_runs_budget_free_modes_once():
    suite = BenchmarkConfig(
        name="t",
        datasets=["shapes"],
        modes=["student_zero_shot", "teacher_zero_shot", "icd", "teacher_forward"],
        budgets=[0.05, 0.1],
        seeds=[0, 1],
    )
    settings = expand(suite)
    assert not mode_spec("student_zero_shot").uses_budget
    assert not mode_spec("teacher_zero_shot").uses_budget
    assert mode_spec("icd").uses_budget and mode_spec("teacher_forward").uses_budget
    assert len(settings) == 2 * 2 + 2 * 2 * 2  # budget-free: once per seed
    assert {s.budget for s in settings if s.mode.endswith("zero_shot")} == {None}
    assert len({s.run_id("b") for s in settings}) == len(settings)
    zs = next(s for s in settings if s.mode == "student_zero_shot")
    assert not any(o.startswith("method.policy.budget") for o in zs.overrides())


def test_variant_overrides_come_first_and_coordinates_win():
    s = Setting(
        "shapes",
        "icd_oracle",
        "icd",
        0.1,
        2,
        ("models.teacher.backend=oracle", "method.mode=rices"),
    )
    cfg = load_config("smoke", overrides=s.overrides())
    assert cfg.models.teacher.backend == "oracle"
    assert cfg.method.mode == "icd"  # the matrix coordinate is applied last
    assert s.run_id("bench") == "bench--shapes--icd_oracle--b0.1--s2"


def test_suite_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown benchmark suite 'nope'"):
        load_benchmark("nope")
    with pytest.raises(ConfigError, match="unknown benchmark key 'colour'"):
        load_benchmark("smoke", ["colour=1"])
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet9'"):
        load_benchmark("smoke", ["datasets=[imagenet9]"])
    with pytest.raises(ConfigError, match="budgets"):
        load_benchmark("smoke", ["budgets=[1.5]"])
    with pytest.raises(ConfigError, match="duplicate budget"):
        load_benchmark("smoke", ["budgets=[0.1, 0.1]"])
    with pytest.raises(ConfigError, match="modes"):
        load_benchmark("smoke", ["modes=[fancy]"])


def test_suite_from_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndatasets: [shapes]\nmodes: [icd]\nbudgets: [0.2]\nlimit: 8\n")
    suite = load_benchmark(str(path), ["seeds=[3, 4]"])
    assert (suite.name, suite.limit, suite.seeds) == ("mine", 8, [3, 4])


# ---------------------------------------------------------------------------- end to end

BUDGETS = (0.1, 0.25)


@pytest.fixture(scope="module")
def smoke_benchmark(tmp_path_factory):
    """The smoke suite (student zero-shot and ICD × budgets 0.1, 0.25) over 64 samples."""
    from icd.flows.benchmark import benchmark

    root = tmp_path_factory.mktemp("bench")
    result = benchmark(
        suite="smoke",
        overrides=[f"storage.root={root}", "pipeline.chunk_size=32", "benchmark.limit=64",
                   "benchmark.seeds=[0]",
                   f"benchmark.budgets={list(BUDGETS)}", "benchmark.modes=[student_zero_shot, icd]"],
        benchmark_id="smoke-test",
    )  # fmt: skip
    return root, result


def _predictions(run_dir: Path) -> pl.DataFrame:
    files = sorted((run_dir / "predictions").glob("chunk-*.parquet"))
    assert files, f"no predictions in {run_dir}"
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


@pytest.mark.slow
@pytest.mark.skipif(STREAM_MISSING is not None, reason=STREAM_MISSING or "")
def test_benchmark_parent_and_child_mlflow_runs(smoke_benchmark):
    from mlflow import MlflowClient

    root, result = smoke_benchmark
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(result["parent_mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["icd.benchmark"] == "smoke"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    # student zero-shot once (budget-free), ICD once per budget
    assert len(children) == 1 + len(BUDGETS) == len(result["children"])
    assert {c.info.run_id for c in children} == {c["mlflow_run_id"] for c in result["children"]}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        listed = {a.path for a in client.list_artifacts(child.info.run_id, "report")}
        assert {"report/running.png", "report/uncertainty.png", "report/agreement.png"} <= listed
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.parquet", "comparison.md", "runs.parquet", "benchmark.json"} <= parent_files
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/report.html",
        "report/accuracy_vs_annotation.png",
        "report/running_shapes.png",
    } <= report_files
    # per setting, mean (and std with several orders) over stream orders, final values
    # rounded, never a series over orders; the suite's counts are tags, not metrics
    assert {"runs", "failed_runs", "settings"}.isdisjoint(parent.data.metrics)
    assert parent.data.tags["icd.runs"] == str(len(children))
    means = {k: v for k, v in parent.data.metrics.items() if k.endswith(".accuracy_mean")}
    assert "shapes.icd.b0.1.accuracy_mean" in means and len(means) == 1 + len(BUDGETS)
    for key, value in parent.data.metrics.items():
        assert value == round(value, 4)
        history = client.get_metric_history(parent.info.run_id, key)
        assert [m.step for m in history] == [0], key
    note = parent.data.tags["mlflow.note.content"]
    assert "smoke-test" in note and "comparison.md" in note
    assert "accuracy_vs_annotation.png" in note


@pytest.mark.slow
@pytest.mark.skipif(STREAM_MISSING is not None, reason=STREAM_MISSING or "")
def test_benchmark_comparison_table_and_plots(smoke_benchmark):
    root, result = smoke_benchmark
    table = pl.read_parquet(result["table"])
    assert table.select("dataset", "variant", "budget").rows() == [
        ("shapes", "student_zero_shot", None),
        ("shapes", "icd", 0.1),
        ("shapes", "icd", 0.25),
    ]
    for col in ("mode", "seeds", "samples", "accuracy_mean", "accuracy_std", "annotation_rate_mean",
                "annotation_rate_std", "teacher_calls_mean", "pool_size_mean", "mean_agreement_mean"):  # fmt: skip
        assert col in table.columns, col
    assert table.get_column("seeds").to_list() == [1, 1, 1]
    md = Path(result["markdown_path"]).read_text()
    assert md == result["markdown"] and md.count("\n") == 2 + table.height
    assert Path(result["report"]).is_file() and result["report"].endswith(".html")
    assert set(result["plots"]) == {
        "accuracy_vs_annotation",
        "accuracy_vs_compute",
        "running_shapes",
    }
    # ICD's student passes carry demos: more compute than the student's zero-shot pass.
    flops = dict(zip(table["budget"], table["compute_flops_mean"], strict=True))
    assert flops[0.1] > flops[None] > 0
    pngs = [Path(p) for p in result["plots"].values()]
    for child in result["children"]:
        pngs += sorted((Path(child["run_dir"]) / "report").glob("*.png"))
    assert len(pngs) == 3 + 5 * len(result["children"])  # running, uncertainty, agreement,
    # headline and headline_bars per run
    for p in pngs:
        assert_png(p)


@pytest.mark.slow
@pytest.mark.skipif(STREAM_MISSING is not None, reason=STREAM_MISSING or "")
def test_benchmark_numbers_match_the_predictions(smoke_benchmark):
    """Second-level check: every number in the tables, recomputed from the per-sample
    predictions parquet of each child run."""
    root, result = smoke_benchmark
    runs = pl.read_parquet(result["runs_table"])
    table = pl.read_parquet(result["table"])
    assert runs.height == len(result["children"])
    for run in runs.iter_rows(named=True):
        preds = _predictions(Path(run["run_dir"]))
        assert preds.get_column("run_id").unique().to_list() == [run["run_id"]]
        valid = preds.filter(pl.col("skip_reason").is_null())
        queried = valid.filter(pl.col("queried"))
        scored = preds.get_column("score").drop_nulls()
        expect = {
            "samples": preds.height,
            "skipped": preds.height - valid.height,
            "accuracy": scored.mean(),
            "annotation_rate": queried.height / valid.height,
            "queried": queried.height,
            "accepted": valid.get_column("accepted").sum(),
            "pool_size": valid.get_column("accepted").sum()
            if run["mode"] != "student_zero_shot"
            else 0,
        }
        assert preds.height == 64
        for key, value in expect.items():
            assert run[key] == pytest.approx(value), (run["run_id"], key)
        if run["mode"] == "student_zero_shot":
            assert run["queried"] == 0 and run["pool_size"] == 0
        else:
            assert run["annotation_rate"] <= run["budget"] + 1e-9
            agreement = queried.get_column("agreement").drop_nulls()
            if agreement.len():
                assert run["mean_agreement"] == pytest.approx(agreement.mean())
        row = table.filter(
            (pl.col("variant") == run["variant"])
            & (
                pl.col("budget").is_null()
                if run["budget"] is None
                else pl.col("budget") == run["budget"]
            )
        ).row(0, named=True)
        for key in ("accuracy", "annotation_rate", "queried", "accepted", "pool_size"):
            assert row[f"{key}_mean"] == pytest.approx(expect[key]), (run["run_id"], key)


@pytest.mark.slow
@pytest.mark.skipif(STREAM_MISSING is not None, reason=STREAM_MISSING or "")
def test_benchmark_rejects_a_bad_cell_before_running_anything(tmp_path):
    """A variant override that no config accepts fails the flow at once: no run, no folder."""
    from icd.flows.benchmark import benchmark

    suite = tmp_path / "bad.yaml"
    suite.write_text(
        "name: bad\ndatasets: [shapes]\nbudgets: [0.1]\nlimit: 8\n"
        "modes: [student_zero_shot, {name: broken, mode: icd, overrides: [method.voting.n=0]}]\n"
    )
    root = tmp_path / "root"
    with pytest.raises(ConfigError, match="method.voting.n"):
        benchmark(suite=str(suite), overrides=[f"storage.root={root}"])
    assert not (root / "runs").exists() and not (root / "benchmarks").exists()


def test_sweep_expands_every_mode_at_every_value():
    suite = load_benchmark("sweep-k")
    names = [v.name for v in suite.variants()]
    assert names[:2] == ["icd-k_0", "icd-k_1"] and len(names) == 2 * 6
    assert suite.variants()[1].overrides == ["method.selection.k=1"]
    assert suite.sweep_points()["pool_vote-k_8"] == ("pool_vote", 8)


@pytest.mark.slow
@pytest.mark.skipif(STREAM_MISSING is not None, reason=STREAM_MISSING or "")
def test_a_sweep_suite_runs_and_plots_its_metrics_against_the_value(tmp_path):
    from icd.flows.benchmark import benchmark

    suite = tmp_path / "sweep.yaml"
    suite.write_text(
        "name: k-sweep\nbase_preset: smoke\ndatasets: [shapes]\nmodes: [icd]\n"
        "budgets: [0.15]\nlimit: 64\n"
        "sweep: {key: method.selection.k, values: [0, 2], "
        "metrics: [accuracy, icl_prompt_tokens_mean]}\n"
    )
    result = benchmark(
        suite=str(suite),
        overrides=[f"storage.root={tmp_path}", "pipeline.chunk_size=32"],
        benchmark_id="sweep-test",
    )
    assert_png(result["plots"]["sweep"])
    table = pl.read_parquet(result["table"])
    tokens = dict(zip(table["variant"], table["icl_prompt_tokens_mean_mean"], strict=True))
    # k=0: the ICL pass has no demos, so its prompt is the zero-shot one; k=2 adds two turns.
    assert tokens["icd-k_2"] > tokens["icd-k_0"] > 0


def test_fanning_out_without_a_server_is_a_one_line_error(tmp_path, monkeypatch):
    """`benchmark.executor=deployments` needs a Prefect server with the stream deployment:
    without one the command says so in one line, before running or writing anything."""
    from typer.testing import CliRunner

    from icd.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    root = tmp_path / "root"
    out = CliRunner().invoke(
        app,
        ["benchmark", "smoke", "--set", "benchmark.executor=deployments",
         "--set", f"storage.root={root}"],
    )  # fmt: skip
    assert out.exit_code == 2
    assert "needs a Prefect server" in out.output and "PREFECT_API_URL" in out.output
    assert "Traceback" not in out.output
    assert not (root / "benchmarks").exists()


@pytest.mark.slow
@pytest.mark.skipif(STREAM_MISSING is not None, reason=STREAM_MISSING or "")
def test_icd_report_of_a_benchmark_is_readable_at_100_columns(smoke_benchmark, monkeypatch):
    """`icd report BENCHMARK` prints the compact table `icd benchmark` prints: whole mode
    names, no cell cut to "…", within 100 columns; -v every column."""
    from rich.console import Console
    from typer.testing import CliRunner

    from icd import cli

    root, _ = smoke_benchmark

    def invoke(*args: str) -> str:
        console = Console(record=True, width=100, force_terminal=False)
        monkeypatch.setattr(cli, "console", console)
        out = CliRunner().invoke(cli.app, ["report", "smoke-test", "--root", str(root), *args])
        assert out.exit_code == 0, out.output
        return console.export_text()

    text = invoke()
    table = [line for line in text.splitlines() if not line.startswith(("report:", "plot:"))]
    assert max(map(len, table)) <= 100  # the paths are whole, to be copied
    assert "student_zero_shot" in text and "…" not in text
    assert "mean ± std over orders" in text and "every number: add -v" in text
    assert "pool" not in "\n".join(table)
    assert "pool precision" in invoke("-v")  # -v: every column, whole
