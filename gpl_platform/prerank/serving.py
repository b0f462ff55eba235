"""Pre-rank scoring for downstream rankers: user id + recalled candidate ids -> scores, fast.

The inputs are the model's feature service's (``prerank_v2``...), computed with the functions Feast's
on-demand views run (:mod:`gpl_platform.features.derived`) from the stored features Feast's public
``get_online_features`` returns, so a candidate scores exactly as training saw it at the same
feature time (``tests/test_scoring_service.py`` compares with ``get_historical_features``).

Latency: the item side of the inputs (every catalog item's ``i_*`` inputs, its content embedding
for the cosine, and for ``two_tower`` its item-tower vector) is computed once per materialization
and kept in memory (:class:`ItemSide`, keyed by the item views' materialization intervals in the
registry); a request reads only the user's stored features. Unknown item ids get the contract's
defaults (``i_known = 0``) and are reported; ids outside an id-shape model's vocabulary score through
its out-of-vocabulary row and are reported too, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.features import derived
from gpl_platform.features.schema import (
    EMB,
    EMBEDDING_DIM,
    ENTITY_KEYS,
    FLOAT,
    INT,
    INPUT_PREFIX,
    KNOWN_FLAGS,
    USER_ITEM_COSINE,
    input_name,
)
from gpl_platform.features.serving import decode_values, matrix_columns
from gpl_platform.prerank.model import ItemVectors, PreRanker, TwoTowerPreRanker

log = logging.getLogger(__name__)
ITEM_VIEWS = ("item_activity", "item_profile")
COSINE_INPUTS = {"user": "user_history_emb", "item": "item_content_emb"}


def catalog_item_ids(store) -> list[str]:
    """Every item id of the ``item_profile`` source (the catalog the online store was materialized from)."""
    import pyarrow.dataset as ds

    folder = store.sources_dir / "item_profile"
    if not any(folder.glob("*.parquet")):
        raise FileNotFoundError(f"{folder}: no item_profile source yet; materialize profile_features first")
    table = ds.dataset(str(folder), format="parquet").to_table(columns=["item_id"])
    return list(dict.fromkeys(table.column("item_id").to_pylist()))


def materialization_version(key: tuple) -> dict:
    """A short id of a materialization key, and the newest materialized end time it holds."""
    ends = [end for _, intervals in key for _, end in intervals]
    return {"id": hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12], "through": max(ends) if ends else None}


class InputReader:
    """A service's inputs of users or items, from their stored features (``get_online_features``)."""

    def __init__(self, store, service: str):
        self.store, self.service = store, service
        self.features = store.service_features(service)
        self.columns = matrix_columns(self.features)
        names = {n for n, _ in self.features}
        views = store.spec().views()
        self.refs: dict[str, list[str]] = {}
        self.types: dict[str, dict[str, str]] = {}
        for entity in ENTITY_KEYS:
            wanted = {}
            for view, info in views.items():
                if info["entity"] != entity:
                    continue
                for stored, dtype in info["features"].items():
                    if input_name(stored) in names or (USER_ITEM_COSINE in names and stored == COSINE_INPUTS[entity]):
                        wanted[stored] = (view, dtype)
            self.refs[entity] = [f"{view}:{stored}" for stored, (view, _) in wanted.items()]
            self.types[entity] = {stored: dtype for stored, (_, dtype) in wanted.items()}
        self.entity_features = {e: [(n, t) for n, t in self.features if n.startswith(INPUT_PREFIX[e])]
                                for e in ENTITY_KEYS}

    def stored(self, entity: str, ids: Sequence[str]) -> pd.DataFrame:
        """The stored features of ``ids`` (None where the online store has no value)."""
        frame = pd.DataFrame({ENTITY_KEYS[entity]: list(ids)})
        if not self.refs[entity] or not len(ids):
            return frame.assign(**{n: pd.Series([None] * len(ids), dtype=object) for n in self.types[entity]})
        response = self.store.store.get_online_features(features=self.refs[entity],
                                                        entity_rows={ENTITY_KEYS[entity]: list(ids)})
        for name, values in decode_values(response.proto, self.types[entity]).items():
            frame[name] = values if np.ndim(values) == 1 else list(values)
        return frame

    def inputs(self, entity: str, ids: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """``({input: (n,) or (n, dim)}, the embeddings the cosine reads (n, dim), known (n,) bool)``."""
        stored = self.stored(entity, ids)
        frame = pd.concat([derived.entity_inputs(stored, entity), derived.known_flags(stored)], axis=1)
        values = {}
        for name, dtype in self.entity_features[entity]:
            if dtype == EMB:
                values[name] = derived.stack_embeddings(frame[name])
            elif dtype in (INT, FLOAT):
                values[name] = frame[name].to_numpy(np.float64)
        cos_source = COSINE_INPUTS[entity]
        vectors = (derived.stack_embeddings(stored[cos_source]) if cos_source in stored
                   else np.zeros((len(ids), EMBEDDING_DIM), np.float32))
        known = frame[input_name(KNOWN_FLAGS[entity])].to_numpy() if input_name(KNOWN_FLAGS[entity]) in frame \
            else np.ones(len(ids), np.int64)
        return values, vectors, known.astype(bool)


@dataclass
class Layout:
    """Where each input sits in the model matrix: user, item and cosine column positions."""

    columns: list[str]
    user_pos: np.ndarray
    item_pos: np.ndarray
    cosine_pos: int | None

    @classmethod
    def of(cls, features: Sequence[tuple[str, str]]) -> "Layout":
        user, item, cos, at = [], [], None, 0
        for name, dtype in features:
            width = EMBEDDING_DIM if dtype == EMB else (1 if dtype in (INT, FLOAT) else 0)
            if name == USER_ITEM_COSINE:
                cos = at
            elif name.startswith(INPUT_PREFIX["user"]):
                user.extend(range(at, at + width))
            else:
                item.extend(range(at, at + width))
            at += width
        return cls(matrix_columns(features), np.array(user, np.int64), np.array(item, np.int64), cos)

    def block(self, values: dict[str, np.ndarray], features: Sequence[tuple[str, str]], n: int) -> np.ndarray:
        """The entity's inputs side by side, in the order of their positions."""
        parts = [values[name].reshape(n, -1) for name, dtype in features if name in values]
        return np.hstack(parts).astype(np.float32) if parts else np.zeros((n, 0), np.float32)


@dataclass
class ItemSide:
    """The item side of the inputs for a set of items; row ``len(ids)`` is the unknown item (defaults)."""

    ids: pd.Index
    matrix: np.ndarray          # float32 (n + 1, len(layout.item_pos))
    content: np.ndarray         # float32 (n + 1, dim): item content embeddings for the cosine
    known: np.ndarray           # bool (n + 1,)
    version: dict = field(default_factory=dict)
    tower: ItemVectors | None = None  # two_tower: item vectors of ``ids``
    built_s: float = 0.0

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        rows = self.ids.get_indexer(pd.Index(list(item_ids)))
        rows[rows < 0] = len(self.ids)
        return rows


def build_item_side(reader: InputReader, layout: Layout, ids: Sequence[str], version: dict | None = None
                    ) -> ItemSide:
    began = time.perf_counter()
    ids = list(ids)
    values, content, known = reader.inputs("item", ids + ["\x00unknown-item"])  # the last row: defaults
    matrix = layout.block(values, reader.entity_features["item"], len(ids) + 1)
    known[-1] = False
    return ItemSide(pd.Index(ids), matrix, content, known, version or {}, built_s=time.perf_counter() - began)


@dataclass
class ScoredCandidates:
    item_ids: list[str]
    scores: np.ndarray
    unknown_user: bool            # not in the catalog: user inputs are defaults (u_known = 0)
    unknown_items: list[str]      # not in the catalog: item inputs are defaults (i_known = 0)
    out_of_vocabulary_user: bool = False  # id shapes: the user scored through the OOV embedding
    out_of_vocabulary_items: list[str] = field(default_factory=list)
    model_version: str = ""
    feature_service: str = ""
    features_version: dict = field(default_factory=dict)


class PreRankScorer:
    """Scores one user's candidates with a saved pre-ranker of any shape.

    ``cache_items=True`` keeps the item side in memory (:meth:`refresh_items` rebuilds it when the
    item views were materialized again; ``registry_store``: another FeastStore of the same settings
    to read the registry and the items with, so a background refresher never touches ``store``);
    ``False`` reads the candidates' stored features per request.
    """

    def __init__(self, model_dir: Path, store, cache_items: bool = True, registry_store=None):
        self.model_dir = Path(model_dir)
        self.model, self.lineage = PreRanker.load(self.model_dir)
        self.model_version = str(self.lineage.get("version") or self.model_dir.name)
        self.service = self.lineage.get("feature_service", "prerank_v2")
        self.store = store
        self.reader = InputReader(store, self.service)
        self.model.layout.check(self.reader.columns)
        self.layout = Layout.of(self.reader.features)
        self.cache_items = cache_items
        self._lock = threading.Lock()
        self.items: ItemSide | None = None
        if cache_items:
            self.refresh_items(registry_store)

    # ---- the item side -------------------------------------------------------------------
    def refresh_items(self, store=None, force: bool = False) -> bool:
        """Rebuild the item side when the item views' materialization changed; True when it did.

        ``store``: the Feast store to read the registry with (a background thread passes its own)."""
        store = store or self.store
        with self._lock:
            key = store.materialization_key(ITEM_VIEWS)
            version = materialization_version(key)
            if not force and self.items is not None and self.items.version.get("id") == version["id"]:
                return False
            reader = self.reader if store is self.store else InputReader(store, self.service)
            items = build_item_side(reader, self.layout, catalog_item_ids(store), version)
            items.tower = self._tower(items)
            self.items = items  # one assignment: a request sees the old side or the new one, whole
            log.info("item side rebuilt: %d items, materialization %s (through %s), %.2fs", len(items.ids),
                     version["id"], version["through"], items.built_s)
            return True

    def _tower(self, items: ItemSide) -> ItemVectors | None:
        if not isinstance(self.model, TwoTowerPreRanker) or not len(items.ids):
            return None
        x = np.zeros((len(items.ids), len(self.layout.columns)), np.float32)
        x[:, self.layout.item_pos] = items.matrix[:-1]
        return self.model.item_vectors(x, list(items.ids))

    # ---- scoring ---------------------------------------------------------------------------
    def _inputs(self, user_id: str, item_ids: list[str]) -> tuple[np.ndarray, ItemSide, np.ndarray, bool]:
        """The model matrix of the request, the item side and rows it used, and whether the user is known."""
        items = self.items if self.cache_items else build_item_side(self.reader, self.layout,
                                                                    list(dict.fromkeys(item_ids)))
        rows = items.rows(item_ids)
        user_values, user_history, user_known = self.reader.inputs("user", [user_id])
        n = len(item_ids)
        x = np.empty((n, len(self.layout.columns)), np.float32)
        x[:, self.layout.user_pos] = self.layout.block(user_values, self.reader.entity_features["user"], 1)
        x[:, self.layout.item_pos] = items.matrix[rows]
        if self.layout.cosine_pos is not None:
            x[:, self.layout.cosine_pos] = derived.cosine(np.broadcast_to(user_history, (n, user_history.shape[1])),
                                                          items.content[rows])
        return x, items, rows, bool(user_known[0])

    def matrix(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        """The float32 input matrix the model scores (the training matrix of the same rows)."""
        return self._inputs(str(user_id), [str(i) for i in item_ids])[0]

    def score(self, user_id: str, item_ids: Sequence[str]) -> ScoredCandidates:
        user_id = str(user_id)
        item_ids = [str(i) for i in item_ids]
        x, items, rows, user_known = self._inputs(user_id, item_ids)
        scores = self._predict(x, user_id, item_ids, items, rows)
        unknown = list(dict.fromkeys(i for i, r in zip(item_ids, rows) if not items.known[r]))
        scored = ScoredCandidates(item_ids, scores, not user_known, unknown, model_version=self.model_version,
                                  feature_service=self.service, features_version=dict(items.version))
        if self.model.uses_ids:
            scored.out_of_vocabulary_user = bool(self.model.user_vocab.unknown([user_id]))
            scored.out_of_vocabulary_items = self.model.item_vocab.unknown(item_ids)
        return scored

    def _predict(self, x: np.ndarray, user_id: str, item_ids: list[str], items: ItemSide, rows: np.ndarray
                 ) -> np.ndarray:
        if items.tower is None or not len(item_ids):
            return self.model.predict(x, [user_id] * len(item_ids), item_ids)
        vectors = np.empty((len(item_ids), items.tower.vectors.shape[1]), np.float32)
        offsets = np.empty(len(item_ids), np.float32)
        cached = rows < len(items.ids)
        vectors[cached], offsets[cached] = items.tower.vectors[rows[cached]], items.tower.logit_offset[rows[cached]]
        if not cached.all():  # ids not in the store: the item tower on their default inputs and their own id rows
            extra = self.model.item_vectors(x[~cached], [i for i, c in zip(item_ids, cached) if not c])
            vectors[~cached], offsets[~cached] = extra.vectors, extra.logit_offset
        subset = ItemVectors(item_ids, vectors, offsets)
        return self.model.predict_with_item_vectors(x[:1], [user_id], subset)[0]
