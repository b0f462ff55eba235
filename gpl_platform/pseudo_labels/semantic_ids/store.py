"""Semantic IDs and SID generators in the warehouse: versioned, rebuilt only when their inputs change.

- ``item_semantic_ids`` (table): one row per item with its codes, its ID string and the RQ-VAE
  decoding of its codes; ``warehouse_meta['item_semantic_ids']`` holds the version, the encoder it
  was built from, the config and the metrics. The RQ-VAE weights are an artifact file.
- ``sid_generators`` (table): one row per trained generator, keyed by (refit day, semantic-ID
  version, config, seed, digest of the training positives); the weights are an artifact file.
  A generator serving day D is trained on positives of days strictly before its refit day R <= D.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gpl_platform.anchor_settings import SID_GENERATION_FIELDS, SemanticIdConfig, SidGeneratorConfig
from gpl_platform.data.warehouse import Warehouse, table_exists
from gpl_platform.pseudo_labels.encoder import load_item_embeddings
from gpl_platform.pseudo_labels.semantic_ids.generator import (
    SidTransformer,
    SidVocabulary,
    TrainedSidGenerator,
    max_tokens,
)
from gpl_platform.pseudo_labels.semantic_ids.generator_training import count_training_targets, train_sid_generator
from gpl_platform.pseudo_labels.semantic_ids.rqvae import fit_semantic_ids, semantic_id_version
from gpl_platform.pseudo_labels.vectors import frame_with_vectors, read_vectors

log = logging.getLogger(__name__)
META_KEY = "item_semantic_ids"
_EPOCH = date(1970, 1, 1)

_GENERATORS_DDL = """
CREATE TABLE IF NOT EXISTS sid_generators (
    fit_key VARCHAR PRIMARY KEY, version VARCHAR NOT NULL, refit_day DATE NOT NULL, sid_version VARCHAR NOT NULL,
    train_end DATE NOT NULL, users BIGINT NOT NULL, positives BIGINT NOT NULL, artifact_path VARCHAR NOT NULL,
    metrics_json VARCHAR NOT NULL, train_seconds DOUBLE, trained_at TIMESTAMPTZ NOT NULL
);
ALTER TABLE sid_generators ADD COLUMN IF NOT EXISTS train_seconds DOUBLE"""


def sid_string(codes) -> str:
    return "-".join(str(int(c)) for c in codes)


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class SemanticIds:
    """The catalog's semantic IDs as loaded for generation."""

    version: str
    encoder_id: str
    item_ids: list[str]
    codes: np.ndarray  # (n, L + 1)
    item_vectors: np.ndarray  # (n, dim) frozen-encoder vectors of the items, L2-normalized
    decoded: np.ndarray  # (n, dim) RQ-VAE decoding of each item's L codes, L2-normalized
    metrics: dict

    def vocabulary(self) -> SidVocabulary:
        return SidVocabulary(self.item_ids, self.codes)

    def anchor_vectors(self, item_rows: np.ndarray, mode: str) -> np.ndarray:
        """Vectors of generated IDs (given as item rows). ``items``: mean embedding of the items sharing
        the ID's L codes (the suffix only tells them apart); ``codebook``: the RQ-VAE decoding of the codes."""
        item_rows = np.asarray(item_rows, dtype=np.int64)
        if mode == "codebook":
            return self.decoded[item_rows]
        if mode != "items":
            raise ValueError(f"anchor vector mode must be 'items' or 'codebook', got {mode!r}")
        prefix = self.codes[:, :-1]
        _, group = np.unique(prefix, axis=0, return_inverse=True)
        group = group.reshape(-1)
        sums = np.zeros((group.max() + 1, self.item_vectors.shape[1]), dtype=np.float64)
        np.add.at(sums, group, self.item_vectors)
        means = sums[group[item_rows]]
        return (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def build_semantic_ids(
    warehouse: Warehouse, encoder_id: str, cfg: SemanticIdConfig, seed: int, artifacts_dir: Path, progress: bool = False
) -> dict:
    """Fit the RQ-VAE on the item embeddings of ``encoder_id`` unless the stored IDs already have this
    version (same encoder, items, vectors, config and seed); return the stored metadata."""
    with warehouse.connect(read_only=True) as con:
        item_ids, vectors = load_item_embeddings(con, encoder_id)
    if len(item_ids) == 0:
        raise ValueError(f"no item embeddings under {encoder_id}: materialize item_embeddings first")
    version = semantic_id_version(encoder_id, item_ids, vectors, cfg, seed)
    current = stored_semantic_id_meta(warehouse)
    if current and current["version"] == version:
        log.info("semantic IDs %s are current: nothing to train", version)
        return {**current, "trained": False}
    fit = fit_semantic_ids(item_ids, vectors, cfg, seed, encoder_id, progress=progress)
    path = Path(artifacts_dir) / "sid" / f"rqvae-{fit.version}.pt"
    _atomic_torch_save(
        {
            "state_dict": fit.state_dict,
            "config": cfg.model_dump(),
            "codebook_size": fit.codebook_size,
            "item_ids": fit.item_ids,
            "codes": fit.codes,
            "encoder_id": encoder_id,
        },
        path,
    )
    frame = pd.DataFrame(
        {
            "item_id": fit.item_ids,
            "sid": [sid_string(c) for c in fit.codes],
            "codes": [list(map(int, c)) for c in fit.codes],
        }
    )
    table = frame_with_vectors(frame, fit.decoded, column="decoded")
    meta = {
        "version": fit.version,
        "encoder_id": encoder_id,
        "config": cfg.model_dump(),
        "seed": seed,
        "artifact_path": str(path),
        "metrics": fit.metrics,
    }
    with warehouse.transaction() as con:
        con.register("_sid_rows", table)
        con.execute("DROP TABLE IF EXISTS item_semantic_ids")
        con.execute("CREATE TABLE item_semantic_ids AS SELECT * FROM _sid_rows")
        con.unregister("_sid_rows")
        con.execute("INSERT OR REPLACE INTO warehouse_meta VALUES (?, ?)", [META_KEY, json.dumps(meta)])
    return {**meta, "trained": True}


def stored_semantic_id_meta(warehouse: Warehouse) -> dict | None:
    if not warehouse.path.exists() or not warehouse.table_exists("item_semantic_ids"):
        return None
    row = warehouse.query("SELECT value FROM warehouse_meta WHERE key = ?", [META_KEY])
    return json.loads(row["value"].iloc[0]) if len(row) else None


def load_semantic_ids(warehouse: Warehouse) -> SemanticIds:
    meta = stored_semantic_id_meta(warehouse)
    if meta is None:
        raise LookupError("no semantic IDs in the warehouse: materialize item_semantic_ids first")
    with warehouse.connect(read_only=True) as con:
        frame, decoded = read_vectors(
            con, "SELECT item_id, codes, decoded FROM item_semantic_ids ORDER BY item_id", column="decoded"
        )
        emb_ids, emb = load_item_embeddings(con, meta["encoder_id"])
    pos = pd.Index(emb_ids).get_indexer(frame["item_id"])
    if (pos < 0).any():
        raise LookupError(
            f"{int((pos < 0).sum())} items with a semantic ID have no embedding under "
            f"{meta['encoder_id']}: re-materialize item_semantic_ids"
        )
    codes = np.array([list(c) for c in frame["codes"]], dtype=np.int64)
    return SemanticIds(
        meta["version"],
        meta["encoder_id"],
        frame["item_id"].astype(str).tolist(),
        codes,
        emb[pos],
        decoded,
        meta["metrics"],
    )


# ---- generators -------------------------------------------------------------------------------


def refit_day(day: date, every_days: int) -> date:
    """The refit day whose generator serves ``day``: refits happen every N days counted from 1970-01-01,
    so the grid does not move when earlier data arrives."""
    return _EPOCH + timedelta(((day - _EPOCH).days // every_days) * every_days)


def training_sequences(warehouse: Warehouse, before: date) -> tuple[list[str], list[list[str]], list[list[int]]]:
    """Users' positives (exposed and clicked) of days before ``before``, oldest first, with the day of each
    (as days since 1970). The same clicks the histories are built from; a re-click counts at each click."""
    frame = warehouse.query(
        "SELECT user_id, item_id, CAST(day - DATE '1970-01-01' AS BIGINT) AS day_number FROM events "
        "WHERE exposed AND clicked = 1 AND day < ? ORDER BY user_id, event_time, item_id",
        [before],
    )
    grouped = frame.groupby("user_id", sort=True)
    return (
        list(grouped.groups.keys()),
        grouped["item_id"].apply(list).tolist(),
        grouped["day_number"].apply(list).tolist(),
    )


def _fit_key(sid_version: str, cfg: SidGeneratorConfig, seed: int, refit: date, sequences) -> str:
    digest = hashlib.sha256()
    training = json.dumps(cfg.model_dump(exclude=set(SID_GENERATION_FIELDS)), sort_keys=True)
    for part in (sid_version, training, str(seed), str(refit)):
        digest.update(part.encode())
    for seq in sequences:
        digest.update(("\x1f".join(map(str, seq)) + "\x1e").encode())
    return digest.hexdigest()[:24]


def generator_for_day(
    warehouse: Warehouse,
    sids: SemanticIds,
    day: date,
    cfg: SidGeneratorConfig,
    seed: int,
    artifacts_dir: Path,
    progress: bool = False,
) -> TrainedSidGenerator | None:
    """The generator serving ``day`` (trained on positives before its refit day), loaded from the
    warehouse or trained and stored; None when fewer than ``cfg.min_training_positives`` exist."""
    refit = refit_day(day, cfg.retrain_every_days)
    _, sequences, days = training_sequences(warehouse, refit)
    targets = count_training_targets(days, cfg.objective)
    if targets < cfg.min_training_positives:
        log.info(
            "no SID generator for refit day %s: %d positives to learn (%s) before it (< %d)",
            refit,
            targets,
            cfg.objective,
            cfg.min_training_positives,
        )
        return None
    key = _fit_key(sids.version, cfg, seed, refit, sequences)
    vocab = sids.vocabulary()
    with warehouse.transaction() as con:
        con.execute(_GENERATORS_DDL)
        stored = con.execute(
            "SELECT version, artifact_path, metrics_json, train_seconds FROM sid_generators WHERE fit_key = ?", [key]
        ).fetchall()
    if stored and Path(stored[0][1]).exists():
        version, path, metrics, seconds = stored[0]
        model = SidTransformer(
            vocab.size, max_tokens(cfg, vocab.positions), cfg.d_model, cfg.layers, cfg.heads, cfg.dropout
        )
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return TrainedSidGenerator(model, vocab, cfg, {**json.loads(metrics), "seconds": seconds}, version)
    version = "sidgen-" + key[:12]
    trained = train_sid_generator(vocab, sequences, cfg, seed, version, progress=progress, user_sessions=days)
    trained.metrics.update(refit_day=str(refit), train_end=str(refit - timedelta(1)), sid_version=sids.version)
    path = Path(artifacts_dir) / "sid" / f"{version}.pt"
    _atomic_torch_save(trained.model.state_dict(), path)
    with warehouse.transaction() as con:
        con.execute(_GENERATORS_DDL)
        # wall time apart from the metrics: the metrics are a deterministic function of the inputs
        metrics = {k: v for k, v in trained.metrics.items() if k != "seconds"}
        con.execute(
            "INSERT OR REPLACE INTO sid_generators (fit_key, version, refit_day, sid_version, train_end, users, "
            "positives, artifact_path, metrics_json, train_seconds, trained_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                key,
                version,
                refit,
                sids.version,
                refit - timedelta(1),
                trained.metrics["users"],
                trained.metrics["positives"],
                str(path),
                json.dumps(metrics),
                trained.metrics["seconds"],
            ],
        )
    return trained


def stored_generators(warehouse: Warehouse) -> pd.DataFrame:
    if not warehouse.path.exists():
        return pd.DataFrame()
    with warehouse.connect(read_only=True) as con:
        if not table_exists(con, "sid_generators"):
            return pd.DataFrame()
        return con.execute("SELECT * FROM sid_generators ORDER BY refit_day").df()
