"""Similarity -> probability calibration (docs/METHOD.md step 3b), stored as a versioned artifact.

A ``Calibration`` is fitted on exposed candidates, where real click labels exist, and maps the
raw max-pooled similarity ``s(u,i)`` of an unexposed candidate to a pseudo-label probability
``y~(u,i)`` on the same scale as the real labels.

- ``platt``: ``p = 1 / (1 + exp(-(a*s + b)))`` fitted by logistic regression with Platt's
  smoothed targets (``(N+ + 1)/(N+ + 2)`` and ``1/(N- + 2)``), so separable data still gives a
  finite fit. If the fitted slope is negative (similarity anti-correlated with clicks), it is
  clamped to 0 and ``b`` set to the logit of the smoothed positive rate, so that ``predict`` stays
  monotone non-decreasing; this is recorded in ``notes``.
- ``isotonic``: scikit-learn ``IsotonicRegression(increasing=True, y_min=0, y_max=1)``; the
  fitted step thresholds ``x``/``y`` are stored and ``predict`` is ``np.interp`` on them (the same
  linear interpolation and end clipping sklearn applies), so loading needs no sklearn.

``predict`` returns values in [0, 1], monotone non-decreasing in the similarity; NaN in gives NaN
out (users without anchors). ``version`` is the first 12 hex of the sha256 of the canonical JSON
of ``method``, ``params``, and ``fitted_on``; ``save(dir)`` writes
``<dir>/calibration_<version>.json`` atomically and ``load(path)`` checks the version again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("platt", "isotonic")
FORMAT_VERSION = 1
DEFAULT_MIN_SAMPLES = 20


def _canonical(obj: Any) -> Any:
    """JSON-normalised copy (sorted keys; dates and other objects via str)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _compute_version(method: str, params: dict[str, Any], fitted_on: dict[str, Any]) -> str:
    payload = json.dumps(
        {"method": method, "params": params, "fitted_on": fitted_on}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Calibration:
    """A fitted similarity -> probability map. Build it with ``fit_calibration`` or ``load``."""

    method: str
    params: dict[str, Any]  # platt: {"a", "b"}; isotonic: {"x": [...], "y": [...]}
    n_train: int
    positive_rate: float
    fitted_on: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    created_at: str = ""

    @property
    def version(self) -> str:
        return _compute_version(self.method, self.params, self.fitted_on)

    # convenience accessors
    @property
    def a(self) -> float:
        return float(self.params["a"])

    @property
    def b(self) -> float:
        return float(self.params["b"])

    @property
    def x_thresholds(self) -> np.ndarray:
        return np.asarray(self.params["x"], dtype=np.float64)

    @property
    def y_thresholds(self) -> np.ndarray:
        return np.asarray(self.params["y"], dtype=np.float64)

    def predict(self, similarity) -> np.ndarray:
        """Probabilities (float64, same shape as ``similarity``) in [0, 1]; NaN stays NaN."""
        s = np.asarray(similarity, dtype=np.float64)
        if self.method == "platt":
            z = self.a * s + self.b
            out = np.empty_like(z)
            # numerically stable logistic
            pos = z >= 0
            out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
            ez = np.exp(z[~pos])
            out[~pos] = ez / (1.0 + ez)
            out[np.isnan(z)] = np.nan
            return np.clip(out, 0.0, 1.0)
        if self.method == "isotonic":
            out = np.interp(s, self.x_thresholds, self.y_thresholds)
            out = np.where(np.isnan(s), np.nan, out)
            return np.clip(out, 0.0, 1.0)
        raise ValueError(f"unknown calibration method {self.method!r}")

    __call__ = predict

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "method": self.method,
            "params": self.params,
            "n_train": self.n_train,
            "positive_rate": self.positive_rate,
            "fitted_on": self.fitted_on,
            "notes": list(self.notes),
            "created_at": self.created_at,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        try:
            method = d["method"]
            params = d["params"]
            cal = cls(
                method=method,
                params=_canonical(params),
                n_train=int(d["n_train"]),
                positive_rate=float(d["positive_rate"]),
                fitted_on=_canonical(d.get("fitted_on", {})),
                notes=tuple(d.get("notes", ())),
                created_at=str(d.get("created_at", "")),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a calibration artifact: {e!r}") from e
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        _check_params(method, cal.params)
        if "version" in d and d["version"] != cal.version:
            raise ValueError(f"calibration version mismatch: stored {d['version']}, recomputed {cal.version}")
        return cal

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/calibration_<version>.json`` atomically (temp file, fsync, os.replace)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"calibration_{self.version}.json"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return target

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def load_calibration(path: str | Path) -> Calibration:
    return Calibration.load(path)


def _check_params(method: str, params: dict[str, Any]) -> None:
    if method == "platt":
        if not {"a", "b"} <= set(params):
            raise ValueError("platt calibration needs params a and b")
        if not (np.isfinite(params["a"]) and np.isfinite(params["b"])) or params["a"] < 0:
            raise ValueError(f"bad platt params {params}")
    else:
        x = np.asarray(params.get("x", []), dtype=np.float64)
        y = np.asarray(params.get("y", []), dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError("isotonic calibration needs non-empty x and y of equal length")
        if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0) or y.min() < 0 or y.max() > 1:
            raise ValueError("isotonic thresholds must be non-decreasing with y in [0, 1]")


def _validate_training(similarity, labels, min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(similarity, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"similarity and labels must be 1-d, got {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"similarity ({s.size}) and labels ({y.size}) differ in length")
    if s.size < min_samples:
        raise ValueError(f"need at least {min_samples} samples to fit a calibration, got {s.size}")
    if not np.isfinite(s).all():
        raise ValueError(f"similarity has {int((~np.isfinite(s)).sum())} NaN/inf value(s)")
    if y.dtype == bool:
        y = y.astype(np.int64)
    yf = y.astype(np.float64)
    if np.isnan(yf).any():
        raise ValueError("labels contain NaN")
    if not np.isin(yf, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    n_pos = int(yf.sum())
    if n_pos == 0 or n_pos == yf.size:
        raise ValueError(f"labels have one class only ({'all positive' if n_pos else 'all negative'}); need both")
    return s, yf.astype(np.int64)


def _fit_platt(s: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], list[str]]:
    from sklearn.linear_model import LogisticRegression

    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    t_pos = (n_pos + 1.0) / (n_pos + 2.0)
    t_neg = 1.0 / (n_neg + 2.0)
    t = np.where(y == 1, t_pos, t_neg)
    # soft targets t as two weighted copies: label 1 with weight t, label 0 with weight 1 - t
    X = np.concatenate([s, s])[:, None]
    Y = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    W = np.concatenate([t, 1.0 - t])
    model = LogisticRegression(C=np.inf, max_iter=1000, tol=1e-8)
    model.fit(X, Y, sample_weight=W)
    a = float(model.coef_[0, 0])
    b = float(model.intercept_[0])
    notes: list[str] = []
    if a < 0:
        p = float(t.mean())
        notes.append(f"fitted slope {a:.6g} < 0 (similarity anti-correlated with labels): clamped to 0")
        a, b = 0.0, float(np.log(p / (1.0 - p)))
    return {"a": a, "b": b}, notes


def _fit_isotonic(s: np.ndarray, y: np.ndarray) -> tuple[dict[str, list[float]], list[str]]:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip")
    iso.fit(s, y.astype(np.float64))
    x = np.asarray(iso.X_thresholds_, dtype=np.float64)
    yy = np.clip(np.asarray(iso.y_thresholds_, dtype=np.float64), 0.0, 1.0)
    yy = np.maximum.accumulate(yy)  # guard against float noise
    notes = []
    if np.ptp(yy) == 0:
        notes.append("isotonic fit is constant: similarity does not order the labels")
    return {"x": x.tolist(), "y": yy.tolist()}, notes


def fit_calibration(
    similarity,
    labels,
    method: str = "platt",
    metadata: dict[str, Any] | None = None,
    *,
    min_samples: int = DEFAULT_MIN_SAMPLES,
) -> Calibration:
    """Fit a monotone map from similarity to P(label = 1).

    ``metadata`` (JSON-able; dates become strings) is stored as ``fitted_on``: say what it was
    fitted on, e.g. ``{"train_window": ["2026-01-01", "2026-01-31"], "encoder_id": ...,
    "anchor_kind": ...}``. It enters the ``version`` hash.

    Raises ``ValueError`` on: unknown method, fewer than ``min_samples`` samples, NaN/inf
    similarity, NaN or non-0/1 labels, a single class, mismatched shapes.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    s, y = _validate_training(similarity, labels, min_samples)
    params: dict[str, Any]
    notes: list[str]
    if method == "platt":
        params, notes = _fit_platt(s, y)
    else:
        params, notes = _fit_isotonic(s, y)
    return Calibration(
        method=method,
        params=_canonical(params),
        n_train=int(s.size),
        positive_rate=float(y.mean()),
        fitted_on=_canonical(metadata or {}),
        notes=tuple(notes),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
