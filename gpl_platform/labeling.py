"""GPL steps 1-4 per UTC day, over the warehouse (GPL_METHOD.md):

user histories -> interest anchors -> anchor embeddings -> candidate similarities (max/mean over
the user's anchors) -> calibration fitted on exposed candidates of earlier days -> pseudo-labels with
uncertainty-aware confidence. Every function takes a list of days and replaces those partitions in
one transaction; anything for day D reads only data of days before D (histories, calibration
windows) or the day's own candidates (which are what gets labelled).

Similarities and pseudo-labels stream (docs/SCALING.md): DuckDB cuts the range's (day, user) pairs
into batches of about ``streaming.batch_candidates`` candidates, stages each stage's inputs in temp
tables keyed by batch, and :func:`score_batch` / :func:`label_batch` compute one batch at a time from
Arrow columns, in this process or on Ray workers (:mod:`gpl_platform.engine`); each output is
inserted into the open transaction. Memory follows the batch size, not the range.
gpl_platform/labeling_in_memory.py keeps the earlier whole-range code as the reference.
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
import pyarrow as pa
import pyarrow.compute as pc

from gpl_platform.anchors.base import ANCHOR_COLUMNS, FALLBACK_EMPTY_HISTORY, AnchorGenerator, UserHistory
from gpl_platform.calibration import Calibration, fit_calibration
from gpl_platform.config import CalibrationConfig, ConfidenceConfig
from gpl_platform.confidence import anchor_coherence, confidence_weights, generation_confidence, history_consistency
from gpl_platform.embeddings import encode_deduplicated, load_item_embeddings
from gpl_platform.engine import BatchJob, Engine, EngineAnchorGenerator, EngineEncoder, LocalEngine
from gpl_platform.engine.base import PLAN_TABLE, plan_user_batches
from gpl_platform.ingest import MissingUpstreamDays
from gpl_platform.scoring import score_candidates
from gpl_platform.vectors import vector_column
from gpl_platform.warehouse import Warehouse, table_exists

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
                     history_max_items: int, progress: bool = True, engine: Engine | None = None
                     ) -> tuple[pd.DataFrame, dict]:
    """Anchors of every (day, user) with a request, keyed by ``day``, ``user_id`` and ``cache_key``, with
    the ``model_id`` that made them: each distinct history is generated once per serving model (one
    for most backends; one per refit period for ``sid``), and a history seen in an earlier run is a
    cache hit. ``engine`` runs the generation (chunks of ``streaming.anchor_batch_users`` histories)."""
    from gpl_platform.anchors.cache import cache_key, generate_with_cache

    engine = engine or LocalEngine()
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
            anchors, part_stats = generate_with_cache(con, EngineAnchorGenerator(model, engine),
                                                      list(unique["history"]), k, progress=progress)
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
                     tables: StageTables = MAIN, engine: Engine | None = None) -> tuple[pd.DataFrame, dict]:
    """Anchors for every (day, user) with a request, written to the anchors table of ``tables``."""
    days = sorted(set(days))
    anchors, stats = anchors_for_days(warehouse, days, generator, k, history_max_items, progress, engine)
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
                  generator: AnchorGenerator | None = None, engine: Engine | None = None) -> dict:
    """Anchor vectors in the encoder's space: encoded texts, or, when ``generator`` says how
    (semantic-ID anchors), vectors it derives from what the anchor names. Each distinct text of the
    range is embedded once (by ``engine``, in chunks); DuckDB fans the vectors out to the anchors."""
    days = sorted(set(days))
    require_days(warehouse, tables.anchors, days, "anchor embedding")
    engine = engine or LocalEngine()
    with warehouse.connect(read_only=True) as con:
        con.register("_days", _days_param(days))
        in_days = f"FROM {tables.anchors} WHERE day IN (SELECT CAST(day AS DATE) FROM _days)"
        texts = [row[0] for row in con.execute(f"SELECT DISTINCT anchor_text {in_days} ORDER BY anchor_text").fetchall()]
        n_anchors = con.execute(f"SELECT count(*) {in_days}").fetchall()[0][0]
    encoder_here = EngineEncoder(encoder, engine)
    if generator is not None:
        vectors = generator.anchor_vectors(texts, encoder_here)
    else:
        vectors = encode_deduplicated(encoder_here, texts, progress=progress)
    vectors = np.asarray(vectors, np.float32)
    text_vectors = pa.table({"anchor_text": pa.array(texts, pa.string()), "vector": vector_column(vectors)})
    with warehouse.transaction() as con:
        con.register("_days", _days_param(days))
        con.register("_text_vectors", text_vectors)
        warehouse.clear_partitions(tables.embeddings, days, con)
        con.execute(f"""
            INSERT INTO {tables.embeddings} (day, anchor_id, user_id, encoder_id, vector)
            SELECT a.day, a.anchor_id, a.user_id, ?, t.vector FROM {tables.anchors} a JOIN _text_vectors t USING (anchor_text)
            WHERE a.day IN (SELECT CAST(day AS DATE) FROM _days) ORDER BY a.day, a.user_id, a.anchor_rank""",
                    [encoder.encoder_id])
        con.unregister("_text_vectors")
        warehouse.record_partitions(tables.embeddings, days, con, run_id)
    return {"anchors": int(n_anchors), "distinct_texts": len(texts), "encoder_id": encoder.encoder_id,
            "dim": int(encoder.dim)}


# ---- batch inputs shared by steps 3 and 4 -----------------------------------------------------

_ITEMS, _CANDS, _ANCHORS, _HISTORY = "_gpl_items", "_gpl_cands", "_gpl_anchors", "_gpl_history"
_IN_DAYS = "day IN (SELECT CAST(day AS DATE) FROM _days)"


def _stage_item_rows(con, encoder_id: str) -> None:
    """``_gpl_items``: item_id -> row of the matrix :func:`load_item_embeddings` returns (same order)."""
    if not table_exists(con, "item_embeddings"):
        raise MissingUpstreamDays(f"no item embeddings under {encoder_id}; materialize item_embeddings first")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {_ITEMS} AS SELECT item_id, "
                "(row_number() OVER (ORDER BY item_id) - 1)::BIGINT AS item_row FROM item_embeddings "
                "WHERE encoder_id = ?", [encoder_id])


def _check_candidate_items(con, encoder_id: str) -> None:
    count, examples = con.execute(f"SELECT count(DISTINCT item_id), list(DISTINCT item_id)[1:3] FROM events "
                                  f"ANTI JOIN {_ITEMS} USING (item_id) WHERE {_IN_DAYS}").fetchall()[0]
    if count:
        raise MissingUpstreamDays(f"{count} candidate item(s) have no embedding under {encoder_id} "
                                  f"(e.g. {sorted(examples)}); materialize item_embeddings first")


def _check_anchor_lineage(con, tables: StageTables, encoder_id: str, anchor_signature: str) -> None:
    """Every anchor of the days must come from this encoder and this anchor generator."""
    for column, wanted, what in (("e.encoder_id", encoder_id, "encoder"),
                                 ("a.anchor_signature", anchor_signature, "anchor generator")):
        n_days, first, value = con.execute(
            f"SELECT count(DISTINCT e.day), min(e.day), arg_min({column}, e.day) FROM {tables.embeddings} e "
            f"JOIN {tables.anchors} a USING (day, anchor_id) WHERE e.{_IN_DAYS} AND {column} IS DISTINCT FROM ?",
            [wanted]).fetchall()[0]
        if n_days:
            raise MissingUpstreamDays(
                f"anchors of {n_days} day(s) (first {first}) were made with another {what} ({value!r}, expected "
                f"{wanted!r}); re-materialize user_anchors and anchor_embeddings for them")


def _stage_anchors(con, tables: StageTables, with_meta: bool) -> None:
    """``_gpl_anchors``: the planned users' anchors, numbered within their batch (``anchor_row``)."""
    meta = ", a.gen_prob, a.is_fallback, a.fallback_reason, a.model_id" if with_meta else ""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {_ANCHORS} AS
        SELECT p.batch, p.user_code, e.day, e.anchor_id, a.anchor_rank{meta}, e.vector,
               (row_number() OVER (PARTITION BY p.batch ORDER BY p.user_code, a.anchor_rank) - 1)::BIGINT AS anchor_row
        FROM {tables.embeddings} e JOIN {tables.anchors} a USING (day, anchor_id)
        JOIN {PLAN_TABLE} p ON p.day = e.day AND p.user_id = e.user_id
        WHERE e.{_IN_DAYS} ORDER BY p.batch, anchor_row""")


def _batch_rows(table: str, columns: str, batch: int, order: str) -> str:
    return f"SELECT {columns} FROM {table} WHERE batch = {int(batch)} ORDER BY {order}"


def _ints(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy().astype(np.int64, copy=False)


def _matrix(table: pa.Table, column: str, dim: int) -> np.ndarray:
    vectors = table.column(column).combine_chunks()
    if len(vectors) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.asarray(vectors.flatten(), dtype=np.float32).reshape(len(vectors), -1)


def _floats(values: np.ndarray) -> pa.Array:
    """NaN as NULL, as the warehouse stores a missing similarity."""
    return pa.array(values, mask=np.isnan(values))


# ---- step 3: similarities ---------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreContext:
    item_vectors: np.ndarray


def score_batch(inputs: dict[str, pa.Table], ctx: ScoreContext) -> pa.Table:
    """Similarities of one batch: ``candidates`` (day, request_id, user_id, item_id, exposed, user_code,
    item_row) against ``anchors`` (user_code, anchor_id, vector) of the same users."""
    cands, anchors = inputs["candidates"], inputs["anchors"]
    result = score_candidates(_ints(cands, "user_code"), _ints(cands, "item_row"), ctx.item_vectors,
                              _matrix(anchors, "vector", ctx.item_vectors.shape[1]), _ints(anchors, "user_code"))
    anchor_id = pc.take(anchors.column("anchor_id"), pa.array(result.argmax_anchor, mask=result.no_anchor))
    return pa.table({name: cands.column(name) for name in ("day", "request_id", "user_id", "item_id", "exposed")}
                    ).append_column("similarity_max", _floats(result.similarity_max)
                                    ).append_column("similarity_mean", _floats(result.similarity_mean)
                                                    ).append_column("anchor_id", anchor_id)


def score_day_candidates(warehouse: Warehouse, days: Sequence[date], encoder_id: str, anchor_signature: str,
                         run_id: str | None = None, tables: StageTables = MAIN, engine: Engine | None = None) -> dict:
    """Max- and mean-pooled cosine of every candidate (exposed or not) to its user's anchors of that day,
    in batches of users (:func:`score_batch`)."""
    days = sorted(set(days))
    require_days(warehouse, "events", days, "candidate scoring")
    require_days(warehouse, tables.embeddings, days, "pseudo-labelling")
    engine = engine or LocalEngine()
    with warehouse.transaction() as con:
        engine.configure(con)
        con.register("_days", _days_param(days))
        _check_anchor_lineage(con, tables, encoder_id, anchor_signature)
        _stage_item_rows(con, encoder_id)
        _check_candidate_items(con, encoder_id)
        _, item_vectors = load_item_embeddings(con, encoder_id)
        n_batches = plan_user_batches(con, f"SELECT day, user_id, count(*) AS n FROM events WHERE {_IN_DAYS} "
                                      "GROUP BY day, user_id", engine.streaming.batch_candidates)
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE {_CANDS} AS
            SELECT p.batch, p.user_code, e.day, e.request_id, e.user_id, e.item_id, e.exposed, i.item_row,
                   e.rowid AS event_row
            FROM events e JOIN {PLAN_TABLE} p USING (day, user_id) JOIN {_ITEMS} i USING (item_id)
            WHERE e.{_IN_DAYS} ORDER BY p.batch, p.user_code, event_row""")
        _stage_anchors(con, tables, with_meta=False)
        job = BatchJob("similarities", score_batch, ScoreContext(item_vectors), lambda b: {
            # a user's candidates in the events' own order, as the whole-range code scored them
            "candidates": _batch_rows(_CANDS, "day, request_id, user_id, item_id, exposed, user_code, item_row",
                                      b, "user_code, event_row"),
            "anchors": _batch_rows(_ANCHORS, "user_code, anchor_id, vector", b, "anchor_row")})
        warehouse.clear_partitions(tables.similarities, days, con)
        for relation in _progress(engine.run(con, job, range(n_batches)), n_batches, "similarities"):
            con.execute(f"""
                INSERT INTO {tables.similarities} (day, request_id, user_id, item_id, exposed, similarity_max,
                                                   similarity_mean, anchor_id, encoder_id, anchor_signature)
                SELECT day, request_id, user_id, item_id, exposed, similarity_max, similarity_mean, anchor_id, ?, ?
                FROM {relation}""", [encoder_id, anchor_signature])
        warehouse.record_partitions(tables.similarities, days, con, run_id)
        n, covered, mean_max = con.execute(
            f"SELECT count(*), count(anchor_id), avg(similarity_max) FROM {tables.similarities} "
            f"WHERE {_IN_DAYS}").fetchall()[0]
    return {"candidates": int(n), "covered": int(covered), "coverage": float(covered / n) if n else 0.0,
            "similarity_max_mean": float(mean_max) if covered else float("nan"), "batches": n_batches,
            "engine": engine.name}


def _progress(items, total: int, what: str):
    """Batches with a progress bar when there are several (long stages)."""
    if total < 2:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=what, unit="batch", mininterval=5)


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
                        anchor_signature, f"max{cfg.max_samples}"] + ([segment] if segment != "history" else []))
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
        f"AND s.encoder_id = ? AND a.fallback_reason {same_segment} ?")
    params = [start, refit, anchor_signature, encoder_id, FALLBACK_EMPTY_HISTORY]
    with warehouse.connect(read_only=True) as con:
        available = con.execute(f"SELECT count(*) FROM ({window_sql})", params).fetchall()[0][0]
        train = con.execute(
            f"SELECT similarity, clicked FROM (SELECT * FROM ({window_sql}) ORDER BY hash(day, request_id, item_id), "
            "day, request_id, item_id LIMIT ?) ORDER BY similarity, clicked", [*params, cfg.max_samples]).df()
    if len(train) < cfg.min_samples or train["clicked"].nunique() < 2:
        log.info("no %s-pool %s calibration at refit day %s: %d labelled exposed candidates in %s..%s (< %d or one "
                 "class)", pooling, segment, refit, len(train), start, refit - timedelta(1), cfg.min_samples)
        return None
    metadata = {"pooling": pooling, "train_window": [str(start), str(refit - timedelta(1))],
                "encoder_id": encoder_id, "anchor_signature": anchor_signature}
    if segment != "history":
        metadata["segment"] = segment
    if available > len(train):
        metadata["sampled_from"] = int(available)
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

def day_calibrations(warehouse: Warehouse, days: Sequence[date], first_day: date, cfg: CalibrationConfig,
                     encoder_id: str, signature: str, artifacts_dir: Path, tables: StageTables,
                     segments: Sequence[str]) -> tuple[dict[tuple[date, str, str], Calibration | None], list[date]]:
    """The calibration of every (day, pooling, segment), and the days labelled (both poolings calibrated)."""
    calibrations = {(d, pooling, segment): calibration_for_day(warehouse, d, first_day, cfg, pooling, encoder_id,
                                                               signature, artifacts_dir, tables, segment)
                    for d in days for pooling in POOLINGS for segment in segments}
    labelled = [d for d in days if calibrations[(d, "max", "history")] is not None
                and calibrations[(d, "mean", "history")] is not None]
    return calibrations, labelled


def anchor_factors(vectors: np.ndarray, anchor_user: np.ndarray, n_users: int, history_vectors: np.ndarray,
                   history_user: np.ndarray, empty_history: np.ndarray, gen_prob: np.ndarray,
                   cfg: ConfidenceConfig, tokens_per_anchor: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per anchor: coherence of its user's anchors, consistency with the user's history items, and
    generation confidence (GPL_METHOD.md step 4). ``anchor_user`` and ``history_user`` index users 0..n-1."""
    coherence = anchor_coherence(vectors, anchor_user, n_users)[anchor_user]
    consistency = history_consistency(vectors, anchor_user, history_vectors, history_user, no_history_value=1.0)
    # A generic anchor (empty history) says nothing about the user: a fixed, lower c_hist.
    consistency = np.where(empty_history, cfg.no_history_value, consistency)
    generation = generation_confidence(gen_prob, n_tokens=tokens_per_anchor)
    return coherence, consistency, generation


@dataclass(frozen=True)
class LabelContext:
    item_vectors: np.ndarray
    calibrations: dict  # (day, pooling, segment) -> Calibration | None, for the labelled days
    segments: tuple[str, ...]
    confidence: ConfidenceConfig
    tokens_per_anchor: int | None
    backend: str


_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
_LABEL_COLUMNS = ("day", "request_id", "user_id", "item_id", "event_time", "similarity_max", "similarity_mean",
                  "anchor_id")


def label_batch(inputs: dict[str, pa.Table], ctx: LabelContext) -> pa.Table:
    """Pseudo-labels of one batch: ``candidates`` (unexposed, with their similarities and ``anchor_row``),
    ``anchors`` (the batch's anchors by ``anchor_row``, with vectors and generation metadata) and
    ``histories`` (user_code, item_row of each history item). Rows that get no label are left out."""
    cands, anchors, history = inputs["candidates"], inputs["anchors"], inputs["histories"]
    dim = ctx.item_vectors.shape[1]
    vectors = _matrix(anchors, "vector", dim)
    users, anchor_user = np.unique(_ints(anchors, "user_code"), return_inverse=True)
    history_user = np.searchsorted(users, _ints(history, "user_code"))
    empty_history = pc.fill_null(pc.equal(anchors.column("fallback_reason"), FALLBACK_EMPTY_HISTORY), False
                                 ).to_numpy(zero_copy_only=False)
    gen_prob = pc.fill_null(anchors.column("gen_prob"), np.nan).to_numpy(zero_copy_only=False).astype(float)
    coherence, consistency, generation = anchor_factors(
        vectors, anchor_user.reshape(-1), len(users), ctx.item_vectors[_ints(history, "item_row")], history_user,
        empty_history, gen_prob, ctx.confidence, ctx.tokens_per_anchor)

    row = _ints(cands, "anchor_row")
    c_coherence, c_history, c_generation = coherence[row], consistency[row], generation[row]
    cfg = ctx.confidence
    confidence = confidence_weights(c_coherence, c_history, c_generation, cfg.alpha, cfg.beta, cfg.gamma, cfg.w_min)
    model_id = anchors.column("model_id")
    # the model that generated each candidate's arg-max anchor (day-bound backends have one per refit period)
    llm_version = pc.if_else(pc.fill_null(pc.equal(model_id, ""), True), ctx.backend, model_id)
    is_fallback = pc.fill_null(anchors.column("is_fallback"), False).to_numpy(zero_copy_only=False)
    without_history = empty_history[row]  # users without history are matched only to the generic anchor

    n = cands.num_rows
    labels = {"max": np.full(n, np.nan), "mean": np.full(n, np.nan)}
    versions = {"max": np.full(n, "", dtype=object), "mean": np.full(n, "", dtype=object)}
    similarity = {p: pc.fill_null(cands.column(f"similarity_{p}"), np.nan).to_numpy(zero_copy_only=False)
                  for p in POOLINGS}
    day = cands.column("day").to_numpy(zero_copy_only=False)
    for d in np.unique(day):
        on_day = day == d
        for segment in ctx.segments:
            rows = on_day & (without_history if segment == "no_history" else ~without_history)
            for pooling in POOLINGS:
                cal = ctx.calibrations[(d.astype(object), pooling, segment)]
                if cal is None:  # a population calibration may lack data: those rows stay unlabelled
                    continue
                labels[pooling][rows] = cal.predict(similarity[pooling][rows].astype(np.float64))
                versions[pooling][rows] = cal.version
    keep = ~np.isnan(labels["max"]) & ~np.isnan(labels["mean"])
    out = pa.table({name: cands.column(name) for name in _LABEL_COLUMNS})
    for name, values in (("pseudo_label", labels["max"]), ("pseudo_label_mean_pool", labels["mean"]),
                         ("confidence", confidence), ("c_coherence", c_coherence), ("c_history", c_history),
                         ("c_generation", c_generation), ("anchor_is_fallback", is_fallback[row])):
        out = out.append_column(name, pa.array(values))
    out = out.append_column("llm_version", pc.take(llm_version, pa.array(row)))
    out = out.append_column("calibration_version", pa.array(versions["max"], pa.string()))
    out = out.append_column("calibration_version_mean_pool", pa.array(versions["mean"], pa.string()))
    return out.filter(pa.array(keep))


def pseudo_label_days(warehouse: Warehouse, days: Sequence[date], first_day: date, *, encoder_id: str,
                      generator: AnchorGenerator, calibration_cfg: CalibrationConfig,
                      confidence_cfg: ConfidenceConfig, history_max_items: int, artifacts_dir: Path,
                      run_id: str | None = None, tables: StageTables = MAIN,
                      no_history: str = "none", engine: Engine | None = None,
                      sample_rows: int = 50_000) -> tuple[pd.DataFrame, dict]:
    """Pseudo-label every unexposed candidate of ``days`` (GPL steps 3-4), in batches of users
    (:func:`label_batch`).

    Users without a positive history have nothing personal to match: by default (``no_history``
    "none") their candidates get no pseudo-labels; "population" labels them through a calibration
    of their own (fitted on exposed candidates of users without history). A day whose personalized
    calibration carries no ranking (:func:`calibration_degenerate`) gets no labels, with the reason
    in the returned stats, instead of constant labels.

    Returns a hash sample of at most ``sample_rows`` labels (``pseudo_label``, ``confidence``; for plots)
    and the stats, whose ``rows`` is the number of labels written and ``quantiles`` their quantiles."""
    if no_history not in NO_HISTORY_RULES:
        raise ValueError(f"no_history must be one of {NO_HISTORY_RULES}, not {no_history!r}")
    days = sorted(set(days))
    signature = generator.lineage_signature()
    require_days(warehouse, tables.similarities, days, "pseudo-labelling")
    require_days(warehouse, tables.embeddings, days, "pseudo-labelling")
    engine = engine or LocalEngine()
    segments = ("history", "no_history") if no_history == "population" else ("history",)
    calibrations, labelled_days = day_calibrations(warehouse, days, first_day, calibration_cfg, encoder_id, signature,
                                                   artifacts_dir, tables, segments)
    labels_of_days = f"FROM {tables.labels} WHERE {_IN_DAYS}"
    with warehouse.transaction() as con:
        engine.configure(con)
        con.register("_days", _days_param(days))
        _check_anchor_lineage(con, tables, encoder_id, signature)
        n_unexposed = con.execute(f"SELECT count(*) FROM events WHERE NOT exposed AND {_IN_DAYS}").fetchall()[0][0]
        _stage_item_rows(con, encoder_id)
        _, item_vectors = load_item_embeddings(con, encoder_id)
        con.register("_days", _days_param(labelled_days))  # from here on: the days with a calibration
        n_batches = plan_user_batches(
            con, f"SELECT day, user_id, count(*) AS n FROM {tables.similarities} WHERE NOT exposed AND anchor_id IS "
            f"NOT NULL AND {_IN_DAYS} GROUP BY day, user_id", engine.streaming.batch_candidates)
        _stage_anchors(con, tables, with_meta=True)
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE {_CANDS} AS
            SELECT p.batch, p.user_code, s.day, s.request_id, s.user_id, s.item_id, e.event_time, s.similarity_max,
                   s.similarity_mean, s.anchor_id, a.anchor_row
            FROM {tables.similarities} s JOIN {PLAN_TABLE} p USING (day, user_id)
            JOIN events e USING (day, request_id, item_id)
            LEFT JOIN {_ANCHORS} a ON a.batch = p.batch AND a.day = s.day AND a.anchor_id = s.anchor_id
            WHERE NOT s.exposed AND s.anchor_id IS NOT NULL AND s.{_IN_DAYS}
            ORDER BY p.batch, p.user_code, s.request_id, s.item_id""")
        stale = con.execute(f"SELECT count(*), min(day) FROM {_CANDS} WHERE anchor_row IS NULL").fetchall()[0]
        if stale[0]:
            raise MissingUpstreamDays(
                f"{stale[0]} candidate similarities (first day {stale[1]}) point at anchors that no longer exist: "
                f"re-materialize {tables.similarities} after {tables.anchors}")
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE {_HISTORY} AS
            SELECT p.batch, p.user_code, i.item_row, h.position FROM (
                SELECT day, user_id, unnest(ids) AS item_id, unnest(range(len(ids))) AS position
                FROM (SELECT day, user_id, history_item_ids[1:{int(history_max_items)}] AS ids FROM user_histories
                      WHERE {_IN_DAYS})) h
            JOIN {PLAN_TABLE} p USING (day, user_id) JOIN {_ITEMS} i USING (item_id)
            ORDER BY p.batch, p.user_code, h.position""")
        context = LabelContext(item_vectors, {key: cal for key, cal in calibrations.items() if key[0] in labelled_days},
                               segments, confidence_cfg, generator.tokens_per_anchor, generator.backend)
        job = BatchJob("pseudo_labels", label_batch, context, lambda b: {
            "candidates": _batch_rows(_CANDS, ", ".join(_LABEL_COLUMNS) + ", anchor_row", b,
                                      "user_code, request_id, item_id"),
            "anchors": _batch_rows(_ANCHORS, "user_code, anchor_row, gen_prob, is_fallback, fallback_reason, model_id, "
                                   "vector", b, "anchor_row"),
            "histories": _batch_rows(_HISTORY, "user_code, item_row", b, "user_code, position")})
        con.register("_days", _days_param(days))
        warehouse.clear_partitions(tables.labels, days, con)
        columns = [*_LABEL_COLUMNS, "pseudo_label", "pseudo_label_mean_pool", "confidence", "c_coherence",
                   "c_history", "c_generation", "anchor_is_fallback", "llm_version", "calibration_version",
                   "calibration_version_mean_pool"]
        for relation in _progress(engine.run(con, job, range(n_batches)), n_batches, "pseudo-labels"):
            con.execute(f"INSERT INTO {tables.labels} ({', '.join(columns)}, prompt_version, encoder_version) "
                        f"SELECT {', '.join(columns)}, ?, ? FROM {relation}",
                        [generator.prompt_version or "none", encoder_id])
        personal = con.execute(f"""
            SELECT p.day, count(*), stddev_pop(p.pseudo_label) FROM {tables.labels} p
            JOIN {tables.anchors} a ON a.day = p.day AND a.anchor_id = p.anchor_id
            WHERE p.{_IN_DAYS} AND a.fallback_reason IS DISTINCT FROM ? GROUP BY p.day""",
                               [FALLBACK_EMPTY_HISTORY]).fetchall()
        spread = {pd.Timestamp(d).date(): (n, s or 0.0) for d, n, s in personal}
        degenerate: dict[str, str] = {}
        for d in labelled_days:
            why = degenerate_reason(calibrations[(d, "max", "history")], *spread.get(d, (0, 0.0)),
                                    calibration_cfg.min_label_std)
            if why:
                degenerate[str(d)] = why
                con.execute(f"DELETE FROM {tables.labels} WHERE day = ?", [d])
        if degenerate:
            log.warning("%d day(s) get no pseudo-labels because their calibration carries no ranking: %s",
                        len(degenerate), "; ".join(f"{d}: {why}" for d, why in list(degenerate.items())[:5]))
        warehouse.record_partitions(tables.labels, days, con, run_id)
        rows, label_mean, confidence_mean = con.execute(
            f"SELECT count(*), avg(pseudo_label), avg(confidence) {labels_of_days}").fetchall()[0]
        no_history_labelled = con.execute(
            f"SELECT count(*) FROM {tables.labels} p JOIN {tables.anchors} a ON a.day = p.day AND a.anchor_id = "
            f"p.anchor_id WHERE p.{_IN_DAYS} AND a.fallback_reason = ?", [FALLBACK_EMPTY_HISTORY]).fetchall()[0][0]
        quantiles = con.execute(
            f"SELECT unnest({list(_QUANTILES)}) AS q, unnest(pl) AS pseudo_label, unnest(c) AS confidence FROM ("
            f"SELECT quantile_cont(pseudo_label, {list(_QUANTILES)}) AS pl, quantile_cont(confidence, "
            f"{list(_QUANTILES)}) AS c {labels_of_days})").df() if rows else None
        sample = con.execute(f"SELECT pseudo_label, confidence {labels_of_days} "
                             "ORDER BY hash(request_id, item_id), request_id, item_id LIMIT ?", [sample_rows]).df()
    stats = {
        "rows": int(rows), "unexposed_candidates": int(n_unexposed),
        "coverage": float(rows / n_unexposed) if n_unexposed else 0.0,
        "no_history_rule": no_history, **no_history_counts(warehouse, days),
        "no_history_labelled": int(no_history_labelled),
        "days_with_degenerate_calibration": degenerate,
        "days_without_calibration": [str(d) for d in days if d not in labelled_days],
        "calibration_versions": sorted({c.version for c in calibrations.values() if c is not None}),
        "pseudo_label_mean": float(label_mean) if rows else float("nan"),
        "confidence_mean": float(confidence_mean) if rows else float("nan"),
        "quantiles": quantiles.set_index("q") if quantiles is not None else None,
        "batches": n_batches, "engine": engine.name,
    }
    return sample, stats
