"""Model inputs as matrices, and the Python online client.

:func:`feature_matrix` turns a frame of a feature service's inputs (``FeastStore.historical_features``
for training, the online client for serving) into the float32 matrix the pre-ranker reads: numeric
inputs one column each, embeddings expanded as ``name[k]``, strings left out (encoding categories
is the model's business), in the service's order. Training and serving build it with the same code.

:class:`OnlineFeatureClient` asks Feast for a service's inputs with ``get_online_features``: the
same call ``feast serve`` answers over HTTP, on-demand views (defaults, known-id flags, cosine)
included, on whichever online store the settings name. It is the simple, general path; the scoring
service (:mod:`gpl_platform.prerank.serving`) keeps the item side in memory instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from gpl_platform.features.schema import EMB, EMBEDDING_DIM, FLOAT, INT, STR

FieldStatusPresent = 1  # feast.protos.feast.serving.ServingService_pb2.FieldStatus.PRESENT


def matrix_columns(features: Sequence[tuple[str, str]], dim: int = EMBEDDING_DIM) -> list[str]:
    """Column names of the matrix of a service's ``[(feature, dtype)]``."""
    columns = []
    for name, dtype in features:
        if dtype in (INT, FLOAT):
            columns.append(name)
        elif dtype == EMB:
            columns.extend(f"{name}[{k}]" for k in range(dim))
    return columns


def matrix_from_columns(values: dict[str, np.ndarray], features: Sequence[tuple[str, str]], n: int) -> np.ndarray:
    """float32 (n, len(matrix_columns)) from ``{feature: (n,) numbers or (n, dim) embeddings}``."""
    blocks = []
    for name, dtype in features:
        if dtype in (INT, FLOAT):
            blocks.append(np.asarray(values[name], dtype=np.float32).reshape(n, 1))
        elif dtype == EMB:
            blocks.append(np.asarray(values[name], dtype=np.float32).reshape(n, -1))
    if not blocks:
        return np.zeros((n, 0), np.float32)
    return np.ascontiguousarray(np.hstack(blocks), dtype=np.float32)


def feature_matrix(frame: pd.DataFrame, features: Sequence[tuple[str, str]]) -> tuple[np.ndarray, list[str]]:
    """The float32 matrix of a frame holding a service's inputs, and its column names."""
    from gpl_platform.features.derived import stack_embeddings

    values = {
        name: (stack_embeddings(frame[name]) if dtype == EMB else frame[name].to_numpy())
        for name, dtype in features
        if dtype != STR
    }
    return matrix_from_columns(values, features, len(frame)), matrix_columns(features)


@dataclass
class CandidateFeatures:
    """Inputs of one user's candidates: row ``k`` of ``matrix`` and ``frame`` is ``item_ids[k]``."""

    user_id: str
    item_ids: list[str]
    matrix: np.ndarray  # float32 (n_items, len(columns)); string attributes not included
    columns: list[str]
    unknown_user: bool  # user not in the catalog: its inputs are defaults (u_known = 0)
    unknown_items: list[str] = field(default_factory=list)  # distinct ids with default inputs (i_known = 0)
    values: dict = field(default_factory=dict, repr=False)
    features: list = field(default_factory=list, repr=False)

    @cached_property
    def frame(self) -> pd.DataFrame:
        """Typed frame: ``user_id, item_id`` then the service's inputs (as ``historical_features`` gives them)."""
        data = {"user_id": [self.user_id] * len(self.item_ids), "item_id": list(self.item_ids)}
        for name, dtype in self.features:
            col = self.values[name]
            if dtype == EMB:
                obj = np.empty(len(self.item_ids), dtype=object)
                obj[:] = list(col)
                col = obj
            data[name] = col
        return pd.DataFrame(data)


def decode_values(proto, types: dict[str, str]) -> dict[str, np.ndarray]:
    """``{feature: numpy column}`` of a ``GetOnlineFeaturesResponse`` proto (missing values as None)."""
    out = {}
    for name, result in zip(proto.metadata.feature_names.val, proto.results):
        dtype = types.get(name)
        if dtype is None:
            continue
        present = [s == FieldStatusPresent for s in result.statuses]
        out[name] = _column([_value(v, dtype) if ok else None for v, ok in zip(result.values, present)], dtype)
    return out


def _value(v, dtype: str):
    if dtype == EMB:
        return np.asarray(v.float_list_val.val, dtype=np.float32) if v.HasField("float_list_val") else None
    if dtype == INT:
        return v.int64_val if v.HasField("int64_val") else None
    if dtype == FLOAT:
        return v.double_val if v.HasField("double_val") else None
    return v.string_val if v.HasField("string_val") else None


def _column(values: list, dtype: str) -> np.ndarray:
    if dtype == EMB:
        from gpl_platform.features.derived import stack_embeddings

        return stack_embeddings(values)
    if dtype in (INT, FLOAT) and all(v is not None for v in values):
        return np.asarray(values, dtype=np.int64 if dtype == INT else np.float64)
    return np.asarray(values, dtype=object)


class OnlineFeatureClient:
    """A service's inputs for one user and candidate items: ``client.get(user_id, item_ids)``."""

    def __init__(self, store, service: str):
        self.store = store
        self.service = service
        self.features = store.service_features(service)
        self.types = dict(self.features)
        self.columns = matrix_columns(self.features)
        self._service = store.feature_service(service)

    def get(self, user_id: str, item_ids: Sequence[str]) -> CandidateFeatures:
        user_id = str(user_id)
        item_ids = [str(i) for i in item_ids]
        n = len(item_ids)
        if n == 0:
            return CandidateFeatures(
                user_id,
                [],
                np.zeros((0, len(self.columns)), np.float32),
                list(self.columns),
                False,
                [],
                {},
                list(self.features),
            )
        response = self.store.store.get_online_features(
            features=self._service, entity_rows={"user_id": [user_id] * n, "item_id": item_ids}
        )
        values = decode_values(response.proto, self.types)
        matrix = matrix_from_columns(values, self.features, n)
        unknown_user = bool(values["u_known"][0] == 0) if "u_known" in values else False
        unknown_items = (
            [i for i, k in dict(zip(item_ids, values["i_known"])).items() if k == 0] if "i_known" in values else []
        )
        return CandidateFeatures(
            user_id, item_ids, matrix, list(self.columns), unknown_user, unknown_items, values, list(self.features)
        )
