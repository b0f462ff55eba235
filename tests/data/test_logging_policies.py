"""The exploration slice in the contract: logging policies named, refused when unknown, propensities
checked per policy (derived under a uniform policy), and the events gate judging the slice apart."""

from datetime import date

import numpy as np
import pandas as pd
import pytest

from gpl_platform.data.contract import ContractError, validate_dataset
from gpl_platform.data.policies import (
    LoggingPolicies,
    describe_slice,
    exploration_mask,
    not_served_by,
    slice_summary,
)
from gpl_platform.quality.suites import check_events
from gpl_platform.thresholds import EventThresholds
from tests.helpers import tiny_contract_tables


def _mixed_log() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """r1 served by production (no propensities), r2 by the uniform random policy (1 of 2 shown, no
    propensity given), r3 by a configured non-uniform exploration policy with propensities."""
    items, users, events = tiny_contract_tables()
    t = events["event_time"].iloc[-1]
    extra = pd.DataFrame(
        {
            "request_id": ["r3", "r3"],
            "user_id": ["u2", "u2"],
            "item_id": ["a", "b"],
            "event_time": [t, t],
            "exposed": [True, False],
            "clicked": pd.array([0, None], dtype="Int8"),
            "oracle_label": pd.array([0, 1], dtype="Int8"),
        }
    )
    events = pd.concat([events, extra], ignore_index=True)
    events["logging_policy"] = [None, None, None, "uniform_random", "uniform_random", "thompson", "thompson"]
    events["propensity"] = [None, None, None, None, None, 0.25, 0.75]
    return items, users, events


MIXED = LoggingPolicies(exploration=("uniform_random", "thompson"), uniform=("uniform_random",))


def test_a_log_mixing_policies_and_propensities_is_accepted_with_the_uniform_propensity_derived():
    items, users, events = _mixed_log()
    ds = validate_dataset("mixed", items, users, events, policies=MIXED)
    by_request = ds.events.set_index(["request_id", "item_id"])
    assert by_request["logging_policy"].tolist() == ["production"] * 3 + ["uniform_random"] * 2 + ["thompson"] * 2
    assert by_request["propensity"].iloc[:3].isna().all()  # production without propensities stays without
    assert by_request.loc[("r2", "a"), "propensity"] == pytest.approx(0.5)  # 1 of 2 candidates shown
    assert by_request.loc[("r3", "a"), "propensity"] == pytest.approx(0.25)  # given ones are kept
    assert exploration_mask(ds.events, MIXED).tolist() == [False] * 3 + [True] * 4
    summary = slice_summary(ds.events, MIXED)
    assert summary == {
        "rows": 4,
        "exposed_rows": 2,
        "requests": 2,
        "users": 2,
        "days": 1,
        "policies": {"production": 3, "thompson": 2, "uniform_random": 2},
    }
    assert "4 rows (2 shown) in 2 requests of 2 users over 1 days" in describe_slice(summary)


def test_unknown_policies_are_refused_by_name():
    items, users, events = _mixed_log()
    with pytest.raises(ContractError, match=r"logging_policy.*2 row\(s\).*not configured: 'thompson'"):
        validate_dataset("mixed", items, users, events)  # the default policies do not know 'thompson'


def test_a_request_served_by_two_policies_is_refused():
    items, users, events = _mixed_log()
    events.loc[4, "logging_policy"] = None
    with pytest.raises(ContractError, match="served by more than one policy"):
        validate_dataset("mixed", items, users, events, policies=MIXED)


def test_exploration_that_is_not_uniform_needs_propensities():
    items, users, events = _mixed_log()
    events.loc[[5, 6], "propensity"] = None
    with pytest.raises(ContractError, match="exploration policy that is not uniform"):
        validate_dataset(
            "mixed", items, users, events, policies=LoggingPolicies(exploration=("uniform_random", "thompson"))
        )


def test_within_one_policy_propensities_are_all_or_none():
    items, users, events = _mixed_log()
    events.loc[0, "propensity"] = 0.5  # one production row has one, the other exposed one (r1/b) not
    with pytest.raises(ContractError, match="other rows of their logging policy have one"):
        validate_dataset("mixed", items, users, events, policies=MIXED)


def test_a_log_without_the_column_or_all_exploration_validates():
    items, users, events = tiny_contract_tables()
    plain = validate_dataset("plain", items, users, events)
    assert set(plain.events["logging_policy"]) == {"production"} and not exploration_mask(plain.events, MIXED).any()
    everything = validate_dataset("all", items, users, events.assign(logging_policy="uniform_random"))
    assert exploration_mask(everything.events, MIXED).all()
    assert everything.events["propensity"].round(4).tolist() == [0.6667, 0.6667, 0.6667, 0.5, 0.5]


def test_policy_settings_are_checked():
    with pytest.raises(ValueError, match="both as exploration and as production"):
        LoggingPolicies(exploration=("production",))
    assert LoggingPolicies(exploration=("thompson",)).uniform == ()  # uniform_random is not exploring here
    assert not_served_by([]) == ""
    assert not_served_by(["a'b"]) == "AND coalesce(logging_policy, 'production') NOT IN ('a''b')"


def _day(n_requests: int, shown: int, policy: str | None, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_requests):
        for i in range(10):
            exposed = i < shown
            rows.append((f"{policy}{r}", f"u{r}", f"i{i}", exposed, int(rng.uniform() < 0.3) if exposed else None))
    frame = pd.DataFrame(rows, columns=["request_id", "user_id", "item_id", "exposed", "clicked"])
    frame["clicked"] = frame["clicked"].astype("Int8")
    frame["event_time"], frame["day"], frame["logging_policy"] = (
        pd.Timestamp("2024-01-01T10:00Z"),
        date(2024, 1, 1),
        policy,
    )
    return frame


def test_the_events_gate_judges_the_exploration_slice_against_its_own_bounds():
    # A day served wholly at random, every candidate shown: the production bounds (exposure <= 0.95) would
    # refuse it; the slice's own bounds accept it.
    all_random = _day(20, 10, "uniform_random", 0)
    result = check_events(all_random)
    assert result.passed, result.summary()
    assert {e.name for e in result.expectations} >= {"exploration_exposure_rate"}
    assert "exposure_rate" not in {e.name for e in result.expectations}
    assert result.metadata["exploration_rows"] == 200 and result.metadata["exploration_exposure_rate"] == 1.0
    assert not check_events(all_random.assign(logging_policy="production")).passed
    # Mixed: production's rate is its own rows' (2 of 10 shown), not diluted or raised by the slice
    mixed = pd.concat([_day(20, 2, "production", 1), all_random], ignore_index=True)
    result = check_events(mixed)
    assert result.passed and result.metadata["exposure_rate"] == pytest.approx(0.2)
    strict = EventThresholds(exploration_exposure_rate_max=0.5)
    assert "exploration_exposure_rate" in {e.name for e in check_events(mixed, strict).expectations if not e.passed}


def test_the_documented_example_directory_validates_with_its_slice():
    from pathlib import Path

    from gpl_platform.data.delivery import read_contract_dir
    from gpl_platform.data.policies import DEFAULT_POLICIES

    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "exploration_log"
    ds = read_contract_dir(example)
    summary = slice_summary(ds.events, DEFAULT_POLICIES)
    assert (summary["rows"], summary["exposed_rows"], summary["requests"], summary["days"]) == (7, 3, 2, 2)
    shown = ds.events[ds.events["logging_policy"].eq("uniform_random") & ds.events["exposed"]]
    assert sorted(shown["propensity"].round(4)) == [0.3333, 0.5, 0.5]  # derived: shown / candidates


def test_gpl_data_validate_explains_the_slice():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpl_platform.cli.main",
            "data",
            "validate",
            str(root / "docs/examples/exploration_log"),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "exploration slice: 7 rows (3 shown) in 2 requests of 2 users over 2 days" in done.stdout
