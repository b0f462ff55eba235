"""GPL steps 1-4 per UTC day, over the warehouse (GPL_METHOD.md):

user histories -> interest anchors -> anchor embeddings -> candidate similarities (max/mean over
the user's anchors) -> calibration fitted on exposed candidates of earlier days -> pseudo-labels with
uncertainty-aware confidence. Every function takes a list of days and replaces those partitions in
one transaction; anything for day D reads only data of days before D (histories, calibration
windows) or the day's own candidates (which are what gets labelled).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.anchors.base import ANCHOR_COLUMNS, FALLBACK_EMPTY_HISTORY, AnchorGenerator, UserHistory
from gpl_platform.calibration import Calibration, fit_calibration
from gpl_platform.config import CalibrationConfig, ConfidenceConfig
from gpl_platform.confidence import anchor_coherence, confidence_weights, generation_confidence, history_consistency
from gpl_platform.embeddings import encode_deduplicated, load_item_embeddings
from gpl_platform.ingest import MissingUpstreamDays
from gpl_platform.scoring import score_candidates
from gpl_platform.vectors import frame_with_vectors, read_vectors
from gpl_platform.warehouse import Warehouse

log = logging.getLogger(__name__)
POOLINGS = ("max", "mean")
CALIBRATION_SEGMENTS = ("history", "no_history")
NO_HISTORY_RULES = ("none", "population")
STAGE_TABLES = ("user_anchors", "anchor_embeddings", "candidate_similarities", "pseudo_labels")


@dataclass(frozen=True)
class StageTables:
    """Where a variant of the GPL stages writes. ``main`` is the configured generator; an ablation
    variant (e.g. ``history`` anchors) gets tables of the same schema with a suffix."""

    variant: str = "main"

    def __post_init__(self) -> None:
        if not self.variant.isidentifier():
            raise ValueError(f"variant {self.variant!r} must be an identifier")

    def name(self, base: str) -> str:
        return base if self.variant == "main" else f"{base}__{self.variant}"

    @property
    def anchors(self) -> str:
        return self.name("user_anchors")

    @property
    def embeddings(self) -> str:
        return self.name("anchor_embeddings")

    @property
    def similarities(self) -> str:
        return self.name("candidate_similarities")

    @property
    def labels(self) -> str:
        return self.name("pseudo_labels")

    def ensure(self, warehouse: Warehouse) -> None:
        if self.variant == "main":
            return
        with warehouse.transaction() as con:
            for base in STAGE_TABLES:
                con.execute(f'CREATE TABLE IF NOT EXISTS "{self.name(base)}" AS SELECT * FROM "{base}" WHERE false')


MAIN = StageTables()


def _days_param(days: Sequence[date]) -> pd.DataFrame:
    return pd.DataFrame({"day": pd.to_datetime(pd.Series(sorted(set(days)), dtype="object"))})


def _as_date(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series).dt.date


def require_days(warehouse: Warehouse, table: str, days: Sequence[date], purpose: str) -> None:
    missing = sorted(set(days) - warehouse.written_days(table))
    if missing:
        raise MissingUpstreamDays(
            f"{purpose} needs `{table}` for {len(missing)} day(s) that are not materialized "
            f"(first: {missing[0]}, last: {missing[-1]}). Materialize {table} for those partitions first.")


# ---- step 1: anchors --------------------------------------------------------------------------

def load_histories(warehouse: Warehouse, days: Sequence[date], max_items: int) -> pd.DataFrame:
    """(day, user_id, history: UserHistory) for users with a request on each day."""
    require_days(warehouse, "user_histories", days, "anchor generation")
    with warehouse.connect(read_only=True) as con:
        con.register("_days", _days_param(days))
        frame = con.execute("SELECT day, user_id, history_item_ids FROM user_histories "
                            "WHERE day IN (SELECT CAST(day AS DATE) FROM _days) ORDER BY day, user_id").df()
        texts = dict(con.execute("SELECT item_id, text FROM items").fetchall())
    frame["day"] = _as_date(frame["day"])
    frame["history"] = [
        UserHistory(user, tuple(ids[:max_items]), tuple(texts[i] for i in ids[:max_items]))
        for user, ids in zip(frame["user_id"], frame["history_item_ids"].map(list))
    ]
    return frame.drop(columns=["history_item_ids"])


def anchors_for_days(warehouse: Warehouse, days: Sequence[date], generator: AnchorGenerator, k: int,
                     history_max_items: int, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Anchors of every (day, user) with a request, keyed by ``day``, ``user_id`` and ``cache_key``, with
    the ``model_id`` that made them: each distinct history is generated once per serving model (one
    for most backends; one per refit period for ``sid``), and a history seen in an earlier run is a
    cache hit."""
    from gpl_platform.anchors.cache import cache_key, generate_with_cache

    histories = load_histories(warehouse, days, history_max_items)
    serving = {d: generator.for_day(d) for d in sorted(set(histories["day"]))}
    histories["model_id"] = histories["day"].map(lambda d: serving[d].model_id)
    parts, stats = [], Counter()
    for model_id, group in histories.groupby("model_id", sort=False):
        model = serving[group["day"].iloc[0]]
        signature = model.cache_signature()
        group = group.assign(cache_key=[cache_key(h, signature, k) for h in group["history"]])
        unique = group.drop_duplicates("cache_key")
        with warehouse.connect() as con:
            anchors, part_stats = generate_with_cache(con, model, list(unique["history"]), k, progress=progress)
        stats.update(part_stats)
        stats["distinct_histories"] += len(unique)
        parts.append(anchors.drop(columns=["user_id"]).merge(group[["day", "user_id", "cache_key", "model_id"]],
                                                             on="cache_key"))
    anchors = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["cache_key", *ANCHOR_COLUMNS, "day", "model_id"])
    stats = dict(stats)
    stats.update(user_days=len(histories), anchors=len(anchors), serving_models=histories["model_id"].nunique())
    return anchors, stats


def generate_anchors(warehouse: Warehouse, days: Sequence[date], generator: AnchorGenerator, k: int,
                     history_max_items: int, progress: bool = True, run_id: str | None = None,
                     tables: StageTables = MAIN) -> tuple[pd.DataFrame, dict]:
    """Anchors for every (day, user) with a request, written to the anchors table of ``tables``."""
    days = sorted(set(days))
    anchors, stats = anchors_for_days(warehouse, days, generator, k, history_max_items, progress)
    anchors["anchor_id"] = anchors["cache_key"].str[:16] + "-" + anchors["anchor_rank"].astype(str)
    anchors["backend"] = generator.backend
    anchors["prompt_version"], anchors["anchor_signature"] = generator.prompt_version, generator.lineage_signature()
    anchors = anchors.sort_values(["day", "user_id", "anchor_rank"], ignore_index=True)
    tables.ensure(warehouse)
    with warehouse.transaction() as con:
        warehouse.replace_partitions(tables.anchors, anchors, days, con, run_id)
    return anchors, stats


# ---- step 2: anchor embeddings ----------------------------------------------------------------

def embed_anchors(warehouse: Warehouse, days: Sequence[date], encoder, progress: bool = False,
                  run_id: str | None = None, tables: StageTables = MAIN,
                  generator: AnchorGenerator | None = None) -> dict:
    """Anchor vectors in the encoder's space: encoded texts, or, when ``generator`` says how
    (semantic-ID anchors), vectors it derives from what the anchor names."""
    days = sorted(set(days))
    require_days(warehouse, tables.anchors, days, "anchor embedding")
    anchors = warehouse.query(
        f"SELECT day, anchor_id, user_id, anchor_text FROM {tables.anchors} WHERE day BETWEEN ? AND ? "
        "ORDER BY day, user_id, anchor_rank", [days[0], days[-1]])
    anchors["day"] = _as_date(anchors["day"])
    anchors = anchors[anchors["day"].isin(days)].reset_index(drop=True)
    if generator is not None:
        vectors = generator.anchor_vectors(anchors["anchor_text"].tolist(), encoder)
    else:
        vectors = encode_deduplicated(encoder, anchors["anchor_text"].tolist(), progress=progress)
    frame = anchors[["day", "anchor_id", "user_id"]].assign(encoder_id=encoder.encoder_id)
    table = frame_with_vectors(frame, vectors)
    with warehouse.transaction() as con:
        warehouse.replace_partitions(tables.embeddings, table, days, con, run_id)
    return {"anchors": len(anchors), "distinct_texts": int(anchors["anchor_text"].nunique()),
            "encoder_id": encoder.encoder_id,
            "dim": int(encoder.dim)}


# ---- step 3: similarities ---------------------------------------------------------------------

@dataclass
class DayAnchors:
    """Anchors of a set of days with their vectors; a "user" is a (day, user_id) pair."""

    meta: pd.DataFrame  # day, user_id, anchor_id, gen_prob, is_fallback, fallback_reason, anchor_signature
    vectors: np.ndarray
    user_index: pd.MultiIndex  # (day, user_id) -> position

    def user_idx_of(self, day: pd.Series, user: pd.Series) -> np.ndarray:
        return self.user_index.get_indexer(pd.MultiIndex.from_arrays([day, user]))


def load_day_anchors(warehouse: Warehouse, days: Sequence[date], encoder_id: str, anchor_signature: str,
                     tables: StageTables = MAIN) -> DayAnchors:
    days = sorted(set(days))
    require_days(warehouse, tables.embeddings, days, "pseudo-labelling")
    with warehouse.connect(read_only=True) as con:
        con.register("_days", _days_param(days))
        meta, vectors = read_vectors(con, f"""
            SELECT e.day, e.user_id, e.anchor_id, e.encoder_id, a.gen_prob, a.is_fallback, a.fallback_reason,
                   a.anchor_signature, a.model_id, e.vector
            FROM {tables.embeddings} e JOIN {tables.anchors} a USING (day, anchor_id)
            WHERE e.day IN (SELECT CAST(day AS DATE) FROM _days) ORDER BY e.day, e.user_id, a.anchor_rank""")
    meta["day"] = _as_date(meta["day"])
    for column, wanted, what in (("encoder_id", encoder_id, "encoder"), ("anchor_signature", anchor_signature,
                                                                         "anchor generator")):
        stale = meta.loc[meta[column] != wanted, "day"]
        if len(stale):
            raise MissingUpstreamDays(
                f"anchors of {stale.nunique()} day(s) (first {stale.min()}) were made with another {what} "
                f"({meta.loc[stale.index[0], column]!r}, expected {wanted!r}); re-materialize user_anchors and "
                "anchor_embeddings for them")
    user_index = pd.MultiIndex.from_frame(meta[["day", "user_id"]].drop_duplicates())
    return DayAnchors(meta.reset_index(drop=True), vectors, user_index)


def score_day_candidates(warehouse: Warehouse, days: Sequence[date], encoder_id: str, anchor_signature: str,
                         run_id: str | None = None, tables: StageTables = MAIN) -> dict:
    """Max- and mean-pooled cosine of every candidate (exposed or not) to its user's anchors of that day."""
    days = sorted(set(days))
    require_days(warehouse, "events", days, "candidate scoring")
    anchors = load_day_anchors(warehouse, days, encoder_id, anchor_signature, tables)
    with warehouse.connect(read_only=True) as con:
        con.register("_days", _days_param(days))
        cands = con.execute("SELECT day, request_id, user_id, item_id, exposed FROM events "
                            "WHERE day IN (SELECT CAST(day AS DATE) FROM _days)").df()
        item_ids, item_vectors = load_item_embeddings(con, encoder_id)
    cands["day"] = _as_date(cands["day"])
    item_pos = pd.Index(item_ids).get_indexer(cands["item_id"])
    if (item_pos < 0).any():
        missing = cands.loc[item_pos < 0, "item_id"].unique()
        raise MissingUpstreamDays(f"{len(missing)} candidate item(s) have no embedding under {encoder_id} "
                                  f"(e.g. {list(missing[:3])}); materialize item_embeddings first")
    anchor_user = anchors.user_idx_of(anchors.meta["day"], anchors.meta["user_id"])
    result = score_candidates(anchors.user_idx_of(cands["day"], cands["user_id"]), item_pos, item_vectors,
                              anchors.vectors, anchor_user)
    cands["similarity_max"] = result.similarity_max
    cands["similarity_mean"] = result.similarity_mean
    anchor_ids = anchors.meta["anchor_id"].to_numpy()
    cands["anchor_id"] = np.where(result.argmax_anchor >= 0, anchor_ids[np.maximum(result.argmax_anchor, 0)], None)
    cands["encoder_id"], cands["anchor_signature"] = encoder_id, anchor_signature
    with warehouse.transaction() as con:
        warehouse.replace_partitions(tables.similarities, cands, days, con, run_id)
    covered = ~result.no_anchor
    return {"candidates": len(cands), "covered": int(covered.sum()),
            "coverage": float(covered.mean()) if len(cands) else 0.0,
            "similarity_max_mean": float(np.nanmean(result.similarity_max)) if covered.any() else float("nan")}


# ---- step 3b: calibration ---------------------------------------------------------------------

def refit_day(day: date, first_day: date, cfg: CalibrationConfig) -> date:
    """The refit day whose calibration serves ``day``: fits are made every N days and reused."""
    return first_day + timedelta(((day - first_day).days // cfg.refit_every_days) * cfg.refit_every_days)


def calibration_for_day(warehouse: Warehouse, day: date, first_day: date, cfg: CalibrationConfig, pooling: str,
                        encoder_id: str, anchor_signature: str, artifacts_dir: Path,
                        tables: StageTables = MAIN, segment: str = "history") -> Calibration | None:
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
        calibration = _calibration_at(warehouse, refit, first_day, cfg, pooling, encoder_id, anchor_signature,
                                      artifacts_dir, tables, segment)
        if calibration is not None:
            return calibration
    return None


def _calibration_at(warehouse: Warehouse, refit: date, first_day: date, cfg: CalibrationConfig, pooling: str,
                    encoder_id: str, anchor_signature: str, artifacts_dir: Path,
                    tables: StageTables = MAIN, segment: str = "history") -> Calibration | None:
    start = max(first_day, refit - timedelta(cfg.window_days))
    fit_key = "|".join([pooling, cfg.method, str(refit), str(cfg.window_days), str(cfg.min_samples), encoder_id,
                        anchor_signature] + ([segment] if segment != "history" else []))
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
    train = warehouse.query(
        f"SELECT s.{column} AS similarity, e.clicked FROM {tables.similarities} s "
        "JOIN events e USING (day, request_id, item_id) "
        f"JOIN {tables.anchors} a ON a.day = s.day AND a.anchor_id = s.anchor_id "
        f"WHERE s.exposed AND s.day >= ? AND s.day < ? AND s.{column} IS NOT NULL AND s.anchor_signature = ? "
        f"AND s.encoder_id = ? AND a.fallback_reason {same_segment} ?",
        [start, refit, anchor_signature, encoder_id, FALLBACK_EMPTY_HISTORY])
    if len(train) < cfg.min_samples or train["clicked"].nunique() < 2:
        log.info("no %s-pool %s calibration at refit day %s: %d labelled exposed candidates in %s..%s (< %d or one "
                 "class)", pooling, segment, refit, len(train), start, refit - timedelta(1), cfg.min_samples)
        return None
    metadata = {"pooling": pooling, "train_window": [str(start), str(refit - timedelta(1))],
                "encoder_id": encoder_id, "anchor_signature": anchor_signature}
    if segment != "history":
        metadata["segment"] = segment
    calibration = fit_calibration(train["similarity"].to_numpy(float), train["clicked"].to_numpy(int),
                                  method=cfg.method, metadata=metadata, min_samples=cfg.min_samples)
    path = calibration.save(artifacts_dir / "calibration")
    with warehouse.transaction() as con:
        con.execute("INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [fit_key, calibration.version, cfg.method, pooling, refit, start, refit - timedelta(1),
                     calibration.n_train, calibration.positive_rate, str(path), calibration.to_json()])
    log.info("fitted %s-pool %s calibration %s on %d exposed candidates of %s..%s", pooling, cfg.method,
             calibration.version, len(train), start, refit - timedelta(1))
    return calibration


# ---- step 4: pseudo-labels --------------------------------------------------------------------

def _history_vectors(warehouse: Warehouse, days: Sequence[date], anchors: DayAnchors, item_ids, item_vectors,
                     max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """History item vectors and, for each, the (day, user) position in ``anchors.user_index``."""
    hist = warehouse.query("SELECT day, user_id, history_item_ids FROM user_histories WHERE day BETWEEN ? AND ?",
                           [min(days), max(days)])
    hist["day"] = _as_date(hist["day"])
    hist = hist[hist["day"].isin(days)]
    hist["history_item_ids"] = hist["history_item_ids"].map(lambda ids: list(ids)[:max_items])
    flat = hist.explode("history_item_ids").dropna(subset=["history_item_ids"])
    user_pos = anchors.user_idx_of(flat["day"], flat["user_id"])
    item_pos = pd.Index(item_ids).get_indexer(flat["history_item_ids"])
    keep = (user_pos >= 0) & (item_pos >= 0)
    return item_vectors[item_pos[keep]], user_pos[keep]


def no_history_counts(warehouse: Warehouse, days: Sequence[date]) -> dict:
    """Unexposed candidates, and (day, user) pairs, of users with no positive history on ``days``."""
    row = warehouse.query(
        "SELECT count(*) AS candidates, count(DISTINCT (e.day, e.user_id)) AS user_days FROM events e "
        "JOIN user_histories h USING (day, user_id) WHERE NOT e.exposed AND h.n_positives = 0 "
        "AND e.day BETWEEN ? AND ?", [min(days), max(days)]).iloc[0]
    return {"no_history_candidates": int(row["candidates"]), "no_history_user_days": int(row["user_days"])}


def calibration_degenerate(calibration: Calibration, labels: np.ndarray, min_label_std: float) -> str | None:
    """Why a day's labels from ``calibration`` carry no ranking (None when they do): a calibration
    that clamped an anti-correlated fit to a constant, or labels whose spread is below
    ``min_label_std`` (what the quality gate rejects as collapsed)."""
    if calibration.method == "platt" and calibration.a <= 0:
        return f"calibration {calibration.version} is constant (similarity does not rank clicks in its window)"
    if calibration.method == "isotonic" and np.ptp(calibration.y_thresholds) == 0:
        return f"calibration {calibration.version} is constant (similarity does not order clicks in its window)"
    spread = float(np.std(labels)) if len(labels) else 0.0
    if len(labels) and spread < min_label_std:
        return f"labels from calibration {calibration.version} are near-constant (std {spread:.4f} < {min_label_std})"
    return None


def pseudo_label_days(warehouse: Warehouse, days: Sequence[date], first_day: date, *, encoder_id: str,
                      generator: AnchorGenerator, calibration_cfg: CalibrationConfig,
                      confidence_cfg: ConfidenceConfig, history_max_items: int, artifacts_dir: Path,
                      run_id: str | None = None, tables: StageTables = MAIN,
                      no_history: str = "none") -> tuple[pd.DataFrame, dict]:
    """Pseudo-label every unexposed candidate of ``days`` (GPL steps 3-4).

    Users without a positive history have nothing personal to match: by default (``no_history``
    "none") their candidates get no pseudo-labels; "population" labels them through a calibration
    of their own (fitted on exposed candidates of users without history). A day whose personalized
    calibration carries no ranking (:func:`calibration_degenerate`) gets no labels, with the reason
    in the returned stats, instead of constant labels."""
    if no_history not in NO_HISTORY_RULES:
        raise ValueError(f"no_history must be one of {NO_HISTORY_RULES}, not {no_history!r}")
    days = sorted(set(days))
    signature = generator.lineage_signature()
    require_days(warehouse, tables.similarities, days, "pseudo-labelling")
    segments = ("history", "no_history") if no_history == "population" else ("history",)
    calibrations: dict[tuple[date, str, str], Calibration | None] = {
        (d, pooling, segment): calibration_for_day(warehouse, d, first_day, calibration_cfg, pooling, encoder_id,
                                                   signature, artifacts_dir, tables, segment)
        for d in days for pooling in POOLINGS for segment in segments}
    labelled_days = [d for d in days if calibrations[(d, "max", "history")] is not None
                     and calibrations[(d, "mean", "history")] is not None]
    anchors = load_day_anchors(warehouse, days, encoder_id, signature, tables)
    with warehouse.connect(read_only=True) as con:
        con.register("_days", _days_param(labelled_days))
        cands = con.execute(f"""
            SELECT s.day, s.request_id, s.user_id, s.item_id, e.event_time, s.similarity_max, s.similarity_mean,
                   s.anchor_id
            FROM {tables.similarities} s JOIN events e USING (day, request_id, item_id)
            WHERE NOT s.exposed AND s.anchor_id IS NOT NULL AND s.day IN (SELECT CAST(day AS DATE) FROM _days)
            ORDER BY s.day, s.request_id, s.item_id""").df()
        n_unexposed = con.execute("SELECT count(*) FROM events WHERE NOT exposed AND day BETWEEN ? AND ?",
                                  [days[0], days[-1]]).fetchone()[0]
        item_ids, item_vectors = load_item_embeddings(con, encoder_id)
    cands["day"] = _as_date(cands["day"])

    # Confidence factors per anchor, then per candidate through its arg-max anchor.
    meta = anchors.meta
    anchor_user = anchors.user_idx_of(meta["day"], meta["user_id"])
    n_users = len(anchors.user_index)
    coherence = anchor_coherence(anchors.vectors, anchor_user, n_users)[anchor_user]
    hist_vecs, hist_user = _history_vectors(warehouse, days, anchors, item_ids, item_vectors, history_max_items)
    consistency = history_consistency(anchors.vectors, anchor_user, hist_vecs, hist_user, no_history_value=1.0)
    # A generic anchor (empty history) says nothing about the user: a fixed, lower c_hist.
    consistency = np.where(meta["fallback_reason"].eq(FALLBACK_EMPTY_HISTORY), confidence_cfg.no_history_value,
                           consistency)
    generation = generation_confidence(meta["gen_prob"].to_numpy(float), n_tokens=generator.tokens_per_anchor)
    row = pd.Index(meta["anchor_id"] + "@" + meta["day"].astype(str)).get_indexer(
        cands["anchor_id"] + "@" + cands["day"].astype(str))
    cands["c_coherence"], cands["c_history"], cands["c_generation"] = coherence[row], consistency[row], generation[row]
    cands["anchor_is_fallback"] = meta["is_fallback"].to_numpy(bool)[row]
    cands["confidence"] = confidence_weights(cands["c_coherence"], cands["c_history"], cands["c_generation"],
                                             confidence_cfg.alpha, confidence_cfg.beta, confidence_cfg.gamma,
                                             confidence_cfg.w_min)
    # the model that generated each candidate's arg-max anchor (day-bound backends have one per refit period)
    cands["llm_version"] = meta["model_id"].fillna(generator.backend).replace("", generator.backend).to_numpy()[row]
    # Users without history are matched only to the generic anchor: their own segment.
    without_history = meta["fallback_reason"].eq(FALLBACK_EMPTY_HISTORY).to_numpy()[row]
    cands["no_history"] = without_history
    cands["pseudo_label"] = np.nan
    cands["pseudo_label_mean_pool"] = np.nan
    cands["calibration_version"] = ""
    cands["calibration_version_mean_pool"] = ""
    degenerate: dict[str, str] = {}
    for d in labelled_days:
        on_day = (cands["day"] == d).to_numpy()
        for segment in segments:
            rows = on_day & (without_history if segment == "no_history" else ~without_history)
            for pooling, label_col, version_col in (("max", "pseudo_label", "calibration_version"),
                                                    ("mean", "pseudo_label_mean_pool", "calibration_version_mean_pool")):
                cal = calibrations[(d, pooling, segment)]
                if cal is None:  # a population calibration may lack data: those rows stay unlabelled
                    continue
                cands.loc[rows, label_col] = cal.predict(cands.loc[rows, f"similarity_{pooling}"].to_numpy(float))
                cands.loc[rows, version_col] = cal.version
        personal = on_day & ~without_history
        why = calibration_degenerate(calibrations[(d, "max", "history")],
                                     cands.loc[personal, "pseudo_label"].to_numpy(float), calibration_cfg.min_label_std)
        if why:
            degenerate[str(d)] = why
            cands.loc[on_day, ["pseudo_label", "pseudo_label_mean_pool"]] = np.nan
    if degenerate:
        log.warning("%d day(s) get no pseudo-labels because their calibration carries no ranking: %s",
                    len(degenerate), "; ".join(f"{d}: {why}" for d, why in list(degenerate.items())[:5]))
    cands = cands[cands["pseudo_label"].notna() & cands["pseudo_label_mean_pool"].notna()].reset_index(drop=True)
    cands["prompt_version"] = generator.prompt_version or "none"
    cands["encoder_version"] = encoder_id
    with warehouse.transaction() as con:
        warehouse.replace_partitions(tables.labels, cands, days, con, run_id)
    stats = {
        "rows": len(cands), "unexposed_candidates": int(n_unexposed),
        "coverage": float(len(cands) / n_unexposed) if n_unexposed else 0.0,
        "no_history_rule": no_history, **no_history_counts(warehouse, days),
        "no_history_labelled": int(cands["no_history"].sum()),
        "days_with_degenerate_calibration": degenerate,
        "days_without_calibration": [str(d) for d in days if d not in labelled_days],
        "calibration_versions": sorted({c.version for c in calibrations.values() if c is not None}),
        "pseudo_label_mean": float(cands["pseudo_label"].mean()) if len(cands) else float("nan"),
        "confidence_mean": float(cands["confidence"].mean()) if len(cands) else float("nan"),
    }
    return cands, stats
