"""The derived model inputs, defined once: the functions Feast's on-demand feature views run.

``feature_repo/definitions.py`` declares four on-demand feature views whose function bodies call
these, so ``get_historical_features`` (training), ``get_online_features`` (the Python client) and
``feast serve`` (HTTP) all compute the inputs with this code; the scoring service calls the same
functions on the stored features it reads (``gpl_platform.prerank.serving``).

* :func:`entity_inputs`: ``user_x`` -> ``u_x`` (``item_x`` -> ``i_x``) for every stored feature of
  the entity, a missing value (unknown id, no history, null attribute) replaced by its default
  (:func:`gpl_platform.features.schema.default_value`), typed as declared.
* :func:`known_flags`: ``u_known``/``i_known``, 1 when the id is in the catalog.
* :func:`user_item_cosine`: ``ui_cosine``, the dot product of ``u_history_emb`` and ``i_content_emb``
  (both L2-normalized or zero), in float64.

Each takes the DataFrame Feast hands an on-demand view (short and ``view__feature`` column names,
join keys, other columns) and returns the new columns. The type of a stored feature follows from
its name (:func:`~gpl_platform.features.schema.stored_type`), so nothing here depends on the data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gpl_platform.features.schema import (
    EMB,
    EMBEDDING_DIM,
    FLOAT,
    INT,
    KNOWN_FLAGS,
    STORED_PREFIX,
    USER_ITEM_COSINE,
    default_value,
    input_name,
    stored_type,
)


def _missing(values: pd.Series) -> np.ndarray:
    # embeddings arrive as arrays/lists (present) or None/NaN (missing); pd.isna on an array is elementwise
    return np.fromiter((v is None or (isinstance(v, float) and v != v) for v in values), dtype=bool,
                       count=len(values))


def fill_missing(values: pd.Series, stored: str) -> pd.Series:
    """The stored feature ``stored`` as a model input: missing values get the default, declared dtype."""
    dtype = stored_type(stored)
    default = default_value(stored, dtype)
    if dtype == EMB:
        missing = _missing(values)
        out = np.empty(len(values), dtype=object)
        for k, (v, m) in enumerate(zip(values, missing)):
            out[k] = default if m else np.asarray(v, dtype=np.float32)
        return pd.Series(out, index=values.index)
    if dtype in (INT, FLOAT):
        numeric = pd.to_numeric(values, errors="coerce").fillna(default)
        return numeric.astype("int64" if dtype == INT else "float64")
    return values.map(lambda v: default if v is None or (isinstance(v, float) and v != v) else str(v)).astype(object)


def entity_inputs(features: pd.DataFrame, entity: str) -> pd.DataFrame:
    """``u_*`` (``entity="user"``) or ``i_*`` inputs of the entity's stored features in ``features``
    (every stored feature except the known flag, which :func:`known_flags` turns into its input)."""
    prefix, flag = STORED_PREFIX[entity], KNOWN_FLAGS[entity]
    out = {}
    for column in features.columns:
        if not column.startswith(prefix) or column == flag or stored_type(column) is None:
            continue
        out[input_name(column)] = fill_missing(features[column], column)
    return pd.DataFrame(out, index=features.index)


def known_flags(features: pd.DataFrame) -> pd.DataFrame:
    """``u_known``/``i_known``: 1 when the profile view has the id (every catalog id has a row), else 0."""
    return pd.DataFrame({input_name(flag): fill_missing(features[flag], flag)
                         for flag in KNOWN_FLAGS.values() if flag in features.columns}, index=features.index)


def stack_embeddings(values, dim: int = EMBEDDING_DIM) -> np.ndarray:
    """(n, dim) float32 matrix of an embedding column; missing rows are zeros."""
    values = list(values)
    out = np.zeros((len(values), dim), dtype=np.float32)
    for k, v in enumerate(values):
        if v is not None and not (isinstance(v, float) and v != v):
            out[k] = np.asarray(v, dtype=np.float32)
    return out


def cosine(user_history: np.ndarray, item_content: np.ndarray) -> np.ndarray:
    """Row-wise dot product in float64 of two (n, dim) matrices (the vectors are unit or zero)."""
    return np.einsum("ij,ij->i", user_history.astype(np.float64), item_content.astype(np.float64))


def user_item_cosine(features: pd.DataFrame) -> pd.DataFrame:
    """``ui_cosine`` of each row: user history embedding . item content embedding (0 when either is missing)."""
    user = stack_embeddings(features["user_history_emb"])
    item = stack_embeddings(features["item_content_emb"])
    return pd.DataFrame({USER_ITEM_COSINE: cosine(user, item)}, index=features.index)
