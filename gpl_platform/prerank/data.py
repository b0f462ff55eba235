"""Training data: the time split, candidates, pseudo-labels, Feast features, and per-method rows.

Nothing here reads oracle labels: training sees exposed clicks and pseudo-labels only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import date

import numpy as np
import pandas as pd

from gpl_platform.config import TrainingConfig
from gpl_platform.data.batches import BATCH_OUTPUT, PLAN_TABLE, insert_batch, plan_user_batches
from gpl_platform.data.policies import PRODUCTION_POLICY, not_served_by
from gpl_platform.data.sql import quote_literal
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.prerank import methods
from gpl_platform.prerank.train import TrainingRows

log = logging.getLogger(__name__)

#: every registered training method (gpl_platform/prerank/methods.py)
METHODS = methods.names()


@dataclass
class TimeSplit:
    train_days: list[date]
    valid_days: list[date]
    test_days: list[date]

    def describe(self) -> dict:
        return {name: [str(days[0]), str(days[-1]), len(days)] if days else [] for name, days in asdict(self).items()}


def time_split(
    warehouse: Warehouse, test_share: float, valid_share: float, exclude: Collection[date] = ()
) -> TimeSplit:
    """Days in order: the test part is the shortest run of last days holding ``test_share`` of the
    requests (at least one day), validation the shortest run before it holding ``valid_share``.
    ``exclude``: days left out of every part (e.g. days whose events fail their gate)."""
    per_day = warehouse.query("SELECT day, count(DISTINCT request_id) AS n FROM events GROUP BY day ORDER BY day")
    per_day = per_day[per_day["n"] > 0]
    if exclude:
        per_day = per_day[~pd.to_datetime(per_day["day"]).dt.date.isin(set(exclude))]
    if len(per_day) < 3:
        raise ValueError(f"a time split needs at least 3 days with requests, the warehouse has {len(per_day)}")
    days = pd.to_datetime(per_day["day"]).dt.date.tolist()
    counts = per_day["n"].to_numpy(float) / per_day["n"].sum()

    def suffix(end: int, share: float) -> int:  # start index of the shortest run ending at `end` with `share`
        start, total = end, 0.0
        while start > 0 and total < share:
            start -= 1
            total += counts[start]
        return start

    test_start = min(suffix(len(days), test_share), len(days) - 1)
    valid_start = min(suffix(test_start, valid_share), test_start - 1)
    if valid_start < 1:
        raise ValueError(
            f"time split left no training days ({len(days)} days with requests; lower "
            "training.test_share / valid_share)"
        )
    return TimeSplit(days[:valid_start], days[valid_start:test_start], days[test_start:])


def load_candidates(warehouse: Warehouse, days: Sequence[date]) -> pd.DataFrame:
    """Every candidate of ``days`` in (day, request_id, item_id) order, with the policy that served it."""
    frame = warehouse.query(
        "SELECT day, request_id, user_id, item_id, event_time, exposed, clicked, propensity, "
        f"coalesce(logging_policy, {quote_literal(PRODUCTION_POLICY)}) AS logging_policy FROM events "
        "WHERE day BETWEEN ? AND ? ORDER BY day, request_id, item_id",
        [min(days), max(days)],
    )
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    return frame[frame["day"].isin(set(days))].reset_index(drop=True)


def load_pseudo_labels(warehouse: Warehouse, days: Sequence[date], table: str = "pseudo_labels") -> pd.DataFrame:
    """The pseudo-labels of ``days``."""
    if not days:
        days = [date(1970, 1, 1)]  # an empty result with the right columns
    frame = warehouse.query(
        f"SELECT day, request_id, item_id, pseudo_label, pseudo_label_mean_pool, confidence, c_coherence, "
        f"c_history, c_generation, llm_version, "
        f"prompt_version, encoder_version, calibration_version FROM {table} WHERE day BETWEEN ? AND ?",
        [min(days), max(days)],
    )
    frame["day"] = pd.to_datetime(frame["day"]).dt.date
    return frame[frame["day"].isin(set(days))].reset_index(drop=True)


def pseudo_label_lineage(warehouse: Warehouse, days: Sequence[date], table: str = "pseudo_labels") -> dict:
    """Versions behind the pseudo-labels of ``days``: models, prompt, calibrations, and a digest of the
    partitions' write records (it changes whenever any of those partitions is rewritten)."""
    versions = warehouse.query(
        f"SELECT DISTINCT llm_version, prompt_version, encoder_version, calibration_version FROM {table} "
        "WHERE day BETWEEN ? AND ?",
        [min(days), max(days)],
    )
    parts = warehouse.query(
        "SELECT day, n_rows, written_at FROM partitions WHERE table_name = ? AND day BETWEEN ? AND ? ORDER BY day",
        [table, min(days), max(days)],
    )
    digest = hashlib.sha256(parts.to_csv(index=False).encode()).hexdigest()[:12]
    return {
        "table": table,
        "llm_versions": sorted(versions["llm_version"].unique()),
        "prompt_versions": sorted(versions["prompt_version"].unique()),
        "encoder_versions": sorted(versions["encoder_version"].unique()),
        "calibration_versions": sorted(versions["calibration_version"].unique()),
        "partitions": [str(min(days)), str(max(days))],
        "table_version": digest,
    }


def attach_features(
    store, candidates: pd.DataFrame, service: str, chunk_rows: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """Point-in-time Feast features of every candidate row, as the model's float32 matrix. Read
    ``chunk_rows`` rows at a time (default ``feature_store.historical_chunk_rows``), each chunk turned into
    float32 before the next: every row's retrieval is independent of the others, so the matrix is the same,
    and memory follows the chunk, not the candidates."""
    from gpl_platform.features.serving import feature_matrix, matrix_columns

    chunk_rows = chunk_rows or store.settings.feature_store.historical_chunk_rows
    entity = candidates[["user_id", "item_id", "event_time"]]
    features = store.service_features(service)
    columns = matrix_columns(features)
    parts = []
    for start in range(0, len(entity), chunk_rows):
        frame = store.historical_features(entity.iloc[start : start + chunk_rows], service=service)
        parts.append(feature_matrix(frame, features)[0])
        del frame  # freed before the next chunk's frame is built, not after
    if not parts:
        return np.zeros((0, len(columns)), np.float32), columns
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), columns


# ---- per-method training rows -----------------------------------------------------------------


def exposure_propensity(matrix: np.ndarray, columns: list[str], candidates: pd.DataFrame) -> np.ndarray:
    """P(exposed | item popularity, request size), fitted on the logged exposures of the training days:
    what a team without the policy's internals can estimate from its own logs."""
    from sklearn.linear_model import LogisticRegression

    col = {c: k for k, c in enumerate(columns)}
    size = candidates.groupby("request_id")["item_id"].transform("size").to_numpy(float)
    x = np.column_stack(
        [np.log1p(matrix[:, col["i_exposures"]]), np.log1p(matrix[:, col["i_candidates"]]), np.log(size)]
    )
    y = candidates["exposed"].to_numpy(int)
    model = LogisticRegression(max_iter=1000).fit(x, y)
    return model.predict_proba(x)[:, 1]


def method_plan(
    method: str,
    train: pd.DataFrame,
    pseudo: dict[str, pd.DataFrame],
    cfg: TrainingConfig,
    seed: int,
    teachers: dict[str, methods.TeacherLabels] | None = None,
    propensity: np.ndarray | None = None,
) -> pd.DataFrame:
    """Which training candidates ``method`` learns from, with what label and weight: a frame of (row into
    ``train``, label in [0, 1], weight, is_pseudo) (:mod:`gpl_platform.prerank.methods`). ``pseudo`` maps "main"
    and the ablation variants to pseudo-label frames keyed by (request_id, item_id)."""
    inputs = methods.PlanInputs(train, pseudo, cfg, seed, teachers or {}, propensity)
    return methods.method(method).plan(inputs)


def rows_from_plan(plan: pd.DataFrame, matrix: np.ndarray, train: pd.DataFrame | None = None) -> TrainingRows:
    """The plan's rows of ``matrix`` (row-aligned with ``train``), with their user and item ids when
    ``train`` is given (the id shapes need them)."""
    rows = plan["row"].to_numpy()
    ids = (
        {}
        if train is None
        else {"user_ids": train["user_id"].to_numpy()[rows], "item_ids": train["item_id"].to_numpy()[rows]}
    )
    return TrainingRows(
        matrix[rows],
        plan["label"].to_numpy(np.float32),
        plan["weight"].to_numpy(np.float32),
        plan["is_pseudo"].to_numpy(bool),
        **ids,
    )


def id_vocabularies(warehouse: Warehouse) -> tuple[list[str], list[str]]:
    """Every user id and every item id of the catalog (the ``users`` and ``items`` tables): the
    vocabularies of the id-embedding pre-rankers, never-exposed items included."""
    users = warehouse.query("SELECT user_id FROM users")["user_id"].astype(str).tolist()
    items = warehouse.query("SELECT item_id FROM items")["item_id"].astype(str).tolist()
    return users, items


def plan_frame(plan: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """A plan with the candidate keys it points at: the storable training set (features come later)."""
    keys = train[["day", "request_id", "user_id", "item_id", "event_time"]].iloc[plan["row"].to_numpy()]
    return pd.concat([keys.reset_index(drop=True), plan.drop(columns=["row"]).reset_index(drop=True)], axis=1)


#: methods whose rows of a request do not depend on other requests, so that their training set can be built a
#: batch of requests at a time
REQUEST_SEPARABLE_METHODS = tuple(n for n, m in methods.REGISTRY.items() if m.request_separable)
_TRAINING_COLUMNS = "day, request_id, user_id, item_id, event_time, label, weight, is_pseudo"


def write_training_set(
    con,
    method: str,
    train_days: Sequence[date],
    label_days: Collection[date],
    cfg: TrainingConfig,
    seed: int,
    batch_candidates: int = 250_000,
    duckdb_memory_limit: str | None = None,
    held_out_policies: Sequence[str] = (),
) -> dict:
    """Replace the table ``training_set`` with ``method``'s rows over ``train_days`` (pseudo-labels only
    from ``label_days``), inside ``con``'s open transaction. pandas holds one batch of about
    ``batch_candidates`` candidates (whole requests) at a time (requests of ``held_out_policies``, the
    exploration slice, never); the table keeps the order of the
    whole-range plan (actual rows, then pseudo rows, each in (day, request_id, item_id) order), so what
    trains on it is the same. DuckDB, which stages the rows and sorts them, spills beyond
    ``duckdb_memory_limit``. Returns row counts and label means."""
    if method not in REQUEST_SEPARABLE_METHODS:
        raise ValueError(
            f"{method!r} is not built a batch of requests at a time (choose from {REQUEST_SEPARABLE_METHODS})"
        )
    if duckdb_memory_limit:
        con.execute(f"SET memory_limit = {quote_literal(duckdb_memory_limit)}")
    con.register("_training_days", pd.DataFrame({"day": sorted(set(train_days))}))
    con.register("_label_days", pd.DataFrame({"day": sorted(set(label_days) & set(train_days))}))
    n_batches = plan_user_batches(
        con,
        "SELECT day, request_id, count(*) AS n FROM events "
        f"WHERE day IN (SELECT CAST(day AS DATE) FROM _training_days) {not_served_by(held_out_policies)} "
        "GROUP BY day, request_id",
        batch_candidates,
        key="request_id",
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _training_rows (day DATE, request_id VARCHAR, user_id VARCHAR, "
        "item_id VARCHAR, event_time TIMESTAMPTZ, label FLOAT, weight FLOAT, is_pseudo BOOLEAN, "
        "batch BIGINT, position BIGINT)"
    )
    for batch in range(n_batches):
        train = con.execute(
            "SELECT e.day, e.request_id, e.user_id, e.item_id, e.event_time, e.exposed, e.clicked FROM events e "
            f"JOIN {PLAN_TABLE} p USING (day, request_id) WHERE p.batch = ? ORDER BY e.day, e.request_id, e.item_id",
            [batch],
        ).df()
        train["day"] = pd.to_datetime(train["day"]).dt.date
        pseudo = con.execute(
            "SELECT l.request_id, l.item_id, l.pseudo_label, l.pseudo_label_mean_pool, l.confidence "
            f"FROM pseudo_labels l JOIN {PLAN_TABLE} p USING (day, request_id) "
            "WHERE p.batch = ? AND l.day IN (SELECT CAST(day AS DATE) FROM _label_days)",
            [batch],
        ).df()
        rows = plan_frame(method_plan(method, train, {"main": pseudo}, cfg, seed), train)
        rows["batch"], rows["position"] = batch, np.arange(len(rows), dtype=np.int64)
        insert_batch(
            con.from_df(rows),
            f"INSERT INTO _training_rows SELECT {_TRAINING_COLUMNS}, batch, position FROM {BATCH_OUTPUT}",
        )
    for name in ("_training_days", "_label_days"):
        con.unregister(name)
    con.execute(
        f"CREATE OR REPLACE TABLE training_set AS SELECT {_TRAINING_COLUMNS} FROM _training_rows "
        "ORDER BY is_pseudo, batch, position"
    )
    con.execute("DROP TABLE _training_rows")
    rows, actual, pseudo_rows, click_rate, pseudo_mean, weight_mean = con.execute(
        "SELECT count(*), count(*) FILTER (NOT is_pseudo), count(*) FILTER (is_pseudo), "
        "avg(label) FILTER (NOT is_pseudo), avg(label) FILTER (is_pseudo), avg(weight) FILTER (is_pseudo) "
        "FROM training_set"
    ).fetchone()
    return {
        "rows": int(rows),
        "actual_rows": int(actual),
        "pseudo_rows": int(pseudo_rows),
        "click_rate_actual": float(click_rate) if actual else 0.0,
        "pseudo_label_mean": float(pseudo_mean) if pseudo_rows else 0.0,
        "pseudo_weight_mean": float(weight_mean) if pseudo_rows else 0.0,
    }
