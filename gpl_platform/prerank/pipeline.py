"""Train the production pre-ranker from the stored training set and save it with its lineage.

The shape is ``training.preranker``; the id shapes get every row's ids from the training set and
their vocabularies from the warehouse ``users`` and ``items`` tables (the whole catalog).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from gpl_platform.config import Settings
from gpl_platform.data.warehouse import Warehouse
from gpl_platform.prerank.data import attach_features, id_vocabularies, load_candidates, time_split
from gpl_platform.prerank.train import TrainingRows, model_config_from, train_config_from, train_preranker


def train_from_training_set(warehouse: Warehouse, store, settings: Settings) -> dict:
    cfg = settings.training
    rows = warehouse.query("SELECT * FROM training_set ORDER BY day, request_id, item_id")
    if rows.empty:
        raise ValueError("the training set is empty: materialize training_set first")
    stored = warehouse.query("SELECT value FROM warehouse_meta WHERE key = 'training_set_lineage'")
    set_lineage = json.loads(stored["value"].iloc[0]) if len(stored) else {}
    split = time_split(warehouse, cfg.test_share, cfg.valid_share)
    matrix, columns = attach_features(store, rows, cfg.feature_service)
    valid = load_candidates(warehouse, split.valid_days)
    valid = valid[valid["exposed"]].reset_index(drop=True)
    valid_x, _ = attach_features(store, valid, cfg.feature_service)
    train_cfg = train_config_from(cfg, settings.seed)
    model_cfg = model_config_from(cfg)
    user_vocab, item_vocab = id_vocabularies(warehouse)
    model, history = train_preranker(
        TrainingRows(
            matrix,
            rows["label"].to_numpy(np.float32),
            rows["weight"].to_numpy(np.float32),
            rows["is_pseudo"].to_numpy(bool),
            rows["user_id"].to_numpy(),
            rows["item_id"].to_numpy(),
        ),
        columns,
        valid_x,
        valid["clicked"].to_numpy(int),
        model_cfg,
        train_cfg,
        valid_user_ids=valid["user_id"].to_numpy(),
        valid_item_ids=valid["item_id"].to_numpy(),
        user_vocab=user_vocab,
        item_vocab=item_vocab,
    )
    lineage = {
        "training_set": set_lineage,
        "split": split.describe(),
        "feature_service": cfg.feature_service,
        "feature_spec_digest": store.spec().digest(),
        "encoder": set_lineage.get("pseudo_labels", {}).get("encoder_versions"),
        "hyperparameters": {**train_cfg.__dict__, "model": model_cfg.__dict__, "pseudo_weight": cfg.pseudo_weight},
        "model_shape": model.shape,
        "metrics": {
            "best_valid_auc": history["best_valid_auc"],
            "best_epoch": history["best_epoch"],
            "epochs_run": history["epochs_run"],
        },
        "n_rows": history["n_rows"],
        "n_pseudo": history["n_pseudo"],
    }
    if model.uses_ids:  # the catalog the id rows were built from is part of what the model is
        lineage["vocabulary"] = {
            "n_users": len(model.user_vocab.ids),
            "n_items": len(model.item_vocab.ids),
            "users_digest": model.user_vocab.digest(),
            "items_digest": model.item_vocab.digest(),
            "training_rows_out_of_vocabulary": history["n_rows_out_of_vocabulary"],
        }
    version = hashlib.sha256(json.dumps(lineage, sort_keys=True, default=str).encode()).hexdigest()[:12]
    lineage["version"] = version
    path = model.save(settings.artifacts_dir / "models" / version, lineage)
    return {"version": version, "path": str(path), "training": history, "lineage": lineage}
