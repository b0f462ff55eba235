"""What the feature store holds and what the pre-ranker reads: names, types, defaults. Plain Python
(no Feast import); ``feature_repo/definitions.py`` declares the Feast objects from these tables.

Two layers of names:

* **Stored features** (``user_*``, ``item_*``): what the Dagster feature assets write to the parquet
  sources and what ``materialize`` loads into the online store, in five feature views:

  - ``user_activity`` (daily snapshot, every catalog user): counts and click rates from the events
    strictly before the day.
  - ``user_history`` (sparse: a row on day D only for users whose click history changed, i.e. who
    clicked on D-1): the mean content embedding of the most recent clicked items.
  - ``item_activity`` (daily snapshot, every item): exposure/click counts, CTR, popularity bucket,
    long-tail flag.
  - ``user_profile`` / ``item_profile`` (static, timestamp 1970-01-01): ``*_known`` (1 for every
    catalog id), the source's attribute columns (``*_num_<column>`` Float64, ``*_cat_<column>``
    String) and, for items, the content embedding.

* **Model inputs** (``u_*``, ``i_*``, ``ui_cosine``): the feature contract every consumer gets
  (training, the Python client, ``feast serve`` over HTTP, the scoring service). ``u_x`` is the
  stored ``user_x`` with its missing value (unknown id, no history, null attribute) replaced by the
  default below; ``u_known``/``i_known`` say whether the id is in the catalog; ``ui_cosine`` is the
  dot product of the user's history embedding and the item's content embedding. They are computed
  by Feast on-demand feature views whose functions live in :mod:`gpl_platform.features.derived`.

A stored row's ``event_timestamp`` is the start (00:00 UTC) of the day it describes and it only uses
events of earlier days, so a point-in-time join can never see the day's own events.

The attribute columns differ by source (MovieLens: age/gender/...; simulator: age/country): they are
the one part of the schema that varies with the data, a :class:`FeatureSpec` derived from the
warehouse tables and saved as ``<data_dir>/feast/profile_attributes.json``, which the feature
repository reads. The embedding size is part of the contract (:data:`EMBEDDING_DIM`): another
encoder size is another contract, hence another feature-service version.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpl_platform.data.contract import attribute_feature_name

PROJECT = "gpl"
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2; the contract's embedding size
STATIC_TIMESTAMP = "1970-01-01T00:00:00+00:00"
TIMESTAMP_FIELD = "event_timestamp"

# Feast dtype names used here: Int64, Float64, String, Array(Float32)
INT, FLOAT, STR, EMB = "Int64", "Float64", "String", "Array(Float32)"

ENTITY_KEYS = {"user": "user_id", "item": "item_id"}
STORED_PREFIX = {"user": "user_", "item": "item_"}
INPUT_PREFIX = {"user": "u_", "item": "i_"}
NUMERIC, CATEGORICAL = "num", "cat"  # attribute kinds: Float64 and String

# ---- stored features per view: {name: (dtype, description)} ---------------------------------
USER_ACTIVITY: dict[str, tuple[str, str]] = {
    "user_requests": (INT, "requests before the day"),
    "user_exposures": (INT, "exposed candidates before the day"),
    "user_clicks": (INT, "clicks before the day (= history length before truncation)"),
    "user_click_rate": (FLOAT, "clicks / exposures (0 without exposures)"),
    "user_click_rate_smoothed": (FLOAT, "(clicks + k*g) / (exposures + k), g = global CTR before the day"),
    "user_exposures_7d": (INT, "exposures in the 7 days before the day"),
    "user_clicks_7d": (INT, "clicks in the 7 days before the day"),
    "user_active_days": (INT, "days with at least one request before the day"),
    "user_days_since_last_request": (INT, "days since the last request (-1 = never)"),
}
USER_HISTORY: dict[str, tuple[str, str]] = {
    "user_history_emb": (EMB, "L2-normalized mean content embedding of the most recent clicked items"),
    "user_history_emb_n": (INT, "clicked items that went into it (0 = no history / no embeddings)"),
}
USER_PROFILE: dict[str, tuple[str, str]] = {
    "user_known": (INT, "1: the user is in the catalog (the users table)"),
}
ITEM_ACTIVITY: dict[str, tuple[str, str]] = {
    "item_candidates": (INT, "times recalled as a candidate before the day"),
    "item_exposures": (INT, "exposures before the day"),
    "item_clicks": (INT, "clicks before the day"),
    "item_ctr": (FLOAT, "clicks / exposures (0 without exposures)"),
    "item_ctr_smoothed": (FLOAT, "(clicks + k*g) / (exposures + k), g = global CTR before the day"),
    "item_exposures_7d": (INT, "exposures in the 7 days before the day"),
    "item_clicks_7d": (INT, "clicks in the 7 days before the day"),
    "item_popularity_bucket": (INT, "0..9: decile of exposures before the day among catalog items (9 = most)"),
    "item_long_tail": (INT, "1 unless in the smallest head set holding 80% of exposures before the day"),
}
ITEM_PROFILE: dict[str, tuple[str, str]] = {
    "item_known": (INT, "1: the item is in the catalog (the items table)"),
    "item_content_emb": (EMB, "item text embedding (table item_embeddings), zeros when missing"),
    "item_has_content_emb": (INT, "1 when the item has a content embedding"),
}
VIEWS: dict[str, tuple[str, str, dict[str, tuple[str, str]]]] = {  # view: (entity, kind, fixed features)
    "user_activity": ("user", "snapshot", USER_ACTIVITY),
    "user_history": ("user", "sparse", USER_HISTORY),
    "user_profile": ("user", "static", USER_PROFILE),
    "item_activity": ("item", "snapshot", ITEM_ACTIVITY),
    "item_profile": ("item", "static", ITEM_PROFILE),
}
KNOWN_FLAGS = {"user": "user_known", "item": "item_known"}
USER_ITEM_COSINE = "ui_cosine"
SMOOTHING_STRENGTH = 10.0
WINDOW_DAYS = 7
LONG_TAIL_HEAD_SHARE = 0.8

# Defaults whose meaning differs from "zero": never seen -> -1 days, unknown item -> long tail.
DEFAULT_OVERRIDES: dict[str, object] = {"user_days_since_last_request": -1, "item_long_tail": 1}


def input_name(stored: str) -> str:
    """The model-input name of a stored feature: ``user_x`` -> ``u_x``, ``item_x`` -> ``i_x``."""
    for entity, prefix in STORED_PREFIX.items():
        if stored.startswith(prefix):
            return INPUT_PREFIX[entity] + stored[len(prefix) :]
    raise ValueError(f"{stored!r} is not a stored feature name (user_* or item_*)")


_FIXED_TYPES = {name: dtype for _, _, features in VIEWS.values() for name, (dtype, _) in features.items()}


def stored_type(name: str) -> str | None:
    """dtype of a stored feature name, or None when the name is not one (join keys, other columns).

    Attribute kinds are part of their names (``*_num_*``, ``*_cat_*``), so the type of every
    stored feature follows from its name alone: the on-demand views need no data-dependent table."""
    if name in _FIXED_TYPES:
        return _FIXED_TYPES[name]
    for prefix in STORED_PREFIX.values():
        if name.startswith(f"{prefix}{NUMERIC}_"):
            return FLOAT
        if name.startswith(f"{prefix}{CATEGORICAL}_"):
            return STR
    return None


def default_value(stored: str, dtype: str, dim: int = EMBEDDING_DIM):
    """The value a missing stored feature takes as a model input."""
    if stored in DEFAULT_OVERRIDES:
        return DEFAULT_OVERRIDES[stored]
    if dtype == INT:
        return 0
    if dtype == FLOAT:
        return 0.0
    if dtype == EMB:
        return np.zeros(dim, dtype=np.float32)
    return ""


def attribute_kind(duckdb_type: str) -> str:
    """``num`` (Float64) for boolean and numeric DuckDB column types, ``cat`` (String) otherwise."""
    t = duckdb_type.upper()
    if (
        t == "BOOLEAN"
        or t in ("FLOAT", "DOUBLE", "REAL")
        or t.startswith("DECIMAL")
        or re.fullmatch(r"U?(TINY|SMALL|BIG|HUGE)?INT(EGER)?|INTEGER|UBIGINT|UINTEGER", t)
    ):
        return NUMERIC
    return CATEGORICAL


class AttributeNameClash(ValueError):
    """Two source columns would become the same feature (``Genre`` and ``genre``)."""


@dataclass(frozen=True)
class FeatureSpec:
    """The part of the schema that varies with the data: attribute columns of the source,
    ``{stored_feature_name: (source column, dtype)}`` per entity."""

    user_attributes: dict[str, tuple[str, str]] = field(default_factory=dict)
    item_attributes: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return EMBEDDING_DIM

    def attributes(self, entity: str) -> dict[str, tuple[str, str]]:
        return self.user_attributes if entity == "user" else self.item_attributes

    # ---- views ---------------------------------------------------------------------------
    def views(self) -> dict[str, dict]:
        """``{view: {"entity": user|item, "kind": snapshot|sparse|static, "features": {name: dtype}}}``."""
        out = {}
        for view, (entity, kind, fixed) in VIEWS.items():
            features = {n: t for n, (t, _) in fixed.items()}
            if kind == "static":
                features.update({n: t for n, (_, t) in self.attributes(entity).items()})
            out[view] = {"entity": entity, "kind": kind, "features": features}
        return out

    def feature_types(self) -> dict[str, str]:
        return {n: t for v in self.views().values() for n, t in v["features"].items()}

    # ---- identity ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        raw = json.loads(text)
        return cls(
            user_attributes={k: tuple(v) for k, v in raw.get("user_attributes", {}).items()},
            item_attributes={k: tuple(v) for k, v in raw.get("item_attributes", {}).items()},
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "_generated_by": "the feast_registry asset from the warehouse users/items "
                    "columns (gpl_platform.features.compute.spec_from_warehouse)",
                    **json.loads(self.to_json()),
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> FeatureSpec:
        return cls.from_json(path.read_text())

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def spec_from_columns(user_columns: dict[str, str], item_columns: dict[str, str]) -> FeatureSpec:
    """Build the spec from ``{column: duckdb_type}`` of the users and items tables.

    ``item_id``/``user_id`` are keys and ``text`` is represented by the content embedding. Two
    columns that normalize to the same name (``Genre``/``genre``, ``gen re``/``gen-re``) are an
    error naming both: silently keeping one would drop the other.
    """

    def attributes(entity: str, columns: dict[str, str], skip: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        seen: dict[str, str] = {}
        for column, duckdb_type in columns.items():
            if column in skip:
                continue
            safe = attribute_feature_name(column)
            if safe in seen:
                raise AttributeNameClash(
                    f"{entity}s columns {seen[safe]!r} and {column!r} both become the feature "
                    f"'{safe}' (names are lower-cased, other characters become '_'): rename one of them"
                )
            seen[safe] = column
            kind = attribute_kind(duckdb_type)
            out[f"{STORED_PREFIX[entity]}{kind}_{safe}"] = (column, FLOAT if kind == NUMERIC else STR)
        return out

    return FeatureSpec(
        user_attributes=attributes("user", user_columns, ("user_id",)),
        item_attributes=attributes("item", item_columns, ("item_id", "text")),
    )
