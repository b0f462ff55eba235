"""The streaming side of GPL steps 3 and 4 (docs/SCALING.md): the temp tables that stage a bounded group
of batches of users at a time (:class:`StagedGroups`), and :func:`score_batch` / :func:`label_batch`,
which compute one batch from Arrow columns (in this process or on Ray workers) and return Arrow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpl_platform.config import ConfidenceConfig
from gpl_platform.data.batches import PLAN_TABLE
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.warehouse import table_exists
from gpl_platform.pseudo_labels.anchors.base import FALLBACK_EMPTY_HISTORY
from gpl_platform.pseudo_labels.confidence import (
    anchor_coherence,
    confidence_weights,
    generation_confidence,
    history_consistency,
)
from gpl_platform.pseudo_labels.similarity import score_candidates
from gpl_platform.pseudo_labels.stages import IN_DAYS, POOLINGS, StageTables

ITEMS_TABLE, CANDIDATES_TABLE, ANCHORS_TABLE, HISTORY_TABLE = "_gpl_items", "_gpl_cands", "_gpl_anchors", "_gpl_history"
GROUP_TABLE = "_gpl_group"  # the plan rows of the group of batches being staged


def stage_item_rows(con, encoder_id: str) -> None:
    """``_gpl_items``: item_id -> row of the matrix :func:`load_item_embeddings` returns (same order)."""
    if not table_exists(con, "item_embeddings"):
        raise MissingUpstreamDays(f"no item embeddings under {encoder_id}; materialize item_embeddings first")
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {ITEMS_TABLE} AS SELECT item_id, "
        "(row_number() OVER (ORDER BY item_id) - 1)::BIGINT AS item_row FROM item_embeddings "
        "WHERE encoder_id = ?",
        [encoder_id],
    )


def check_candidate_items(con, encoder_id: str) -> None:
    count, examples = con.execute(
        f"SELECT count(DISTINCT item_id), list(DISTINCT item_id)[1:3] FROM events "
        f"ANTI JOIN {ITEMS_TABLE} USING (item_id) WHERE {IN_DAYS}"
    ).fetchall()[0]
    if count:
        raise MissingUpstreamDays(
            f"{count} candidate item(s) have no embedding under {encoder_id} "
            f"(e.g. {sorted(examples)}); materialize item_embeddings first"
        )


def check_anchor_lineage(con, tables: StageTables, encoder_id: str, anchor_signature: str) -> None:
    """Every anchor of the days must come from this encoder and this anchor generator."""
    for column, wanted, what in (
        ("e.encoder_id", encoder_id, "encoder"),
        ("a.anchor_signature", anchor_signature, "anchor generator"),
    ):
        n_days, first, value = con.execute(
            f"SELECT count(DISTINCT e.day), min(e.day), arg_min({column}, e.day) FROM {tables.embeddings} e "
            f"JOIN {tables.anchors} a USING (day, anchor_id) WHERE e.{IN_DAYS} AND {column} IS DISTINCT FROM ?",
            [wanted],
        ).fetchall()[0]
        if n_days:
            raise MissingUpstreamDays(
                f"anchors of {n_days} day(s) (first {first}) were made with another {what} ({value!r}, expected "
                f"{wanted!r}); re-materialize user_anchors and anchor_embeddings for them"
            )


@dataclass
class StagedGroups:
    """A job's batch inputs (:class:`~gpl_platform.engine.BatchJob` ``inputs``), staged a group of
    ``per_group`` consecutive batches at a time, so DuckDB holds a bounded slice of the range rather than
    all of it. Engines ask for the inputs once per batch, in batch order, right before they read them:
    the first batch of a group fills ``_gpl_group`` with the group's plan rows and calls ``stage(first_day,
    last_day)``, which (re)creates the temp tables from it; ``queries(batch)`` then reads a batch of them."""

    con: object
    per_group: int
    stage: Callable[[date, date], None]
    queries: Callable[[int], dict[str, str]]
    groups: int = field(default=0, init=False)  # groups staged so far
    _current: int | None = field(default=None, init=False)

    def __call__(self, batch: int) -> dict[str, str]:
        group = batch // self.per_group
        if group != self._current:
            first = group * self.per_group
            self.con.execute(
                f"CREATE OR REPLACE TEMP TABLE {GROUP_TABLE} AS SELECT * FROM {PLAN_TABLE} WHERE batch BETWEEN ? AND ?",
                [first, first + self.per_group - 1],
            )
            first_day, last_day = self.con.execute(f"SELECT min(day), max(day) FROM {GROUP_TABLE}").fetchall()[0]
            self.stage(first_day, last_day)
            self._current, self.groups = group, self.groups + 1
        return self.queries(batch)


def batches_per_group(batch_candidates: int, stage_candidates: int) -> int:
    return max(1, stage_candidates // batch_candidates)


def stage_anchors(con, tables: StageTables, with_meta: bool, first_day: date, last_day: date) -> None:
    """``_gpl_anchors``: the anchors of the staged group's users, numbered within their batch (``anchor_row``)."""
    meta = ", a.gen_prob, a.is_fallback, a.fallback_reason, a.model_id" if with_meta else ""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {ANCHORS_TABLE} AS
        SELECT p.batch, p.user_code, e.day, e.anchor_id, a.anchor_rank{meta}, e.vector,
               (row_number() OVER (PARTITION BY p.batch ORDER BY p.user_code, a.anchor_rank) - 1)::BIGINT AS anchor_row
        FROM {tables.embeddings} e JOIN {tables.anchors} a USING (day, anchor_id)
        JOIN {GROUP_TABLE} p ON p.day = e.day AND p.user_id = e.user_id
        WHERE e.day BETWEEN $first AND $last AND a.day BETWEEN $first AND $last ORDER BY p.batch, anchor_row""",
        {"first": first_day, "last": last_day},
    )


def batch_rows(table: str, columns: str, batch: int, order: str) -> str:
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
    result = score_candidates(
        _ints(cands, "user_code"),
        _ints(cands, "item_row"),
        ctx.item_vectors,
        _matrix(anchors, "vector", ctx.item_vectors.shape[1]),
        _ints(anchors, "user_code"),
    )
    anchor_id = pc.take(anchors.column("anchor_id"), pa.array(result.argmax_anchor, mask=result.no_anchor))
    return (
        pa.table({name: cands.column(name) for name in ("day", "request_id", "user_id", "item_id", "exposed")})
        .append_column("similarity_max", _floats(result.similarity_max))
        .append_column("similarity_mean", _floats(result.similarity_mean))
        .append_column("anchor_id", anchor_id)
    )


def progress_of(items, total: int, what: str):
    """Batches with a progress bar when there are several (long stages)."""
    if total < 2:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=what, unit="batch", mininterval=5)


def anchor_factors(
    vectors: np.ndarray,
    anchor_user: np.ndarray,
    n_users: int,
    history_vectors: np.ndarray,
    history_user: np.ndarray,
    empty_history: np.ndarray,
    gen_prob: np.ndarray,
    cfg: ConfidenceConfig,
    tokens_per_anchor: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per anchor: coherence of its user's anchors, consistency with the user's history items, and
    generation confidence (docs/METHOD.md step 4). ``anchor_user`` and ``history_user`` index users 0..n-1."""
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


LABEL_COLUMNS = (
    "day",
    "request_id",
    "user_id",
    "item_id",
    "event_time",
    "similarity_max",
    "similarity_mean",
    "anchor_id",
)


def label_batch(inputs: dict[str, pa.Table], ctx: LabelContext) -> pa.Table:
    """Pseudo-labels of one batch: ``candidates`` (unexposed, with their similarities and ``anchor_row``),
    ``anchors`` (the batch's anchors by ``anchor_row``, with vectors and generation metadata) and
    ``histories`` (user_code, item_row of each history item). Rows that get no label are left out."""
    cands, anchors, history = inputs["candidates"], inputs["anchors"], inputs["histories"]
    dim = ctx.item_vectors.shape[1]
    vectors = _matrix(anchors, "vector", dim)
    users, anchor_user = np.unique(_ints(anchors, "user_code"), return_inverse=True)
    history_user = np.searchsorted(users, _ints(history, "user_code"))
    empty_history = pc.fill_null(pc.equal(anchors.column("fallback_reason"), FALLBACK_EMPTY_HISTORY), False).to_numpy(
        zero_copy_only=False
    )
    gen_prob = pc.fill_null(anchors.column("gen_prob"), np.nan).to_numpy(zero_copy_only=False).astype(float)
    coherence, consistency, generation = anchor_factors(
        vectors,
        anchor_user.reshape(-1),
        len(users),
        ctx.item_vectors[_ints(history, "item_row")],
        history_user,
        empty_history,
        gen_prob,
        ctx.confidence,
        ctx.tokens_per_anchor,
    )

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
    similarity = {
        p: pc.fill_null(cands.column(f"similarity_{p}"), np.nan).to_numpy(zero_copy_only=False) for p in POOLINGS
    }
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
    out = pa.table({name: cands.column(name) for name in LABEL_COLUMNS})
    for name, values in (
        ("pseudo_label", labels["max"]),
        ("pseudo_label_mean_pool", labels["mean"]),
        ("confidence", confidence),
        ("c_coherence", c_coherence),
        ("c_history", c_history),
        ("c_generation", c_generation),
        ("anchor_is_fallback", is_fallback[row]),
    ):
        out = out.append_column(name, pa.array(values))
    out = out.append_column("llm_version", pc.take(llm_version, pa.array(row)))
    out = out.append_column("calibration_version", pa.array(versions["max"], pa.string()))
    out = out.append_column("calibration_version_mean_pool", pa.array(versions["mean"], pa.string()))
    return out.filter(pa.array(keep))
