"""GPL steps 1 and 2 per UTC day: interest anchors of every user with a request (from the histories of
earlier days, cached by history), and their vectors in the frozen encoder's space."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa

from gpl_platform.data.warehouse import Warehouse
from gpl_platform.engine import Engine, EngineAnchorGenerator, EngineEncoder, LocalEngine
from gpl_platform.pseudo_labels.anchors.base import ANCHOR_COLUMNS, AnchorGenerator, UserHistory
from gpl_platform.pseudo_labels.encoder import encode_deduplicated
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
    frame["day"] = as_date(frame["day"])
    frame["history"] = [
        UserHistory(user, tuple(ids[:max_items]), tuple(texts[i] for i in ids[:max_items]))
        for user, ids in zip(frame["user_id"], frame["history_item_ids"].map(list))
    ]
    return frame.drop(columns=["history_item_ids"])


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
) -> tuple[pd.DataFrame, dict]:
    """Anchors for every (day, user) with a request, written to the anchors table of ``tables``."""
    days = sorted(set(days))
    anchors, stats = anchors_for_days(warehouse, days, generator, k, history_max_items, progress, engine)
    anchors["anchor_id"] = anchors["cache_key"].str[:16] + "-" + anchors["anchor_rank"].astype(str)
    anchors["backend"] = generator.backend
    anchors["prompt_version"], anchors["anchor_signature"] = generator.prompt_version, generator.lineage_signature()
    anchors = anchors.sort_values(["day", "user_id", "anchor_rank"], ignore_index=True)
    tables.ensure(warehouse)
    with warehouse.transaction() as con:
        (engine or LocalEngine()).configure(con)
        warehouse.replace_partitions(tables.anchors, anchors, days, con, run_id)
    return anchors, stats


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
) -> dict:
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
    return {
        "anchors": int(n_anchors),
        "distinct_texts": len(texts),
        "encoder_id": encoder.encoder_id,
        "dim": int(encoder.dim),
    }
