"""Calibration: monotone maps into [0, 1], versioned JSON artifacts, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpl_platform.pseudo_labels.calibration import Calibration, fit_calibration, load_calibration


def _data(n=2000, seed=0, slope=6.0):
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.2, 0.9, n)
    p = 1.0 / (1.0 + np.exp(-(slope * s - 3.0)))
    y = (rng.uniform(size=n) < p).astype(int)
    return s, y


META = {"train_window": ["2026-01-01", "2026-01-31"], "encoder_id": "all-MiniLM-L6-v2@abc"}


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_monotone_and_in_range(method):
    s, y = _data()
    cal = fit_calibration(s, y, method=method, metadata=META)
    grid = np.linspace(-2, 2, 2001)
    p = cal.predict(grid)
    assert p.shape == grid.shape
    assert (p >= 0).all() and (p <= 1).all()
    assert (np.diff(p) >= -1e-12).all()
    assert p[-1] > p[0]
    assert cal.n_train == s.size and cal.positive_rate == pytest.approx(y.mean())
    assert cal.fitted_on == META
    # calibrated: mean prediction close to the base rate on the training data
    assert cal.predict(s).mean() == pytest.approx(y.mean(), abs=0.02)
    assert np.isnan(cal.predict([np.nan, 0.3])[0])


def test_platt_recovers_the_generating_curve():
    s, y = _data(n=20000, seed=1)
    cal = fit_calibration(s, y, "platt", META)
    assert cal.a == pytest.approx(6.0, rel=0.15)
    assert cal.b == pytest.approx(-3.0, rel=0.15)


def test_platt_separable_data_is_finite():
    s = np.linspace(0, 1, 40)
    y = (s > 0.5).astype(int)
    cal = fit_calibration(s, y, "platt", {})
    assert np.isfinite([cal.a, cal.b]).all() and cal.a > 0
    assert cal.predict([0.0])[0] < 0.5 < cal.predict([1.0])[0]


def test_negative_slope_is_clamped_to_constant():
    s, y = _data(seed=2, slope=-6.0)
    cal = fit_calibration(s, y, "platt", {})
    assert cal.a == 0.0 and cal.notes
    p = cal.predict(np.linspace(-1, 1, 11))
    assert np.ptp(p) == 0.0


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_json_and_file_round_trip(tmp_path, method):
    s, y = _data(seed=3)
    cal = fit_calibration(s, y, method, META)
    again = Calibration.from_json(cal.to_json())
    assert again == cal and again.version == cal.version
    path = cal.save(tmp_path / "artifacts")
    assert path.name == f"calibration_{cal.version}.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    loaded = load_calibration(path)
    assert loaded.version == cal.version
    grid = np.linspace(-1, 1, 101)
    np.testing.assert_array_equal(loaded.predict(grid), cal.predict(grid))
    assert json.loads(path.read_text())["version"] == cal.version


def test_version_depends_on_params_method_and_metadata():
    s, y = _data(seed=4)
    a = fit_calibration(s, y, "platt", META)
    assert fit_calibration(s, y, "platt", META).version == a.version  # deterministic
    assert fit_calibration(s, y, "isotonic", META).version != a.version
    assert fit_calibration(s, y, "platt", {**META, "train_window": ["x", "y"]}).version != a.version
    assert fit_calibration(s[:1000], y[:1000], "platt", META).version != a.version


def test_tampered_artifact_is_refused(tmp_path):
    s, y = _data(seed=5)
    path = fit_calibration(s, y, "platt", META).save(tmp_path)
    d = json.loads(path.read_text())
    d["params"]["a"] = 123.0
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="version mismatch"):
        load_calibration(path)


def test_bad_input_errors():
    s, y = _data(n=100)
    with pytest.raises(ValueError, match="at least"):
        fit_calibration(s[:5], y[:5], "platt", {})
    with pytest.raises(ValueError, match="one class"):
        fit_calibration(s, np.zeros_like(y), "platt", {})
    with pytest.raises(ValueError, match="one class"):
        fit_calibration(s, np.ones_like(y), "isotonic", {})
    s_nan = s.copy()
    s_nan[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration(s_nan, y, "platt", {})
    with pytest.raises(ValueError, match="0/1"):
        fit_calibration(s, y * 2, "platt", {})
    with pytest.raises(ValueError, match="differ"):
        fit_calibration(s, y[:-1], "platt", {})
    with pytest.raises(ValueError, match="method"):
        fit_calibration(s, y, "beta", {})
    assert fit_calibration(s, y.astype(bool), "isotonic", {}).n_train == 100
