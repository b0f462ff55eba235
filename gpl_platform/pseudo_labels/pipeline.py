"""GPL steps 1-4 per UTC day, over the warehouse (docs/METHOD.md):

user histories -> interest anchors -> anchor embeddings -> candidate similarities (max/mean over
the user's anchors) -> calibration fitted on exposed candidates of earlier days -> pseudo-labels with
uncertainty-aware confidence. Every function takes a list of days and replaces those partitions in
one transaction; anything for day D reads only data of days before D (histories, calibration
windows) or the day's own candidates (which are what gets labelled).

Similarities and pseudo-labels stream (docs/SCALING.md): DuckDB cuts the range's (day, user) pairs
into batches of about ``streaming.batch_candidates`` candidates, stages the inputs of a group of
batches (about ``streaming.stage_candidates`` candidates) at a time in temp tables keyed by batch,
and :func:`score_batch` / :func:`label_batch` compute one batch at a time from Arrow columns, in this
process or on Ray workers (:mod:`gpl_platform.engine`); each output is inserted into the open
transaction. Memory follows the batch and group sizes, not the range. Each stage is staging (what the temp
tables of a group hold), the batches run and written, and the report (:mod:`.label_report` for the labels).
tests/pseudo_labels/reference_labels.py keeps the earlier whole-range code as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from gpl_platform.data.batches import BATCH_OUTPUT, insert_batch, plan_user_batches
from gpl_platform.data.errors import MissingUpstreamDays
from gpl_platform.data.sql import quote_literal
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.engine import BatchJob, Engine, LocalEngine
from gpl_platform.pseudo_labels.anchors.base import AnchorGenerator
from gpl_platform.pseudo_labels.batches import (
    ANCHORS_TABLE,
    CANDIDATES_TABLE,
    GROUP_TABLE,
    HISTORY_TABLE,
    ITEMS_TABLE,
    LABEL_COLUMNS,
    LabelContext,
    ScoreContext,
    StagedGroups,
    batch_rows,
    batches_per_group,
    check_anchor_lineage,
    check_candidate_items,
    label_batch,
    progress_of,
    score_batch,
    stage_anchors,
    stage_item_rows,
)
from gpl_platform.pseudo_labels.day_calibration import day_calibrations
from gpl_platform.pseudo_labels.encoder import load_item_embeddings
from gpl_platform.pseudo_labels.label_report import (
    calibration_versions,
    drop_degenerate_days,
    label_distribution,
    label_gaps,
)
from gpl_platform.pseudo_labels.stage_results import LabelsResult, SimilaritiesResult
from gpl_platform.pseudo_labels.stages import IN_DAYS, MAIN, StageSettings, StageTables, days_param, require_days

#: the columns a batch of :func:`label_batch` gives, written as they are (the versions of prompt and encoder apart)
LABEL_OUTPUT = (
    *LABEL_COLUMNS,
    "pseudo_label",
    "pseudo_label_mean_pool",
    "confidence",
    "c_coherence",
    "c_history",
    "c_generation",
    "anchor_is_fallback",
    "llm_version",
    "calibration_version",
    "calibration_version_mean_pool",
)


def staged_groups(con, engine: Engine, stage, queries) -> StagedGroups:
    """A job's inputs staged in groups of about ``streaming.stage_candidates`` candidates of the engine."""
    return StagedGroups(
        con, batches_per_group(engine.streaming.batch_candidates, engine.streaming.stage_candidates), stage, queries
    )


# ---- step 3: similarities -----------------------------------------------------------------------


def score_day_candidates(
    warehouse: Warehouse,
    days: Sequence[date],
    encoder_id: str,
    anchor_signature: str,
    run_id: str | None = None,
    tables: StageTables = MAIN,
    engine: Engine | None = None,
) -> SimilaritiesResult:
    """Max- and mean-pooled cosine of every candidate (exposed or not) to its user's anchors of that day,
    in batches of users (:func:`score_batch`)."""
    days = sorted(set(days))
    require_days(warehouse, "events", days, "candidate scoring")
    require_days(warehouse, tables.embeddings, days, "pseudo-labelling")
    engine = engine or LocalEngine()
    with warehouse.transaction() as con:
        engine.configure(con)
        con.register("_days", days_param(days))
        check_anchor_lineage(con, tables, encoder_id, anchor_signature)
        stage_item_rows(con, encoder_id)
        check_candidate_items(con, encoder_id)
        _, item_vectors = load_item_embeddings(con, encoder_id)
        n_batches = plan_user_batches(
            con,
            f"SELECT day, user_id, count(*) AS n FROM events WHERE {IN_DAYS} GROUP BY day, user_id",
            engine.streaming.batch_candidates,
        )
        staged = scoring_inputs(con, tables, engine)
        job = BatchJob("similarities", score_batch, ScoreContext(item_vectors), staged)
        warehouse.clear_partitions(tables.similarities, days, con)
        for relation in progress_of(engine.run(con, job, range(n_batches)), n_batches, "similarities"):
            insert_batch(
                relation,
                f"""
                INSERT INTO {tables.similarities} (day, request_id, user_id, item_id, exposed, similarity_max,
                                                   similarity_mean, anchor_id, encoder_id, anchor_signature)
                SELECT day, request_id, user_id, item_id, exposed, similarity_max, similarity_mean, anchor_id,
                       {quote_literal(encoder_id)}, {quote_literal(anchor_signature)}
                FROM {BATCH_OUTPUT}""",
            )
        warehouse.record_partitions(tables.similarities, days, con, run_id)
        n, covered, mean_max = con.execute(
            f"SELECT count(*), count(anchor_id), avg(similarity_max) FROM {tables.similarities} WHERE {IN_DAYS}"
        ).fetchall()[0]
    return SimilaritiesResult(
        candidates=int(n),
        covered=int(covered),
        coverage=float(covered / n) if n else 0.0,
        similarity_max_mean=float(mean_max) if covered else float("nan"),
        batches=n_batches,
        staged_groups=staged.groups,
        engine=engine.name,
    )


def scoring_inputs(con, tables: StageTables, engine: Engine) -> StagedGroups:
    """The inputs of a scoring batch: its candidates and its users' anchors, staged a group at a time."""

    def stage(first_day: date, last_day: date) -> None:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {CANDIDATES_TABLE} AS
            SELECT p.batch, p.user_code, e.day, e.request_id, e.user_id, e.item_id, e.exposed, i.item_row,
                   e.rowid AS event_row
            FROM events e JOIN {GROUP_TABLE} p USING (day, user_id) JOIN {ITEMS_TABLE} i USING (item_id)
            WHERE e.day BETWEEN $first AND $last ORDER BY p.batch, p.user_code, event_row""",
            {"first": first_day, "last": last_day},
        )
        stage_anchors(con, tables, False, first_day, last_day)

    return staged_groups(
        con,
        engine,
        stage,
        lambda b: {
            # a user's candidates in the events' own order, as the whole-range code scored them
            "candidates": batch_rows(
                CANDIDATES_TABLE,
                "day, request_id, user_id, item_id, exposed, user_code, item_row",
                b,
                "user_code, event_row",
            ),
            "anchors": batch_rows(ANCHORS_TABLE, "user_code, anchor_id, vector", b, "anchor_row"),
        },
    )


# ---- step 4: pseudo-labels ----------------------------------------------------------------------


def pseudo_label_days(
    warehouse: Warehouse,
    days: Sequence[date],
    generator: AnchorGenerator,
    encoder_id: str,
    settings: StageSettings,
    *,
    run_id: str | None = None,
    tables: StageTables = MAIN,
    engine: Engine | None = None,
    sample_rows: int = 50_000,
) -> LabelsResult:
    """Pseudo-label every unexposed candidate of ``days`` (GPL steps 3-4), in batches of users
    (:func:`label_batch`).

    Users without a positive history have nothing personal to match: by default (``no_history``
    "none") their candidates get no pseudo-labels; "population" labels them through a calibration
    of their own (fitted on exposed candidates of users without history). A day whose personalized
    calibration carries no ranking in either pooling (:func:`drop_degenerate_days`) gets no labels, with
    the reason in the result's gaps, instead of constant labels.

    The result holds the statistics of the labels written and a hash sample of at most ``sample_rows``
    of them (for plots)."""
    days = sorted(set(days))
    signature = generator.lineage_signature()
    require_days(warehouse, tables.similarities, days, "pseudo-labelling")
    require_days(warehouse, tables.embeddings, days, "pseudo-labelling")
    engine = engine or LocalEngine()
    calibrations, labelled_days = day_calibrations(
        warehouse,
        days,
        settings.first_day,
        settings.calibration,
        encoder_id,
        signature,
        settings.artifacts_dir,
        tables,
        settings.segments,
    )
    with warehouse.transaction() as con:
        engine.configure(con)
        con.register("_days", days_param(days))
        check_anchor_lineage(con, tables, encoder_id, signature)
        n_unexposed = con.execute(f"SELECT count(*) FROM events WHERE NOT exposed AND {IN_DAYS}").fetchall()[0][0]
        stage_item_rows(con, encoder_id)
        _, item_vectors = load_item_embeddings(con, encoder_id)
        con.register("_days", days_param(labelled_days))  # from here on: the days with a calibration
        n_batches = plan_user_batches(
            con,
            f"SELECT day, user_id, count(*) AS n FROM {tables.similarities} WHERE NOT exposed AND anchor_id IS "
            f"NOT NULL AND {IN_DAYS} GROUP BY day, user_id",
            engine.streaming.batch_candidates,
        )
        context = LabelContext(
            item_vectors,
            {key: cal for key, cal in calibrations.items() if key[0] in labelled_days},
            settings.segments,
            settings.confidence,
            generator.tokens_per_anchor,
            generator.backend,
        )
        staged = labelling_inputs(con, tables, engine, settings.label_history_items)
        con.register("_days", days_param(days))
        warehouse.clear_partitions(tables.labels, days, con)
        write_labels(
            con,
            engine,
            BatchJob("pseudo_labels", label_batch, context, staged),
            n_batches,
            tables,
            generator,
            encoder_id,
        )
        degenerate = drop_degenerate_days(con, tables, labelled_days, calibrations, settings.calibration.min_label_std)
        warehouse.record_partitions(tables.labels, days, con, run_id)
        distribution = label_distribution(con, tables, sample_rows)
        gaps = label_gaps(con, tables, days, labelled_days, settings.no_history, degenerate)
    return LabelsResult(
        unexposed_candidates=int(n_unexposed),
        gaps=gaps,
        distribution=distribution,
        calibration_versions=calibration_versions(calibrations),
        batches=n_batches,
        staged_groups=staged.groups,
        engine=engine.name,
    )


def labelling_inputs(con, tables: StageTables, engine: Engine, history_items: int) -> StagedGroups:
    """The inputs of a labelling batch, staged a group at a time: its unexposed candidates with their
    arg-max anchor, its users' anchors (with the generation metadata) and their first ``history_items``
    history items. Similarities whose anchor no longer exists are refused."""

    def stage(first_day: date, last_day: date) -> None:
        in_group = {"first": first_day, "last": last_day}
        stage_anchors(con, tables, True, first_day, last_day)
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {CANDIDATES_TABLE} AS
            SELECT p.batch, p.user_code, s.day, s.request_id, s.user_id, s.item_id, e.event_time,
                   s.similarity_max, s.similarity_mean, s.anchor_id, a.anchor_row
            FROM {tables.similarities} s JOIN {GROUP_TABLE} p USING (day, user_id)
            JOIN events e USING (day, request_id, item_id)
            LEFT JOIN {ANCHORS_TABLE} a ON a.batch = p.batch AND a.day = s.day AND a.anchor_id = s.anchor_id
            WHERE NOT s.exposed AND s.anchor_id IS NOT NULL AND s.day BETWEEN $first AND $last
                  AND e.day BETWEEN $first AND $last
            ORDER BY p.batch, p.user_code, s.request_id, s.item_id""",
            in_group,
        )
        stale = con.execute(f"SELECT count(*), min(day) FROM {CANDIDATES_TABLE} WHERE anchor_row IS NULL").fetchall()[0]
        if stale[0]:
            raise MissingUpstreamDays(
                f"{stale[0]} candidate similarities (first day {stale[1]}) point at anchors that no longer "
                f"exist: re-materialize {tables.similarities} after {tables.anchors}"
            )
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE {HISTORY_TABLE} AS
            SELECT p.batch, p.user_code, i.item_row, h.position FROM (
                SELECT day, user_id, unnest(ids) AS item_id, unnest(range(len(ids))) AS position
                FROM (SELECT day, user_id, history_item_ids[1:{int(history_items)}] AS ids
                      FROM user_histories WHERE day BETWEEN $first AND $last)) h
            JOIN {GROUP_TABLE} p USING (day, user_id) JOIN {ITEMS_TABLE} i USING (item_id)
            ORDER BY p.batch, p.user_code, h.position""",
            in_group,
        )

    return staged_groups(
        con,
        engine,
        stage,
        lambda b: {
            "candidates": batch_rows(
                CANDIDATES_TABLE, ", ".join(LABEL_COLUMNS) + ", anchor_row", b, "user_code, request_id, item_id"
            ),
            "anchors": batch_rows(
                ANCHORS_TABLE,
                "user_code, anchor_row, gen_prob, is_fallback, fallback_reason, model_id, vector",
                b,
                "anchor_row",
            ),
            "histories": batch_rows(HISTORY_TABLE, "user_code, item_row", b, "user_code, position"),
        },
    )


def write_labels(
    con, engine: Engine, job: BatchJob, n_batches: int, tables: StageTables, generator: AnchorGenerator, encoder_id: str
) -> None:
    """Run the labelling batches and insert each one's labels, with the versions of prompt and encoder."""
    versions = f"{quote_literal(generator.prompt_version or 'none')}, {quote_literal(encoder_id)}"
    for relation in progress_of(engine.run(con, job, range(n_batches)), n_batches, "pseudo-labels"):
        insert_batch(
            relation,
            f"INSERT INTO {tables.labels} ({', '.join(LABEL_OUTPUT)}, prompt_version, encoder_version) "
            f"SELECT {', '.join(LABEL_OUTPUT)}, {versions} FROM {BATCH_OUTPUT}",
        )
