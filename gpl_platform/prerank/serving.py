"""Pre-rank scoring for downstream rankers: user id + recalled candidate ids -> scores, fast.

The inputs are the model's feature service's (``prerank_v2``...), computed with the functions Feast's
on-demand views run (:mod:`gpl_platform.features.derived`) from the stored features Feast's public
``get_online_features`` returns, so a candidate scores exactly as training saw it at the same
feature time (``tests/prerank/test_scoring_service.py`` compares with ``get_historical_features``).

Latency: the item side of the inputs (every catalog item's ``i_*`` inputs, its content embedding
for the cosine, and for ``two_tower`` its item-tower vector) is computed once per materialization
and kept in memory (:class:`ItemSide`, keyed by the item views' materialization intervals in the
registry); a request reads only the user's stored features.

Freshness: after reading the user's row, every request checks the store's materialization stamp
(``stat`` calls, :meth:`FeastStore.materialization_stamp`); when it changed, the registry's key
is read and, if a newer materialization was recorded, the item side is rebuilt before the request is
scored. So a response never pairs a user row with an item side older than the last materialization
recorded when that row was read (the request that sees a new materialization first waits for the
rebuild, once per materialization).

Unknown item ids get the contract's defaults (``i_known = 0``) and are reported; ids outside an
id-shape model's vocabulary score through its out-of-vocabulary row and are reported too, never an
error. The model reads an unknown user's or item's inputs as the training mean (``u_known``/``i_known``
0: :mod:`gpl_platform.prerank.inputs`), so an unknown item scores inside the catalog's range for the
user, not above or below every item, and an unknown user's candidates are ranked by their item inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from gpl_platform.features import derived
from gpl_platform.features.schema import (
    EMB,
    EMBEDDING_DIM,
    ENTITY_KEYS,
    FLOAT,
    INPUT_PREFIX,
    INT,
    KNOWN_FLAGS,
    USER_ITEM_COSINE,
    input_name,
)
from gpl_platform.features.serving import decode_values, matrix_columns
from gpl_platform.prerank.inputs import IdVocabulary
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
        self.entity_features = {
            e: [(n, t) for n, t in self.features if n.startswith(INPUT_PREFIX[e])] for e in ENTITY_KEYS
        }

    def stored(self, entity: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """``{stored feature: values}`` of ``ids`` (None where the online store has no value)."""
        if not self.refs[entity] or not len(ids):
            return {name: np.full(len(ids), None, dtype=object) for name in self.types[entity]}
        response = self.store.store.get_online_features(
            features=self.refs[entity], entity_rows={ENTITY_KEYS[entity]: list(ids)}
        )
        return decode_values(response.proto, self.types[entity])

    def inputs(self, entity: str, ids: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """``({input: (n,) or (n, dim)}, the embeddings the cosine reads (n, dim), known (n,) bool)``."""
        stored = self.stored(entity, ids)
        columns = {**derived.entity_input_columns(stored, entity), **derived.known_flag_columns(stored)}
        values = {}
        for name, dtype in self.entity_features[entity]:
            if dtype == EMB:
                values[name] = derived.stack_embeddings(columns[name])
            elif dtype in (INT, FLOAT):
                values[name] = columns[name]
        cos_source = COSINE_INPUTS[entity]
        vectors = (
            derived.stack_embeddings(stored[cos_source])
            if cos_source in stored
            else np.zeros((len(ids), EMBEDDING_DIM), np.float32)
        )
        flag = input_name(KNOWN_FLAGS[entity])
        known = columns[flag] if flag in columns else np.ones(len(ids), np.int64)
        return values, vectors, np.asarray(known).astype(bool)


@dataclass
class Layout:
    """Where each input sits in the model matrix: user, item and cosine column positions."""

    columns: list[str]
    user_pos: np.ndarray
    item_pos: np.ndarray
    cosine_pos: int | None

    @classmethod
    def of(cls, features: Sequence[tuple[str, str]]) -> Layout:
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

    @cached_property
    def user_runs(self) -> list[tuple[slice, slice]]:
        """``(matrix columns, user block columns)`` of each contiguous run of user positions (copies by
        slice are several times faster than by an index array)."""
        runs, start = [], 0
        for k in range(1, len(self.user_pos) + 1):
            if k == len(self.user_pos) or self.user_pos[k] != self.user_pos[k - 1] + 1:
                runs.append((slice(int(self.user_pos[start]), int(self.user_pos[k - 1]) + 1), slice(start, k)))
                start = k
        return runs

    def block(self, values: dict[str, np.ndarray], features: Sequence[tuple[str, str]], n: int) -> np.ndarray:
        """The entity's inputs side by side, in the order of their positions."""
        parts = [values[name].reshape(n, -1) for name, dtype in features if name in values]
        return np.hstack(parts).astype(np.float32) if parts else np.zeros((n, 0), np.float32)


@dataclass
class ItemSide:
    """The item side of the inputs for a set of items; row ``len(ids)`` is the unknown item (defaults)."""

    ids: list[str]
    full: np.ndarray  # float32 (n + 1, n_columns): item inputs in place, zeros elsewhere
    content: np.ndarray  # float64 (n + 1, dim): item content embeddings for the cosine
    known: np.ndarray  # bool (n + 1,)
    version: dict = field(default_factory=dict)
    built_s: float = 0.0
    vocab_rows: np.ndarray | None = None  # id shapes: the model's vocabulary row of each item (the last: OOV)
    tower: ItemVectors | None = None  # two_tower: item vectors of ``ids``
    scalars: np.ndarray | None = None  # mlp, cold: the model's scalar columns of each row
    projection: torch.Tensor | None = None  # mlp, cold: each row's item content projection

    def __post_init__(self) -> None:
        self.position = {item: k for k, item in enumerate(self.ids)}

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Row of each id; ids not in the store get the unknown row ``len(ids)``."""
        get, unknown = self.position.get, len(self.ids)
        return np.fromiter((get(i, unknown) for i in item_ids), dtype=np.int64, count=len(item_ids))


def build_item_side(reader: InputReader, layout: Layout, ids: Sequence[str], version: dict | None = None) -> ItemSide:
    began = time.perf_counter()
    ids = list(ids)
    values, content, known = reader.inputs("item", ids + ["\x00unknown-item"])  # the last row: defaults
    full = np.zeros((len(ids) + 1, len(layout.columns)), np.float32)
    full[:, layout.item_pos] = layout.block(values, reader.entity_features["item"], len(ids) + 1)
    known[-1] = False
    return ItemSide(ids, full, content.astype(np.float64), known, version or {}, time.perf_counter() - began)


@dataclass
class ScoredCandidates:
    item_ids: list[str]
    scores: np.ndarray
    unknown_user: bool  # not in the catalog: user inputs are defaults (u_known = 0)
    unknown_items: list[str]  # not in the catalog: item inputs are defaults (i_known = 0)
    out_of_vocabulary_user: bool = False  # id shapes: the user scored through the OOV embedding
    out_of_vocabulary_items: list[str] = field(default_factory=list)
    model_version: str = ""
    feature_service: str = ""
    features_version: dict = field(default_factory=dict)


@dataclass
class _Request:
    """One request's ids, rows and user inputs."""

    user_id: str
    item_ids: list[str]
    items: ItemSide
    rows: np.ndarray
    user_block: np.ndarray  # float32 (n_user_columns,)
    user_history: np.ndarray  # float32 (1, dim)
    user_known: bool


class PreRankScorer:
    """Scores one user's candidates with a saved pre-ranker of any shape.

    ``cache_items=True`` keeps the item side in memory and :meth:`score` keeps it current (see the
    module's "Freshness"; :meth:`refresh_items` rebuilds it on demand); ``registry_store``: another
    FeastStore of the same settings to read the registry and the items with, so that rebuilds never
    touch ``store``, the one requests read users with. ``False`` reads the candidates' stored
    features per request.
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
        scalar_idx = np.asarray(self.model.layout.scalar_idx, np.int64)
        self._scalar_idx = scalar_idx
        self._user_slots = np.flatnonzero(np.isin(scalar_idx, self.layout.user_pos))
        self._cosine_slot = (
            int(np.flatnonzero(scalar_idx == self.layout.cosine_pos)[0]) if self.layout.cosine_pos is not None else None
        )
        self.cache_items = cache_items
        self.registry_store = registry_store or store
        self._stamp = None  # the materialization stamp the item side was checked against
        self.refreshes_on_request = 0  # item sides rebuilt because a request saw a newer materialization
        self.refresh_errors_on_request = 0
        self.items: ItemSide | None = None
        if cache_items:
            self.refresh_items()

    # ---- the item side -------------------------------------------------------------------
    def refresh_items(self, store=None, force: bool = False, _if_stamp_changed: bool = False) -> bool:
        """Rebuild the item side when the item views' materialization changed; True when it did.

        ``store``: the Feast store to read the registry with (default ``registry_store``)."""
        store = store or self.registry_store
        with store.lock:
            stamp = store.materialization_stamp()  # before the key: a later materialization changes it again
            if _if_stamp_changed and stamp == self._stamp:
                return False  # another request rebuilt it while this one waited
            key = store.materialization_key(ITEM_VIEWS)
            version = materialization_version(key)
            if not force and self.items is not None and self.items.version.get("id") == version["id"]:
                self._stamp = stamp
                return False
            reader = self.reader if store is self.store else InputReader(store, self.service)
            items = self._prepared(build_item_side(reader, self.layout, catalog_item_ids(store), version))
            self.items = items  # one assignment: a request sees the old side or the new one, whole
            self._stamp = stamp
            log.info(
                "item side rebuilt: %d items, materialization %s (through %s), %.2fs",
                len(items.ids),
                version["id"],
                version["through"],
                items.built_s,
            )
            return True

    def current_items(self) -> ItemSide:
        """The item side of the newest recorded materialization (checked by its stamp on each call).

        A rebuild that fails (say, a source file half-deleted) is logged and counted and the request
        scored on the side in use (its ``features_version`` says which): one failure must not fail every
        request; :meth:`refresh_items` (the service's poll) retries."""
        stamp = self.registry_store.materialization_stamp()
        if stamp != self._stamp:
            try:
                if self.refresh_items(_if_stamp_changed=True):
                    self.refreshes_on_request += 1
            except Exception as exc:
                self._stamp = stamp
                self.refresh_errors_on_request += 1
                log.error(
                    "item side rebuild for a newer materialization failed; still serving %s: %s",
                    self.items.version,
                    exc,
                )
        return self.items

    def _prepared(self, items: ItemSide) -> ItemSide:
        """What the model can compute once per item: vocabulary rows, and the two-tower item vectors."""
        if self.model.uses_ids:
            items.vocab_rows = np.append(self.model.item_vocab.rows(items.ids), IdVocabulary.OOV_ROW)
        if isinstance(self.model, TwoTowerPreRanker):
            if items.ids:
                items.tower = self.model.item_vectors(items.full[:-1], items.ids)
            return items
        items.scalars = np.ascontiguousarray(items.full[:, self._scalar_idx])
        with torch.no_grad():
            self.model.eval()
            items.projection = self.model.inputs.item_content(torch.from_numpy(items.full))
        return items

    # ---- scoring ---------------------------------------------------------------------------
    def _request(self, user_id, item_ids) -> _Request:
        user_id, item_ids = str(user_id), [str(i) for i in item_ids]
        user_values, user_history, user_known = self.reader.inputs("user", [user_id])
        # the items after the user: the check sees every materialization recorded before the user's row was read
        items = (
            self.current_items()
            if self.cache_items
            else self._prepared(build_item_side(self.reader, self.layout, list(dict.fromkeys(item_ids))))
        )
        user_block = self.layout.block(user_values, self.reader.entity_features["user"], 1)[0]
        return _Request(user_id, item_ids, items, items.rows(item_ids), user_block, user_history, bool(user_known[0]))

    def _matrix(self, req: _Request, rows: np.ndarray) -> np.ndarray:
        x = req.items.full[rows]  # a fresh copy with the item inputs in place
        for columns, part in self.layout.user_runs:
            x[:, columns] = req.user_block[part]
        if self.layout.cosine_pos is not None:
            x[:, self.layout.cosine_pos] = derived.cosine(req.user_history, req.items.content[rows])
        return x

    def matrix(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        """The float32 input matrix of a request (what training reads for the same rows)."""
        req = self._request(user_id, item_ids)
        return self._matrix(req, req.rows)

    def score(self, user_id: str, item_ids: Sequence[str]) -> ScoredCandidates:
        req = self._request(user_id, item_ids)
        items, rows, n = req.items, req.rows, len(req.item_ids)
        scored = ScoredCandidates(
            req.item_ids,
            np.zeros(0, np.float32),
            not req.user_known,
            [req.item_ids[k] for k in np.flatnonzero(~items.known[rows])],
            model_version=self.model_version,
            feature_service=self.service,
            features_version=dict(items.version),
        )
        scored.unknown_items = list(dict.fromkeys(scored.unknown_items))
        if n == 0:
            return scored
        if not self.model.uses_ids:
            scored.scores = self._dense(req, rows)
            return scored
        user_rows = torch.from_numpy(self.model.user_vocab.rows([req.user_id]))
        item_rows = items.vocab_rows[rows]
        outside = np.flatnonzero(rows == len(items.ids))  # not in the store: their own vocabulary rows
        if len(outside):
            item_rows[outside] = self.model.item_vocab.rows([req.item_ids[k] for k in outside])
        scored.out_of_vocabulary_user = bool(user_rows[0] == IdVocabulary.OOV_ROW)
        scored.out_of_vocabulary_items = list(
            dict.fromkeys(req.item_ids[k] for k in np.flatnonzero(item_rows == IdVocabulary.OOV_ROW))
        )
        if items.tower is None:
            scored.scores = self._dense(req, rows, user_rows.expand(n), torch.from_numpy(item_rows))
        else:
            scored.scores = self._two_tower(req, rows, user_rows, item_rows, outside)
        return scored

    @torch.no_grad()
    def _dense(self, req: _Request, rows: np.ndarray, user_rows=None, item_rows=None) -> np.ndarray:
        """mlp and cold: the dense inputs from their parts, the user's history projected once and the
        items' content projections from the item side (the model's ``all_inputs``, without the
        (n, n_columns) matrix)."""
        inputs, items = self.model.inputs, req.items
        x_user = self._matrix(req, rows[:1]) if len(rows) else None
        raw = items.scalars[rows]
        raw[:, self._user_slots] = x_user[0, self._scalar_idx[self._user_slots]]
        if self._cosine_slot is not None:
            raw[:, self._cosine_slot] = derived.cosine(req.user_history, items.content[rows])
        user = inputs.user_history(torch.from_numpy(x_user))
        item = items.projection[torch.from_numpy(rows)] if items.projection is not None else None
        dense = inputs.assemble(inputs.standardize(torch.from_numpy(raw)), user, item)
        return torch.sigmoid(self.model.logits(dense, user_rows, item_rows)).numpy()

    @torch.no_grad()
    def _two_tower(self, req: _Request, rows, user_rows, item_rows, outside) -> np.ndarray:
        """Only the user tower per request: item vectors come from the item side."""
        items = req.items
        vectors = items.tower.vectors[np.minimum(rows, len(items.ids) - 1)]
        offsets = items.tower.logit_offset[np.minimum(rows, len(items.ids) - 1)]
        if len(outside):  # the item tower on the default inputs of ids the store does not have
            extra = self.model.item_vectors(items.full[rows[outside]], [req.item_ids[k] for k in outside])
            vectors[outside], offsets[outside] = extra.vectors, extra.logit_offset
        x_user = self._matrix(req, rows[:1])
        user = self.model.user_vectors(torch.from_numpy(x_user), user_rows).numpy()[0]
        return torch.sigmoid(torch.from_numpy(vectors @ user + offsets)).numpy()
