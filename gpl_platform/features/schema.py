"""What the feature store holds: views, features, types, defaults. Plain Python (no Feast import).

Five feature views, two entities (``user`` -> ``user_id``, ``item`` -> ``item_id``):

* ``user_activity`` (daily snapshot, every user of the catalog): counts and click rates from the
  events strictly before the day.
* ``user_history`` (sparse: a row on day D only for users whose click history changed, i.e. who
  clicked on D-1): the mean content embedding of the most recent clicked items.
* ``item_activity`` (daily snapshot, every item): exposure/click counts, CTR, popularity bucket,
  long-tail flag.
* ``user_profile`` / ``item_profile`` (static, one file, timestamp 1970-01-01): the source's
  attribute columns, and for items the content embedding.

A row's ``event_timestamp`` is the start (00:00 UTC) of the day it describes and it only uses
events of earlier days, so a point-in-time join can never see the day's own events.

The attribute columns differ by source (MovieLens: age/gender/...; simulator: age/country), so the
exact schema is a :class:`FeatureSpec` derived from the warehouse tables and saved as JSON next to
the registry; the Feast definitions are built from it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROJECT = "gpl"
EMBEDDING_DIM = 384
STATIC_TIMESTAMP = "1970-01-01T00:00:00+00:00"
TIMESTAMP_FIELD = "event_timestamp"

# Feast dtype names used in specs: Int64, Float64, Float32, String, Array(Float32)
INT, FLOAT, STR, EMB = "Int64", "Float64", "String", "Array(Float32)"

USER_ACTIVITY: dict[str, str] = {
    "u_requests": INT,            # requests before the day
    "u_exposures": INT,           # exposed candidates before the day
    "u_clicks": INT,              # clicks before the day (= history length before truncation)
    "u_click_rate": FLOAT,        # clicks / exposures (0 without exposures)
    "u_click_rate_smoothed": FLOAT,  # (clicks + k*g) / (exposures + k), g = global CTR before the day
    "u_exposures_7d": INT,        # exposures in the 7 days before the day
    "u_clicks_7d": INT,
    "u_active_days": INT,         # days with at least one request before the day
    "u_days_since_last_request": INT,  # -1 when never
}
USER_HISTORY: dict[str, str] = {
    "u_history_emb": EMB,         # L2-normalized mean of the recent clicked items' content embeddings
    "u_history_emb_n": INT,       # clicked items that went into it (0 = no history / no embeddings)
}
ITEM_ACTIVITY: dict[str, str] = {
    "i_candidates": INT,          # times recalled as a candidate before the day
    "i_exposures": INT,
    "i_clicks": INT,
    "i_ctr": FLOAT,               # clicks / exposures (0 without exposures)
    "i_ctr_smoothed": FLOAT,
    "i_exposures_7d": INT,
    "i_clicks_7d": INT,
    "i_popularity_bucket": INT,   # 0..9: decile of exposures before the day among catalog items (9 = most)
    "i_long_tail": INT,           # 1 unless in the smallest head set holding 80% of exposures before the day
}
ITEM_CONTENT: dict[str, str] = {
    "i_content_emb": EMB,         # item text embedding (table item_embeddings), zeros when missing
    "i_has_content_emb": INT,
}
SMOOTHING_STRENGTH = 10.0
WINDOW_DAYS = 7
LONG_TAIL_HEAD_SHARE = 0.8


def _safe(name: str) -> str:
    out = re.sub(r"[^0-9a-zA-Z_]", "_", str(name)).strip("_").lower()
    return out or "col"


def attribute_type(duckdb_type: str) -> str:
    """Feast dtype name for a DuckDB column type of an attribute."""
    t = duckdb_type.upper()
    if t in ("BOOLEAN",) or re.fullmatch(r"U?(TINY|SMALL|BIG|HUGE)?INT(EGER)?|INTEGER|UBIGINT|UINTEGER", t):
        return INT
    if t in ("FLOAT", "DOUBLE", "REAL") or t.startswith("DECIMAL"):
        return FLOAT
    return STR


@dataclass(frozen=True)
class FeatureSpec:
    """The concrete schema: attribute columns of the source (``{feature_name: (column, dtype)}``)."""

    user_attributes: dict[str, tuple[str, str]] = field(default_factory=dict)
    item_attributes: dict[str, tuple[str, str]] = field(default_factory=dict)
    embedding_dim: int = EMBEDDING_DIM

    # ---- views ---------------------------------------------------------------------------
    def views(self) -> dict[str, dict]:
        """``{view: {"entity": user|item, "kind": snapshot|sparse|static, "features": {name: dtype}}}``."""
        return {
            "user_activity": {"entity": "user", "kind": "snapshot", "features": dict(USER_ACTIVITY)},
            "user_history": {"entity": "user", "kind": "sparse", "features": dict(USER_HISTORY)},
            "user_profile": {"entity": "user", "kind": "static",
                             "features": {n: t for n, (_, t) in self.user_attributes.items()}},
            "item_activity": {"entity": "item", "kind": "snapshot", "features": dict(ITEM_ACTIVITY)},
            "item_profile": {"entity": "item", "kind": "static",
                             "features": {**ITEM_CONTENT, **{n: t for n, (_, t) in self.item_attributes.items()}}},
        }

    def feature_types(self) -> dict[str, str]:
        return {n: t for v in self.views().values() for n, t in v["features"].items()}

    def entity_features(self, entity: str) -> dict[str, str]:
        return {n: t for v in self.views().values() if v["entity"] == entity for n, t in v["features"].items()}

    # ---- identity ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        raw = json.loads(text)
        return cls(user_attributes={k: tuple(v) for k, v in raw["user_attributes"].items()},
                   item_attributes={k: tuple(v) for k, v in raw["item_attributes"].items()},
                   embedding_dim=int(raw["embedding_dim"]))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "FeatureSpec":
        return cls.from_json(path.read_text())

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def spec_from_columns(user_columns: dict[str, str], item_columns: dict[str, str],
                      embedding_dim: int = EMBEDDING_DIM) -> FeatureSpec:
    """Build the spec from ``{column: duckdb_type}`` of the users and items tables.

    ``item_id``/``user_id`` are keys and ``text`` is represented by the content embedding.
    """
    users = {f"u_attr_{_safe(c)}": (c, attribute_type(t)) for c, t in user_columns.items() if c != "user_id"}
    items = {f"i_attr_{_safe(c)}": (c, attribute_type(t)) for c, t in item_columns.items()
             if c not in ("item_id", "text")}
    return FeatureSpec(user_attributes=users, item_attributes=items, embedding_dim=embedding_dim)


# ---- defaults for missing values (unknown ids, no history) --------------------------------
# Defaults whose meaning differs from "zero": never seen -> -1 days, unknown item -> long tail.
DEFAULT_OVERRIDES: dict[str, object] = {"u_days_since_last_request": -1, "i_long_tail": 1}


def default_value(name: str, dtype: str, dim: int):
    if name in DEFAULT_OVERRIDES:
        return DEFAULT_OVERRIDES[name]
    if dtype == INT:
        return 0
    if dtype == FLOAT:
        return 0.0
    if dtype == EMB:
        return np.zeros(dim, dtype=np.float32)
    return ""
