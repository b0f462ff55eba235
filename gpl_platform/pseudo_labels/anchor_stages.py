"""GPL steps 1 and 2 per UTC day: interest anchors of every user with a request (from the histories of
earlier days, cached by history), and their vectors in the frozen encoder's space."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa

from gpl_platform.data.batches import BATCH_OUTPUT, insert_batch
from gpl_platform.data.warehouse import Warehouse, atomic
from gpl_platform.engine import Engine, LocalEngine
from gpl_platform.pseudo_labels.anchors.base import ANCHOR_COLUMNS, AnchorGenerator, UserHistory
from gpl_platform.pseudo_labels.encoder import encode_deduplicated
from gpl_platform.pseudo_labels.engine_proxies import EngineAnchorGenerator, EngineEncoder
from gpl_platform.pseudo_labels.stage_results import AnchorsResult, AnchorSummary, EmbeddingsResult
from gpl_platform.pseudo_labels.stages import MAIN, StageTables, as_date, days_param, require_days
from gpl_platform.pseudo_labels.vectors import vector_column

# ---- step 1: anchors --------------------------------------------------------------------------


def load_histories(warehouse: Warehouse, days: Sequence[date], max_items: int) -> pd.DataFrame:
    """(day, user_id, history: UserHistory) for users with a request on each day."""
    require_days(warehouse, "user_histories", days, "anchor generation")
    with warehouse.connect(read_only=True) as con:
        con.register("_days", days_param(days))
        frame = con.execute(
            "SELECT day, user_id, history_item_ids FROM user_histories "
            "WHERE day IN (SELECT CAST(day AS DATE) FROM _days) ORDER BY day, user_id"
        ).df()
        texts = dict(con.execute("SELECT item_id, text FROM items").fetchall())
    return _with_histories(frame, texts, max_items)


def anchors_for_days(
    warehouse: Warehouse,
    days: Sequence[date],
    generator: AnchorGenerator,
    k: int,
    history_max_items: int,
    progress: bool = True,
    engine: Engine | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Anchors of every (day, user) with a request, keyed by ``day``, ``user_id`` and ``cache_key``, with
    the ``model_id`` that made them: each distinct history is generated once per serving model (one
    for most backends; one per refit period for ``sid``), and a history seen in an earlier run is a
    cache hit. ``engine`` runs the generation (chunks of ``streaming.anchor_batch_users`` histories)."""
    from gpl_platform.pseudo_labels.anchors.cache import cache_key, generate_with_cache

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
            anchors, part_stats = generate_with_cache(
                con, EngineAnchorGenerator(model, engine), list(unique["history"]), k, progress=progress
            )
        stats.update(part_stats)
        stats["distinct_histories"] += len(unique)
        parts.append(
            anchors.drop(columns=["user_id"]).merge(group[["day", "user_id", "cache_key", "model_id"]], on="cache_key")
        )
    anchors = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["cache_key", *ANCHOR_COLUMNS, "day", "model_id"])
    )
    stats = dict(stats)
    stats.update(user_days=len(histories), anchors=len(anchors), serving_models=histories["model_id"].nunique())
    return anchors, stats


ANCHOR_KEYS = "_gpl_anchor_keys"  # temp table: (day, user_id, cache_key, model_id) of the range


def generate_anchors(
    warehouse: Warehouse,
    days: Sequence[date],
    generator: AnchorGenerator,
    k: int,
    history_max_items: int,
    progress: bool = True,
    run_id: str | None = None,
    tables: StageTables = MAIN,
    engine: Engine | None = None,
) -> AnchorsResult:
    """Anchors for every (day, user) with a request, written to the anchors table of ``tables``; returns
    the stats. Streamed: the histories are read ``streaming.anchor_stage_users`` at a time, their misses
    generated and committed to the anchor cache chunk by chunk (a failed run keeps what it generated),
    and only their keys kept, in a DuckDB temp table. The anchors table is then replaced in one
    transaction by a join of those keys with the cache, so no frame of the range's anchors is built."""
    from gpl_platform.pseudo_labels.anchors import cache

    days = sorted(set(days))
    require_days(warehouse, "user_histories", days, "anchor generation")
    engine = engine or LocalEngine()
    tables.ensure(warehouse)
    serving = {d: generator.for_day(d) for d in days}
    stats: Counter = Counter()
    with warehouse.connect() as con:
        engine.configure(con)
        cache.ensure_cache_table(con)
        texts = dict(con.execute("SELECT item_id, text FROM items").fetchall())
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {ANCHOR_KEYS} "
            "(day DATE, user_id VARCHAR, cache_key VARCHAR, model_id VARCHAR)"
        )
        for model, model_days in _days_by_model(days, serving):
            signature = model.cache_signature()
            running = EngineAnchorGenerator(model, engine)
            for chunk in _history_chunks(
                con, model_days, texts, history_max_items, engine.streaming.anchor_stage_users
            ):
                keys = [cache.cache_key(h, signature, k) for h in chunk["history"]]
                # each distinct history counts once: one an earlier chunk of this run handled is neither
                # a hit nor a miss here
                done = cache.lookup_keys(con, keys, ANCHOR_KEYS)
                todo = {key: h for h, key in zip(chunk["history"], keys) if key not in done}
                _, _, part = cache.generate_misses(con, running, list(todo.values()), list(todo), k, progress=progress)
                stats.update(part)
                insert_batch(
                    con.from_arrow(
                        pa.table(
                            {
                                "day": pa.array(list(chunk["day"]), pa.date32()),
                                "user_id": pa.array(chunk["user_id"].astype(str).tolist(), pa.string()),
                                "cache_key": pa.array(keys, pa.string()),
                                "model_id": pa.array([model.model_id] * len(keys), pa.string()),
                            }
                        )
                    ),
                    f"INSERT INTO {ANCHOR_KEYS} SELECT * FROM {BATCH_OUTPUT}",
                )
        missing = con.execute(
            f"SELECT count(DISTINCT k.cache_key) FROM {ANCHOR_KEYS} k ANTI JOIN {cache.TABLE} c USING (cache_key)"
        ).fetchall()[0][0]
        if missing:
            raise RuntimeError(f"{missing} histories have no anchors in the cache after generation")
        with atomic(con):
            warehouse.clear_partitions(tables.anchors, days, con)
            con.execute(
                f"""
                INSERT INTO {tables.anchors} (day, user_id, anchor_id, anchor_rank, anchor_text, logprob, gen_prob,
                    is_fallback, fallback_reason, backend, model_id, prompt_version, cache_key, anchor_signature)
                SELECT k.day, k.user_id, substr(k.cache_key, 1, 16) || '-' || CAST(c.anchor_rank AS VARCHAR),
                       c.anchor_rank, c.anchor_text, c.logprob, c.gen_prob, coalesce(c.is_fallback, false),
                       c.fallback_reason, ?, k.model_id, ?, k.cache_key, ?
                FROM {ANCHOR_KEYS} k JOIN {cache.TABLE} c USING (cache_key)
                ORDER BY k.day, k.user_id, c.anchor_rank""",
                [generator.backend, generator.prompt_version, generator.lineage_signature()],
            )
            written = warehouse.record_partitions(tables.anchors, days, con, run_id)
        user_days, distinct, models = con.execute(
            f"SELECT count(*), count(DISTINCT cache_key), count(DISTINCT model_id) FROM {ANCHOR_KEYS}"
        ).fetchall()[0]
    out = {key: int(v) for key, v in stats.items()}
    out.update(
        user_days=int(user_days),
        distinct_histories=int(distinct),
        anchors=int(sum(written.values())),
        serving_models=int(models),
    )
    return AnchorsResult(
        user_days=out["user_days"],
        distinct_histories=out["distinct_histories"],
        anchors=out["anchors"],
        serving_models=out["serving_models"],
        counters=out,
    )


def _days_by_model(days: Sequence[date], serving: dict) -> list[tuple[AnchorGenerator, list[date]]]:
    """Consecutive days served by the same model, with that model (one run for most backends)."""
    runs: list[tuple[AnchorGenerator, list[date]]] = []
    for d in days:
        if runs and runs[-1][0].model_id == serving[d].model_id:
            runs[-1][1].append(d)
        else:
            runs.append((serving[d], [d]))
    return runs


def _history_chunks(con, days: Sequence[date], texts: dict, max_items: int, rows: int):
    """The (day, user_id, history) of ``days``, ``rows`` at a time, from one streamed query."""
    # a relation streams its result; a DB-API result would first copy all its rows
    with con.cursor() as cursor:
        reader = cursor.sql(
            "SELECT day, user_id, history_item_ids FROM user_histories "
            "WHERE day IN (SELECT unnest(?::DATE[])) ORDER BY day, user_id",
            params=[list(days)],
        ).to_arrow_reader(rows)
        for batch in reader:
            yield _with_histories(batch.to_pandas(), texts, max_items)


def _with_histories(frame: pd.DataFrame, texts: dict, max_items: int) -> pd.DataFrame:
    frame["day"] = as_date(frame["day"])
    frame["history"] = [
        UserHistory(user, tuple(ids[:max_items]), tuple(texts[i] for i in ids[:max_items]))
        for user, ids in zip(frame["user_id"], frame["history_item_ids"].map(list))
    ]
    return frame.drop(columns=["history_item_ids"])


def anchor_summary(
    warehouse: Warehouse, days: Sequence[date], tables: StageTables = MAIN, examples: int = 5
) -> AnchorSummary:
    """What the anchors of ``days`` look like, for the asset's metadata: row count, fallback share and
    reasons, and the anchors of the first ``examples`` users."""
    with warehouse.connect(read_only=True) as con:
        where = f"FROM {tables.anchors} WHERE day IN (SELECT unnest(?::DATE[]))"
        rows, fallback = con.execute(
            f"SELECT count(*), count(*) FILTER (is_fallback) {where}", [list(days)]
        ).fetchall()[0]
        reasons = con.execute(
            f"SELECT fallback_reason AS reason, count(*) AS count {where} AND is_fallback "
            "GROUP BY fallback_reason ORDER BY count DESC, reason",
            [list(days)],
        ).df()
        sample = con.execute(
            f"""SELECT user_id, anchor_rank, anchor_text, gen_prob, is_fallback {where}
                AND user_id IN (SELECT DISTINCT user_id {where} ORDER BY user_id LIMIT ?)
                ORDER BY user_id, day, anchor_rank LIMIT ?""",
            [list(days), list(days), examples, examples * 20],
        ).df()
    return AnchorSummary(
        rows=int(rows),
        fallback_share=float(fallback / rows) if rows else 0.0,
        fallback_reasons=reasons,
        examples=sample,
    )


# ---- step 2: anchor embeddings ----------------------------------------------------------------


def embed_anchors(
    warehouse: Warehouse,
    days: Sequence[date],
    encoder,
    progress: bool = False,
    run_id: str | None = None,
    tables: StageTables = MAIN,
    generator: AnchorGenerator | None = None,
    engine: Engine | None = None,
) -> EmbeddingsResult:
    """Anchor vectors in the encoder's space: encoded texts, or, when ``generator`` says how
    (semantic-ID anchors), vectors it derives from what the anchor names. Each distinct text of the
    range is embedded once (by ``engine``, in chunks); DuckDB fans the vectors out to the anchors."""
    days = sorted(set(days))
    require_days(warehouse, tables.anchors, days, "anchor embedding")
    engine = engine or LocalEngine()
    with warehouse.connect(read_only=True) as con:
        con.register("_days", days_param(days))
        in_days = f"FROM {tables.anchors} WHERE day IN (SELECT CAST(day AS DATE) FROM _days)"
        texts = [
            row[0] for row in con.execute(f"SELECT DISTINCT anchor_text {in_days} ORDER BY anchor_text").fetchall()
        ]
        n_anchors = con.execute(f"SELECT count(*) {in_days}").fetchall()[0][0]
    encoder_here = EngineEncoder(encoder, engine)
    if generator is not None:
        vectors = generator.anchor_vectors(texts, encoder_here)
    else:
        vectors = encode_deduplicated(encoder_here, texts, progress=progress)
    vectors = np.asarray(vectors, np.float32)
    text_vectors = pa.table({"anchor_text": pa.array(texts, pa.string()), "vector": vector_column(vectors)})
    with warehouse.transaction() as con:
        engine.configure(con)  # the fan-out to every anchor sorts and spills under the cap
        con.register("_days", days_param(days))
        con.register("_text_vectors", text_vectors)
        warehouse.clear_partitions(tables.embeddings, days, con)
        con.execute(
            f"""
            INSERT INTO {tables.embeddings} (day, anchor_id, user_id, encoder_id, vector)
            SELECT a.day, a.anchor_id, a.user_id, ?, t.vector
            FROM {tables.anchors} a JOIN _text_vectors t USING (anchor_text)
            WHERE a.day IN (SELECT CAST(day AS DATE) FROM _days) ORDER BY a.day, a.user_id, a.anchor_rank""",
            [encoder.encoder_id],
        )
        con.unregister("_text_vectors")
        warehouse.record_partitions(tables.embeddings, days, con, run_id)
    return EmbeddingsResult(
        anchors=int(n_anchors), distinct_texts=len(texts), encoder_id=encoder.encoder_id, dim=int(encoder.dim)
    )
