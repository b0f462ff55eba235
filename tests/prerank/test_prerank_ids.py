"""Pre-rankers with user and item id embeddings (two_tower, cold): rows no data reaches stay put,
out-of-vocabulary ids, determinism, persistence, precomputed item vectors, learning from item
identity, online scoring; and that mlp keeps loading weights saved before the shapes existed."""

import json

import numpy as np
import pandas as pd
import pydantic
import pytest
import torch
from sklearn.metrics import roc_auc_score

from gpl_platform.config import TrainingConfig
from gpl_platform.prerank.data import rows_from_plan
from gpl_platform.prerank.inputs import IdVocabulary, InputLayout
from gpl_platform.prerank.model import ModelConfig, PreRanker, build_preranker
from gpl_platform.prerank.train import TrainConfig, TrainingRows, model_config_from, train_preranker

COLUMNS = (
    ["u_clicks", "u_known", "u_num_age", "i_ctr", "i_known", "ui_cosine"]
    + [f"u_history_emb[{k}]" for k in range(4)]
    + [f"i_content_emb[{k}]" for k in range(4)]
)
USER_COLS = [k for k, c in enumerate(COLUMNS) if c.startswith("u_")]
ITEM_COLS = [k for k, c in enumerate(COLUMNS) if c.startswith("i_")]
ID_SHAPES = ("two_tower", "cold")
USERS = [f"u{k}" for k in range(30)]
ITEMS = [f"i{k}" for k in range(45)]  # the catalog: i40..i44 never appear in any row
EXPOSED_ITEMS, UNEXPOSED_ITEMS, CATALOG_ONLY = ITEMS[:30], ITEMS[30:40], ITEMS[40:]
FAST = TrainConfig(budget="epochs", epochs=4, batch_size=64, seed=3, patience=4)


def _features(user_ids, item_ids, seed=0):
    """A feature matrix whose user-side columns depend on the user only and item-side columns on the
    item only (as the feature store's are); ui_cosine is per row."""
    rng = np.random.default_rng(seed)
    user_table = {u: rng.normal(size=len(COLUMNS)).astype(np.float32) for u in sorted(set(user_ids))}
    item_table = {i: rng.normal(size=len(COLUMNS)).astype(np.float32) for i in sorted(set(item_ids))}
    x = rng.normal(size=(len(user_ids), len(COLUMNS))).astype(np.float32)
    x[:, USER_COLS] = np.stack([user_table[u][USER_COLS] for u in user_ids])
    x[:, ITEM_COLS] = np.stack([item_table[i][ITEM_COLS] for i in item_ids])
    return x


def _rows_by_item_identity(n, items, seed=0, pseudo=False):
    """Rows whose click depends on the item only: even-numbered items are liked (p 0.9), odd ones not (0.1)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(USERS, size=n)
    item_ids = rng.choice(items, size=n)
    liked = np.array([int(i[1:]) % 2 == 0 for i in item_ids])
    labels = (rng.random(n) < np.where(liked, 0.9, 0.1)).astype(np.float32)
    return TrainingRows(
        _features(users, item_ids, seed),
        labels,
        np.full(n, 0.5 if pseudo else 1.0, np.float32),
        np.full(n, pseudo),
        users,
        item_ids,
    )


def _concat(a: TrainingRows, b: TrainingRows) -> TrainingRows:
    return TrainingRows(
        *(
            np.concatenate([getattr(a, f), getattr(b, f)])
            for f in ("matrix", "labels", "weights", "is_pseudo", "user_ids", "item_ids")
        )
    )


def _train(rows, valid, shape, config=FAST):
    return train_preranker(
        rows,
        COLUMNS,
        valid.matrix,
        valid.labels.astype(int),
        ModelConfig(shape=shape),
        config,
        valid_user_ids=valid.user_ids,
        valid_item_ids=valid.item_ids,
        user_vocab=USERS,
        item_vocab=ITEMS,
    )


def _initial_model(rows, shape, config=FAST):
    """The model train_preranker starts from: same seed, same construction."""
    torch.manual_seed(config.seed)
    return build_preranker(
        InputLayout.from_columns(COLUMNS).fit_scaling(rows.matrix), ModelConfig(shape=shape), USERS, ITEMS
    )


def _item_parameters(model) -> dict[str, torch.Tensor]:
    """Per-item-id parameters: the item-id embedding and, for two_tower, the item bias."""
    out = {"item_id_emb": model.item_id_emb.weight.detach().clone()}
    if hasattr(model, "item_bias"):
        out["item_bias"] = model.item_bias.weight.detach().clone()
    return out


@pytest.mark.parametrize("shape", ID_SHAPES)
def test_item_rows_move_only_when_rows_of_the_item_train_them(shape):
    exposed = _rows_by_item_identity(600, EXPOSED_ITEMS, seed=1)
    pseudo = _rows_by_item_identity(300, UNEXPOSED_ITEMS, seed=2, pseudo=True)
    valid = _rows_by_item_identity(200, EXPOSED_ITEMS, seed=3)
    initial = _item_parameters(_initial_model(exposed, shape))
    rows_of = {
        name: IdVocabulary(ITEMS).rows(names)
        for name, names in (("exposed", EXPOSED_ITEMS), ("unexposed", UNEXPOSED_ITEMS), ("catalog_only", CATALOG_ONLY))
    }

    exposed_only, _ = _train(exposed, valid, shape)
    for name, after in _item_parameters(exposed_only).items():
        before = initial[name]
        assert torch.equal(after[rows_of["unexposed"]], before[rows_of["unexposed"]]), name
        assert torch.equal(after[rows_of["catalog_only"]], before[rows_of["catalog_only"]]), name
        assert not torch.equal(after[rows_of["exposed"]], before[rows_of["exposed"]]), name  # the check can fail
        assert not after[IdVocabulary.OOV_ROW].any(), name

    with_pseudo, _ = _train(_concat(exposed, pseudo), valid, shape)
    for name, after in _item_parameters(with_pseudo).items():
        before = initial[name]
        moved = (after[rows_of["unexposed"]] != before[rows_of["unexposed"]]).any(dim=1)
        assert moved.all(), name  # every pseudo-labelled item's row learned from its pseudo-labels
        assert torch.equal(after[rows_of["catalog_only"]], before[rows_of["catalog_only"]]), name


@pytest.mark.parametrize("shape", ID_SHAPES)
def test_unknown_ids_score_through_the_oov_bucket(shape):
    rows = _rows_by_item_identity(400, EXPOSED_ITEMS, seed=1)
    model, _ = _train(rows, rows, shape, TrainConfig(budget="epochs", epochs=2, batch_size=64, seed=0))
    x = rows.matrix[:20]
    unknown = model.predict(x, ["ghost-user"] * 20, ["ghost-item"] * 20)
    oov = torch.zeros(20, dtype=torch.long)
    with torch.no_grad():
        explicit = torch.sigmoid(model(torch.from_numpy(x), oov, oov)).numpy()
    np.testing.assert_array_equal(unknown, explicit)
    np.testing.assert_array_equal(unknown, model.predict(x, ["other-ghost"] * 20, ["other-item"] * 20))
    # A known user with an unknown item: only the item goes to the bucket.
    with torch.no_grad():
        user_rows = torch.from_numpy(model.user_vocab.rows(rows.user_ids[:20]))
        half = torch.sigmoid(model(torch.from_numpy(x), user_rows, oov)).numpy()
    np.testing.assert_array_equal(model.predict(x, rows.user_ids[:20], ["ghost-item"] * 20), half)
    assert not np.array_equal(half, model.predict(x, rows.user_ids[:20], rows.item_ids[:20]))
    assert model.item_vocab.unknown(["i1", "ghost-item", "i1", "ghost-item"]) == ["ghost-item"]
    assert model.user_vocab.rows(["ghost-user", "u0"]).tolist() == [IdVocabulary.OOV_ROW, 1]
    with pytest.raises(ValueError, match="pass user_ids and item_ids"):
        model.predict(x)


@pytest.mark.parametrize("shape", ID_SHAPES)
def test_id_shapes_are_deterministic_under_a_seed(shape):
    rows = _rows_by_item_identity(400, EXPOSED_ITEMS + UNEXPOSED_ITEMS, seed=1)
    valid = _rows_by_item_identity(100, EXPOSED_ITEMS, seed=3)
    a, _ = _train(rows, valid, shape)
    b, _ = _train(rows, valid, shape)
    c, _ = _train(rows, valid, shape, TrainConfig(budget="epochs", epochs=4, batch_size=64, seed=4, patience=4))
    scores = [m.predict(valid.matrix, valid.user_ids, valid.item_ids) for m in (a, b, c)]
    np.testing.assert_array_equal(scores[0], scores[1])
    assert not np.array_equal(scores[0], scores[2])


@pytest.mark.parametrize("shape", ("mlp", *ID_SHAPES))
def test_saved_model_of_each_shape_scores_identically(tmp_path, shape):
    rows = _rows_by_item_identity(300, EXPOSED_ITEMS, seed=1)
    model, _ = _train(rows, rows, shape, TrainConfig(budget="epochs", epochs=2, batch_size=64))
    model.save(tmp_path / "m", {"feature_service": "prerank_v2"})
    loaded, lineage = PreRanker.load(tmp_path / "m")
    assert type(loaded) is type(model) and lineage == {"feature_service": "prerank_v2"}
    ids = (rows.user_ids, np.r_[rows.item_ids[:-1], ["never-seen"]])
    np.testing.assert_array_equal(model.predict(rows.matrix, *ids), loaded.predict(rows.matrix, *ids))
    assert (tmp_path / "m" / "vocabulary.json").exists() == (shape != "mlp")
    assert not list((tmp_path / "m").glob("*.tmp"))
    if shape != "mlp":
        assert loaded.item_vocab.ids == sorted(ITEMS) and loaded.user_vocab.ids == sorted(USERS)
        (tmp_path / "m" / "vocabulary.json").write_text(json.dumps({"user": USERS, "item": ITEMS[:3]}))
        with pytest.raises(ValueError, match="does not match model.json"):
            PreRanker.load(tmp_path / "m")


def test_mlp_weights_saved_before_the_shapes_still_load(tmp_path):
    """model.json without a shape and the old state-dict names (top-level buffers, user_tower/item_tower)."""
    rows = _rows_by_item_identity(300, EXPOSED_ITEMS, seed=1)
    model, _ = _train(rows, rows, "mlp", TrainConfig(budget="epochs", epochs=2, batch_size=64))
    model.save(tmp_path / "m", {})
    old_names = {
        "inputs.scalar_mean": "mean",
        "inputs.scalar_std": "std",
        "inputs.scalar_idx": "scalar_idx",
        "inputs.user_emb_idx": "user_idx",
        "inputs.item_emb_idx": "item_idx",
        "inputs.user_history_proj.": "user_tower.",
        "inputs.item_content_proj.": "item_tower.",
    }
    state = {}
    for key, value in torch.load(tmp_path / "m" / "model.pt", weights_only=True).items():
        new = next((n for n in old_names if key == n or (n.endswith(".") and key.startswith(n))), None)
        state[old_names[new] + key[len(new) :] if new else key] = value
    assert "user_tower.weight" in state and "mean" in state and "mlp.0.weight" in state
    torch.save(state, tmp_path / "m" / "model.pt")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    del meta["config"]["shape"], meta["config"]["id_dim"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    loaded, _ = PreRanker.load(tmp_path / "m")
    assert loaded.shape == "mlp"
    np.testing.assert_array_equal(model.predict(rows.matrix), loaded.predict(rows.matrix))


def test_two_tower_item_vectors_computed_once_give_the_forward_scores():
    rows = _rows_by_item_identity(400, EXPOSED_ITEMS, seed=1)
    model, _ = _train(rows, rows, "two_tower", TrainConfig(budget="epochs", epochs=2, batch_size=64))
    users, items = ["u0", "u3", "u7", "ghost-user"], ["i0", "i1", "i5", "i31", "i44", "ghost-item"]
    pairs_users = [u for u in users for _ in items]
    pairs_items = [i for _ in users for i in items]
    pairs = _features(pairs_users, pairs_items, seed=5)
    plain = model.predict(pairs, pairs_users, pairs_items).reshape(len(users), len(items))
    item_vectors = model.item_vectors(pairs[: len(items)], items)  # the first user's rows hold every item
    user_matrix = pairs[:: len(items)]  # one row per user
    precomputed = model.predict_with_item_vectors(user_matrix, users, item_vectors)
    np.testing.assert_allclose(precomputed, plain, rtol=1e-5, atol=1e-7)
    assert item_vectors.vectors.shape == (len(items), ModelConfig().hidden[-1])
    # No cross features: ui_cosine does not change a two-tower score.
    shifted = pairs.copy()
    shifted[:, COLUMNS.index("ui_cosine")] += 3.0
    np.testing.assert_array_equal(model.predict(shifted, pairs_users, pairs_items), plain.ravel())


@pytest.mark.parametrize("shape", ID_SHAPES)
def test_id_shapes_learn_item_identity_that_features_do_not_show(shape):
    """Labels depend on the item id only and the features are noise: the id shapes learn it on held-out
    rows of seen items, the mlp cannot."""
    rows = _rows_by_item_identity(2400, EXPOSED_ITEMS, seed=1)
    valid = _rows_by_item_identity(300, EXPOSED_ITEMS, seed=2)
    held_out = _rows_by_item_identity(600, EXPOSED_ITEMS, seed=3)
    config = TrainConfig(budget="epochs", epochs=10, batch_size=64, seed=0, patience=3)
    aucs = {}
    for name in (shape, "mlp"):
        model, _ = _train(rows, valid, name, config)
        aucs[name] = roc_auc_score(
            held_out.labels, model.predict(held_out.matrix, held_out.user_ids, held_out.item_ids)
        )
    assert aucs[shape] > 0.8 and aucs[shape] > aucs["mlp"] + 0.15, aucs


def test_id_shapes_refuse_missing_ids_and_vocabularies():
    rows = _rows_by_item_identity(50, EXPOSED_ITEMS, seed=1)
    no_ids = TrainingRows(rows.matrix, rows.labels, rows.weights, rows.is_pseudo)
    with pytest.raises(ValueError, match="user_ids and item_ids"):
        _train(no_ids, rows, "cold")
    with pytest.raises(ValueError, match="user_vocab and item_vocab"):
        train_preranker(
            rows,
            COLUMNS,
            rows.matrix,
            rows.labels.astype(int),
            ModelConfig(shape="two_tower"),
            FAST,
            valid_user_ids=rows.user_ids,
            valid_item_ids=rows.item_ids,
        )
    with pytest.raises(ValueError, match="pass user_ids and item_ids"):
        train_preranker(
            rows,
            COLUMNS,
            rows.matrix,
            rows.labels.astype(int),
            ModelConfig(shape="cold"),
            FAST,
            user_vocab=USERS,
            item_vocab=ITEMS,
        )
    with pytest.raises(ValueError, match="item_ids has 49 rows"):
        TrainingRows(rows.matrix, rows.labels, rows.weights, rows.is_pseudo, rows.user_ids, rows.item_ids[:-1])
    with pytest.raises(ValueError, match="missing values"):
        TrainingRows(
            rows.matrix,
            rows.labels,
            rows.weights,
            rows.is_pseudo,
            rows.user_ids,
            np.r_[rows.item_ids[:-1].astype(object), [None]],
        )
    with pytest.raises(ValueError, match="unknown pre-ranker shape"):
        build_preranker(InputLayout.from_columns(COLUMNS), ModelConfig(shape="wide_and_deep"))


def test_rows_from_plan_and_settings_carry_the_ids_and_the_shape():
    train = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "item_id": ["a", "b", "c"]})
    plan = pd.DataFrame({"row": [2, 0], "label": [1.0, 0.0], "weight": [1.0, 0.5], "is_pseudo": [False, True]})
    matrix = np.arange(6, dtype=np.float32).reshape(3, 2)
    rows = rows_from_plan(plan, matrix, train)
    assert rows.user_ids.tolist() == ["u3", "u1"] and rows.item_ids.tolist() == ["c", "a"]
    assert rows_from_plan(plan, matrix).user_ids is None
    assert model_config_from(TrainingConfig()) == ModelConfig()
    assert model_config_from(TrainingConfig(preranker="cold", id_embedding_dim=8)) == ModelConfig(
        shape="cold", id_dim=8
    )
    with pytest.raises(pydantic.ValidationError):
        TrainingConfig(preranker="wide_and_deep")


# The online scorer of every shape (ids, out-of-vocabulary rows, the precomputed two-tower item side) is
# tested on a real Feast store in tests/prerank/test_scoring_service.py.
