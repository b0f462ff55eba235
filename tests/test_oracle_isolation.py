"""`oracle_label` and `oracle_probability` (the true click probability it is drawn from) are evaluation
data: nothing that feeds training may read them.

Two guards: a static one (only allow-listed modules mention them) and a behavioural one (the
pipeline's outputs are identical when every oracle label and probability is flipped).
"""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from gpl_platform.data.stats import export_contract_dir
from gpl_platform.data.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
# Modules allowed to touch oracle labels: the contract and sources produce them, ingestion stores
# them apart, statistics/evaluation/benchmarks read them. Training code must never be listed here.
ALLOWED = {
    "gpl_platform/data/contract.py",
    "gpl_platform/data/sources/movielens.py",
    "gpl_platform/data/sources/simulator.py",
    "gpl_platform/data/ingestion.py",
    "gpl_platform/data/warehouse.py",
    "gpl_platform/data/stats.py",
    "gpl_platform/cli/main.py",
}
ALLOWED_PREFIXES = ("gpl_platform/evaluation", "bench/")
ORACLE_COLUMNS = ("oracle_label", "oracle_probability")
# Inside the evaluation, the code that trains the compared models is training code: never allowed.
TRAINING_PATH = ("gpl_platform/evaluation/method_runs.py", "gpl_platform/evaluation/tuning.py")
# Where a file was written and when are not content; a calibration's content is its version (hash of params + window).
AUDIT_COLUMNS = {
    "written_at",
    "created_at",
    "updated_at",
    "run_id",
    "fitted_at",
    "artifact_path",
    "calibration_json",
    "trained_at",
    "train_seconds",
}


def test_only_allowed_modules_mention_oracle_labels():
    offenders = []
    for path in sorted((ROOT / "gpl_platform").rglob("*.py")) + sorted((ROOT / "assets").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if (rel in ALLOWED or rel.startswith(ALLOWED_PREFIXES)) and rel not in TRAINING_PATH:
            continue
        if re.search("|".join(ORACLE_COLUMNS), path.read_text()):
            offenders.append(rel)
    assert not offenders, f"modules outside the allow-list read oracle labels: {offenders}"


def test_events_table_has_no_oracle_column(settings):
    from gpl_platform.data import ingestion
    from gpl_platform.data.sources import load_source
    from gpl_platform.data.warehouse import Warehouse

    ds = load_source(settings)
    wh = Warehouse(settings.warehouse)
    ingestion.ingest_event_days(wh, ds, sorted(set(ds.events["day"]))[:1], settings.source_signature())
    assert not set(ORACLE_COLUMNS) & set(wh.query("SELECT * FROM events LIMIT 0").columns)
    assert ds.events["oracle_probability"].notna().all()  # the simulator has it: ingestion stored it apart
    stored = wh.query("SELECT oracle_label, oracle_probability FROM oracle_labels")
    assert len(stored) and stored["oracle_probability"].between(0, 1).all()


def _training_inputs() -> list[str]:
    from assets.definitions import build_definitions

    return sorted(
        k.to_user_string()
        for k in build_definitions().resolve_all_asset_keys()
        if k.to_user_string() not in ("offline_evaluation", "prerank_model")
    )


def _table_digests(warehouse_path: Path) -> dict[str, str]:
    from gpl_platform.data.warehouse import Warehouse

    wh = Warehouse(warehouse_path)
    tables = wh.query("SELECT table_name FROM duckdb_tables() ORDER BY 1")["table_name"].tolist()
    digests = {}
    for table in tables:
        if table in ("oracle_labels", "warehouse_meta"):
            continue
        frame = wh.query(f'SELECT * FROM "{table}"')
        frame = frame.drop(columns=[c for c in frame.columns if c in AUDIT_COLUMNS])
        frame = frame.astype(str).sort_values(list(frame.columns)).reset_index(drop=True)
        digests[table] = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()
    return digests


@pytest.mark.slow
def test_pipeline_outputs_do_not_depend_on_oracle_labels(tmp_path, settings):
    """Materialize everything twice, the second time with every oracle label (and probability) flipped."""
    from assets.resources import GplSettings
    from assets.runner import run_pipeline
    from gpl_platform.data.sources import load_source

    TRAINING_INPUTS = _training_inputs()

    ds = load_source(settings)
    flipped = ds.events.copy()
    flipped["oracle_label"] = 1 - flipped["oracle_label"]
    flipped["oracle_probability"] = 1 - flipped["oracle_probability"]
    real_dir, flipped_dir = tmp_path / "real", tmp_path / "flipped"
    export_contract_dir(ds, real_dir)
    export_contract_dir(type(ds)(ds.name, ds.items, ds.users, flipped), flipped_dir)
    digests, scores = [], []
    for contract_dir in (real_dir, flipped_dir):
        gpl = GplSettings(
            source="contract",
            contract_path=str(contract_dir),
            data_dir=str(contract_dir / "data"),
            overrides_json='{"anchors": {"backend": "history"}, "calibration": {"min_samples": 50}, '
            '"training": {"test_share": 0.15, "valid_share": 0.15}}',
        )
        # Everything that feeds training (all but the evaluation itself, which reads oracle labels by design).
        assert run_pipeline(resources={"gpl": gpl}, ephemeral=True, selection=TRAINING_INPUTS).success
        digests.append(_table_digests(gpl.settings().warehouse))
        scores.append(_evaluation_scores(gpl.settings()))
    assert digests[0].keys() == digests[1].keys() and {"events", "pseudo_labels", "training_set"} <= digests[0].keys()
    assert digests[0] == digests[1]
    # The evaluation's own training path: every compared model scores the test days identically when every
    # oracle label is flipped (the labels only grade the scores).
    assert scores[0].keys() == scores[1].keys() and len(scores[0]) >= 5
    for run, values in scores[0].items():
        np.testing.assert_array_equal(values, scores[1][run], err_msg=str(run))


def _evaluation_scores(settings) -> dict:
    from gpl_platform.evaluation.offline import run_offline_evaluation
    from gpl_platform.features.store import FeastStore

    methods = ["exposed_only", "ips", "ranker_distillation", "gpl", "gpl_request_permuted"]
    report = run_offline_evaluation(
        Warehouse(settings.warehouse),
        FeastStore(settings),
        settings.training,
        "contract",
        methods,
        seeds=[0],
        progress=False,
    )
    return {(p, *run): values for p, runs in report["_details"]["scores"].items() for run, values in runs.items()}


CLI_MODULES = ("gpl_platform/cli/main.py", "gpl_platform/cli/bench.py")


def test_library_has_no_dagster_imports():
    """gpl_platform/ is plain library code; only the CLI reaches the Dagster layer, lazily, inside commands."""
    offenders = []
    for path in sorted((ROOT / "gpl_platform").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if re.match(r"(import dagster|from dagster)", stripped):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
            if re.match(r"from assets", stripped) and (
                not line.startswith("    ") or path.relative_to(ROOT).as_posix() not in CLI_MODULES
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders
