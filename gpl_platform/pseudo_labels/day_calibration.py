"""GPL step 3b per UTC day: the calibration (similarity -> click probability) serving each day, fitted
on exposed candidates of earlier days on an every-N-days grid and stored, and the test of whether a
day's calibration carries any ranking."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from gpl_platform.config import CalibrationConfig
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.pseudo_labels.anchors.base import FALLBACK_EMPTY_HISTORY
from gpl_platform.pseudo_labels.calibration import Calibration, fit_calibration
from gpl_platform.pseudo_labels.stages import MAIN, POOLINGS, StageTables, require_days

log = logging.getLogger(__name__)
CALIBRATION_SEGMENTS = ("history", "no_history")


def refit_day(day: date, first_day: date, cfg: CalibrationConfig) -> date:
    """The refit day whose calibration serves ``day``: fits are made every N days and reused."""
    return first_day + timedelta(((day - first_day).days // cfg.refit_every_days) * cfg.refit_every_days)


def calibration_lookback_days(cfg: CalibrationConfig) -> int:
    """How many days before a day its calibration may read: the window before its refit day, which is up to
    ``refit_every_days - 1`` days before it (the orchestrator's dependency window)."""
    return cfg.window_days + cfg.refit_every_days - 1


def calibration_for_day(
    warehouse: Warehouse,
    day: date,
    first_day: date,
    cfg: CalibrationConfig,
    pooling: str,
    encoder_id: str,
    anchor_signature: str,
    artifacts_dir: Path,
    tables: StageTables = MAIN,
    segment: str = "history",
) -> Calibration | None:
    """The stored calibration serving ``day``, fitting it if needed on exposed candidates of
    [R - window, R), R being the refit day on the every-N-days grid (nothing of ``day`` or later
    is used). While the grid's fit lacks data (the first days), R = ``day`` itself is tried, so
    pseudo-labels start as soon as ``cfg.min_samples`` labelled exposed candidates exist.
    None when even that is not enough.

    ``segment`` says whose candidates it is fitted on: ``history`` (users with a history; the
    calibration of personalized labels) or ``no_history`` (users without one, matched to the generic
    anchor: the population label's own calibration)."""
    if segment not in CALIBRATION_SEGMENTS:
        raise ValueError(f"segment must be one of {CALIBRATION_SEGMENTS}, not {segment!r}")
    grid = refit_day(day, first_day, cfg)
    for refit in dict.fromkeys((grid, day)):
        calibration = _calibration_at(
            warehouse, refit, first_day, cfg, pooling, encoder_id, anchor_signature, artifacts_dir, tables, segment
        )
        if calibration is not None:
            return calibration
    return None


def _calibration_at(
    warehouse: Warehouse,
    refit: date,
    first_day: date,
    cfg: CalibrationConfig,
    pooling: str,
    encoder_id: str,
    anchor_signature: str,
    artifacts_dir: Path,
    tables: StageTables = MAIN,
    segment: str = "history",
) -> Calibration | None:
    start = max(first_day, refit - timedelta(cfg.window_days))
    fit_key = "|".join(
        [
            pooling,
            cfg.method,
            str(refit),
            str(cfg.window_days),
            str(cfg.min_samples),
            encoder_id,
            anchor_signature,
            f"max{cfg.max_samples}",
        ]
        + ([segment] if segment != "history" else [])
    )
    if warehouse.path.exists():
        stored = warehouse.query("SELECT calibration_json FROM calibrations WHERE fit_key = ?", [fit_key])
        if len(stored):
            return Calibration.from_json(stored["calibration_json"].iloc[0])
    window = [start + timedelta(n) for n in range((refit - start).days)]
    if not window:
        return None
    require_days(warehouse, tables.similarities, window, f"the calibration of refit day {refit}")
    column = f"similarity_{pooling}"
    # Candidates matched only to a generic anchor (a user without history) say nothing about how
    # similarity maps to clicks for users with one: fitting on them would flatten the calibration, so
    # each segment is fitted on its own candidates.
    same_segment = "IS DISTINCT FROM" if segment == "history" else "="
    # At most max_samples rows (a hash sample of the keys beyond it), sorted by value: the fit sees the same
    # rows in the same order whatever order the similarities were written in (by either engine).
    window_sql = (
        f"SELECT s.{column} AS similarity, e.clicked, s.day, s.request_id, s.item_id FROM {tables.similarities} s "
        "JOIN events e USING (day, request_id, item_id) "
        f"JOIN {tables.anchors} a ON a.day = s.day AND a.anchor_id = s.anchor_id "
        f"WHERE s.exposed AND s.day >= ? AND s.day < ? AND s.{column} IS NOT NULL AND s.anchor_signature = ? "
        f"AND s.encoder_id = ? AND a.fallback_reason {same_segment} ?"
    )
    params = [start, refit, anchor_signature, encoder_id, FALLBACK_EMPTY_HISTORY]
    with warehouse.connect(read_only=True) as con:
        available = con.execute(f"SELECT count(*) FROM ({window_sql})", params).fetchall()[0][0]
        train = con.execute(
            f"SELECT similarity, clicked FROM (SELECT * FROM ({window_sql}) ORDER BY hash(day, request_id, item_id), "
            "day, request_id, item_id LIMIT ?) ORDER BY similarity, clicked",
            [*params, cfg.max_samples],
        ).df()
    if len(train) < cfg.min_samples or train["clicked"].nunique() < 2:
        log.debug(  # per refit day: the asset's warning counts the days without one
            "no %s-pool %s calibration at refit day %s: %d labelled exposed candidates in %s..%s (< %d or one class)",
            pooling,
            segment,
            refit,
            len(train),
            start,
            refit - timedelta(1),
            cfg.min_samples,
        )
        return None
    metadata = {
        "pooling": pooling,
        "train_window": [str(start), str(refit - timedelta(1))],
        "encoder_id": encoder_id,
        "anchor_signature": anchor_signature,
    }
    if segment != "history":
        metadata["segment"] = segment
    if available > len(train):
        metadata["sampled_from"] = int(available)
    calibration = fit_calibration(
        train["similarity"].to_numpy(float),
        train["clicked"].to_numpy(int),
        method=cfg.method,
        metadata=metadata,
        min_samples=cfg.min_samples,
    )
    path = calibration.save(artifacts_dir / "calibration")
    with warehouse.transaction() as con:
        con.execute(
            "INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                fit_key,
                calibration.version,
                cfg.method,
                pooling,
                refit,
                start,
                refit - timedelta(1),
                calibration.n_train,
                calibration.positive_rate,
                str(path),
                calibration.to_json(),
            ],
        )
    log.debug(  # per refit day: the calibrations table and the asset's metadata keep them
        "fitted %s-pool %s calibration %s on %d exposed candidates of %s..%s",
        pooling,
        cfg.method,
        calibration.version,
        len(train),
        start,
        refit - timedelta(1),
    )
    return calibration


def calibration_degenerate(calibration: Calibration, labels: np.ndarray, min_label_std: float) -> str | None:
    """Why a day's labels from ``calibration`` carry no ranking (None when they do): a calibration
    that clamped an anti-correlated fit to a constant, or labels whose spread is below
    ``min_label_std`` (what the quality gate rejects as collapsed)."""
    return degenerate_reason(calibration, len(labels), float(np.std(labels)) if len(labels) else 0.0, min_label_std)


def degenerate_reason(calibration: Calibration, n_labels: int, spread: float, min_label_std: float) -> str | None:
    """:func:`calibration_degenerate` from the count and the (population) standard deviation of the labels."""
    if calibration.method == "platt" and calibration.a <= 0:
        return f"calibration {calibration.version} is constant (similarity does not rank clicks in its window)"
    if calibration.method == "isotonic" and np.ptp(calibration.y_thresholds) == 0:
        return f"calibration {calibration.version} is constant (similarity does not order clicks in its window)"
    if n_labels and spread < min_label_std:
        return f"labels from calibration {calibration.version} are near-constant (std {spread:.4f} < {min_label_std})"
    return None


def day_degenerate_reason(
    calibrations: dict[tuple[date, str, str], Calibration | None],
    day: date,
    spreads: dict[str, tuple[int, float]],
    min_label_std: float,
) -> str | None:
    """Why ``day``'s personalized labels carry no ranking in either pooling (None when both do). Training reads
    one pooling (``training.pseudo_label_pooling``, the ablations the other) and the quality gate judges both,
    so a day is dropped when either is degenerate. ``spreads``: per pooling, the count and population standard
    deviation of the day's labels of users with a history."""
    for pooling in POOLINGS:
        why = degenerate_reason(calibrations[(day, pooling, "history")], *spreads[pooling], min_label_std)
        if why:
            return f"{pooling}-pool {why}"
    return None


def day_calibrations(
    warehouse: Warehouse,
    days: Sequence[date],
    first_day: date,
    cfg: CalibrationConfig,
    encoder_id: str,
    signature: str,
    artifacts_dir: Path,
    tables: StageTables,
    segments: Sequence[str],
) -> tuple[dict[tuple[date, str, str], Calibration | None], list[date]]:
    """The calibration of every (day, pooling, segment), and the days labelled (both poolings calibrated)."""
    calibrations = {
        (d, pooling, segment): calibration_for_day(
            warehouse, d, first_day, cfg, pooling, encoder_id, signature, artifacts_dir, tables, segment
        )
        for d in days
        for pooling in POOLINGS
        for segment in segments
    }
    labelled = [
        d
        for d in days
        if calibrations[(d, "max", "history")] is not None and calibrations[(d, "mean", "history")] is not None
    ]
    return calibrations, labelled
