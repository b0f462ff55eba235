"""Settings as values (issue 33): a `gpl` command builds its Settings from the environment and its options and
passes them to the orchestration, which it finds through its entry point; it writes no setting into the
process environment, and it reads back the report the run says it wrote instead of guessing from file times."""

import importlib
import json
import os
import time
from types import SimpleNamespace

import pytest
from dagster import DailyPartitionsDefinition, Definitions, MaterializeResult, MetadataValue, asset
from typer.testing import CliRunner

from assets.resources import GplSettings
from gpl_platform.cli import interrupts, orchestration
from gpl_platform.cli.main import app
from gpl_platform.config import load_settings


class FakeRunner:
    """The orchestration as the CLI sees it: records the settings it is given; ``write`` makes a run write a
    report (file name) and return it, as offline_evaluation does."""

    LABELLING_ASSETS = ("item_catalog",)

    def __init__(self, write: str | None = None):
        self.write, self.calls = write, []

    def run_pipeline(self, start=None, end=None, *, selection=None, debug=False, settings=None):
        self.calls.append({"start": start, "end": end, "selection": selection, "settings": settings})
        reports = {}
        if self.write:
            path = settings.data_dir / "reports" / self.write
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"what": "exposed test clicks", "methods": {}}))
            path.with_suffix(".md").write_text("# report\n")
            reports["offline_evaluation"] = path
        return SimpleNamespace(
            success=True,
            runs=["r1"],
            seconds={"unpartitioned": 0.1},
            partition_range=("2024-01-01", "2024-01-05"),
            failed_checks=[],
            refused_days=[],
            reports=reports,
        )


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """The CLI in this process, against a fake orchestration (no signal handlers installed, an explicit
    Dagster instance folder)."""
    monkeypatch.setattr(interrupts, "install", lambda: None)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))

    def use(runner: FakeRunner) -> FakeRunner:
        monkeypatch.setattr(orchestration, "runner", lambda: runner)
        return runner

    return use


def test_gpl_run_passes_its_settings_as_a_value_and_writes_none_into_the_environment(fake, tmp_path, monkeypatch):
    runner = fake(FakeRunner())
    monkeypatch.setenv("GPL_SEED", "7")  # the user's environment still counts, under the command's options
    before = dict(os.environ)
    data_dir = tmp_path / "elsewhere"
    done = CliRunner().invoke(app, ["run", "--source", "simulator", "--data-dir", str(data_dir), "--select", "users"])
    assert done.exit_code == 0, done.output
    [call] = runner.calls
    settings = call["settings"]
    assert (settings.source, settings.data_dir, settings.seed) == ("simulator", data_dir.resolve(), 7)
    assert call["selection"] == ["users"]
    assert dict(os.environ) == before
    assert "No evaluation in this run" in done.output


def test_gpl_evaluate_reads_the_report_the_run_returned_not_the_newest_file(fake, tmp_path):
    """Without oracle labels the run writes logged_eval.json; an offline_eval.json touched meanwhile (another
    process, a clock) is not taken for it."""
    runner = fake(FakeRunner(write="logged_eval.json"))
    data_dir = tmp_path / "data"
    stale = data_dir / "reports" / "offline_eval.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    os.utime(stale, (time.time() + 60, time.time() + 60))
    out = tmp_path / "copy" / "mine.json"
    args = ["evaluate", "--source", "simulator", "--data-dir", str(data_dir), "--seed", "3", "--out", str(out)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert runner.calls[0]["settings"].training.seeds == [3]
    assert f"evaluation written to {out}" in done.output
    assert json.loads(out.read_text())["what"] == "exposed test clicks" and out.with_suffix(".md").exists()
    # a logged-data report has no results table for docs/RESULTS.md
    done = CliRunner().invoke(app, [*args, "--results-doc", str(tmp_path / "RESULTS.md")])
    assert done.exit_code == 2 and "needs oracle labels" in done.output


def test_the_cli_finds_the_orchestration_through_its_entry_point():
    assert orchestration.runner() is importlib.import_module("assets.runner")


def test_a_settings_value_becomes_the_run_resource_with_what_differs_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GPL_ANCHORS__OPENAI_API_KEY", "sk-from-the-environment")
    settings = load_settings(
        {"data_dir": tmp_path / "d", "training": {"seeds": [3]}, "contract": {"start_date": "2024-01-02"}}
    )
    gpl = GplSettings.from_settings(settings)
    assert gpl.settings() == settings
    changed = json.loads(gpl.overrides_json)
    assert set(changed) == {"data_dir", "warehouse_path", "training", "contract"}, changed
    assert changed["training"] == {"seeds": [3]} and changed["contract"] == {"start_date": "2024-01-02"}
    assert "sk-from" not in gpl.overrides_json  # the resource reads the secret from the environment
    other = settings.model_copy(
        update={"anchors": settings.anchors.model_copy(update={"openai_api_key": "sk-another"})}
    )
    with pytest.raises(ValueError, match="secret"):
        GplSettings.from_settings(other)


def test_run_pipeline_runs_with_the_settings_value_and_returns_the_reports_it_wrote(tmp_path):
    from assets.runner import run_pipeline

    @asset(partitions_def=DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-03"))
    def days() -> None:
        return None

    @asset
    def offline_evaluation(gpl: GplSettings) -> MaterializeResult:
        out = gpl.settings().data_dir / "reports" / "logged_eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")
        return MaterializeResult(metadata={"report_json": MetadataValue.path(str(out))})

    settings = load_settings({"data_dir": tmp_path / "value"})
    result = run_pipeline(
        settings=settings,
        ephemeral=True,
        selection=["offline_evaluation"],
        defs=Definitions(assets=[days, offline_evaluation], asset_checks=[]),
    )
    assert result.success
    assert result.reports == {"offline_evaluation": tmp_path / "value" / "reports" / "logged_eval.json"}
    with pytest.raises(ValueError, match="not both"):
        run_pipeline(settings=settings, resources={"gpl": GplSettings()}, ephemeral=True)
