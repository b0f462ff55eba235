"""Ids the feature store does not have: an unknown item scores like a typical catalog item (not above
or below all of them), an unknown user's candidates get scores inside (0, 1) that still rank them,
both are reported, for every shape and for the demo's model configuration; a scalar constant in
training cannot saturate a score; models saved before the unknown-id defaults still load."""

import json
import logging

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gpl_platform.config import TrainingConfig, load_settings
from gpl_platform.prerank.inputs import InputLayout
from gpl_platform.prerank.model import ModelConfig, PreRanker
from gpl_platform.prerank.serving import PreRankScorer
from gpl_platform.prerank.train import (
    TrainConfig,
    TrainingRows,
    model_config_from,
    train_config_from,
    train_preranker,
)
from tests.helpers import build_feature_world, exposed_training_rows

SHAPES = ("mlp", "two_tower", "cold")
GHOST_ITEM, GHOST_USER = "ghost-item", "ghost-user"


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """ScoringService sets torch's intra-op threads for its process; later tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train_model(world, shape: str | None = None):
    """The pre-ranker `make demo` trains (the default TrainingConfig: shape, feature service, training
    budget, batch, lr; ``shape`` another shape), as `train_from_training_set` builds it: on the world's
    exposed candidates, early-stopped on a later day's. (Validated on its own training rows, the step
    budget trains until it has memorised them, and scores saturate; two epochs leave scores so flat that
    where an unknown id lands among them is noise.)"""
    cfg = TrainingConfig() if shape is None else TrainingConfig(preranker=shape)
    name = f"{shape or 'demo'}-0"
    assert cfg.feature_service == "prerank_v2"  # the world's matrix; a new default needs it here too
    rows, columns, cands = exposed_training_rows(world)
    later = (cands["day"] == cands["day"].max()).to_numpy()
    train = TrainingRows(
        *(getattr(rows, k)[~later] for k in ("matrix", "labels", "weights", "is_pseudo", "user_ids", "item_ids"))
    )
    model, _ = train_preranker(
        train,
        columns,
        rows.matrix[later],
        rows.labels[later].astype(int),
        model_config_from(cfg),
        train_config_from(cfg, 0),
        valid_user_ids=rows.user_ids[later],
        valid_item_ids=rows.item_ids[later],
        user_vocab=world["dataset"].users["user_id"].tolist(),
        item_vocab=world["dataset"].items["item_id"].tolist(),
    )
    out = world["store"].settings.artifacts_dir / "models" / name
    model.save(out, {"feature_service": cfg.feature_service, "version": name})
    return model, out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = load_settings({"data_dir": str(tmp_path_factory.mktemp("unknown-ids") / "data")})
    from gpl_platform.data.sources import load_source

    all_days = sorted(set(load_source(settings).events["day"]))
    world = build_feature_world(settings, days=all_days[:-3])
    world["models"] = {shape: _train_model(world, shape) for shape in SHAPES}
    world["models"]["demo"] = _train_model(world)
    return world


def _users(world, n=12):
    return world["dataset"].users["user_id"].tolist()[:n]


def _catalog(world):
    return world["dataset"].items["item_id"].tolist()


def _assert_unknown_item_is_typical(scorer, world):
    """For each user the unknown item lies strictly between the catalog's lowest and highest score, and
    across users its rank among the catalog is not an extreme one (for the median user, neither in the
    top nor in the bottom 5%)."""
    catalog = _catalog(world)
    percentiles = []
    for user in _users(world):
        scored = scorer.score(user, [*catalog, GHOST_ITEM])
        assert scored.unknown_items == [GHOST_ITEM] and not scored.unknown_user
        known, ghost = scored.scores[:-1], scored.scores[-1]
        assert known.min() < ghost < known.max(), (user, ghost, known.min(), np.median(known), known.max())
        percentiles.append(float((known < ghost).mean()))
    assert 0.05 <= np.median(percentiles) <= 0.95, percentiles


def _assert_unknown_user_ranks_items(scorer, world):
    """An unknown user's catalog scores are inside (0, 1), spread out, and rank items much as the
    known users do on average (its inputs are the average user's)."""
    catalog = _catalog(world)
    scored = scorer.score(GHOST_USER, catalog)
    assert scored.unknown_user and scored.unknown_items == []
    scores = scored.scores
    assert np.all((scores > 0) & (scores < 1)), (scores.min(), scores.max())
    assert len(np.unique(scores)) > len(catalog) // 2 and np.ptp(scores) > 1e-3, np.ptp(scores)
    average_user = np.mean([scorer.score(user, catalog).scores for user in _users(world)], axis=0)
    assert spearmanr(scores, average_user).statistic > 0.5


@pytest.mark.parametrize("shape", SHAPES)
def test_an_unknown_item_scores_like_a_typical_catalog_item(world, shape):
    _, model_dir = world["models"][shape]
    _assert_unknown_item_is_typical(PreRankScorer(model_dir, world["store"]), world)


@pytest.mark.parametrize("shape", SHAPES)
def test_an_unknown_user_gets_scores_inside_0_1_that_rank_the_items(world, shape):
    _, model_dir = world["models"][shape]
    _assert_unknown_user_ranks_items(PreRankScorer(model_dir, world["store"]), world)


def test_the_demo_model_scores_unknown_ids_like_typical_ones(world):
    model, model_dir = world["models"]["demo"]
    assert model.shape == TrainingConfig().preranker
    scorer = PreRankScorer(model_dir, world["store"])
    _assert_unknown_item_is_typical(scorer, world)
    _assert_unknown_user_ranks_items(scorer, world)


@pytest.mark.parametrize("model_key", ["demo", "two_tower"])
def test_the_response_reports_unknown_ids_with_unsaturated_scores(world, model_key):
    """What `gpl serve` answers (ScoringService.score is the body of POST /score)."""
    from gpl_platform.prerank.service import ScoringService

    _, model_dir = world["models"][model_key]
    service = ScoringService(world["store"].settings, model=model_dir, refresh_interval_s=3600)  # not started
    user, items = _users(world)[0], _catalog(world)[:20]
    answer = json.loads(json.dumps(service.score(GHOST_USER, [*items, GHOST_ITEM, "ghost-item-2"])))
    assert answer["unknown_user"] is True and answer["unknown_items"] == [GHOST_ITEM, "ghost-item-2"]
    assert all(0 < s < 1 for s in answer["scores"]) and len(set(answer["scores"][:20])) > 10
    answer = service.score(user, [*items, GHOST_ITEM])
    assert answer["unknown_user"] is False and answer["unknown_items"] == [GHOST_ITEM]
    assert 0 < answer["scores"][-1] < max(answer["scores"][:-1])  # not on top of 20 catalog items


# ---- the model alone, on a hand-made matrix ----------------------------------------------------

COLUMNS = ["u_clicks", "u_num_age", "u_known", "i_ctr", "i_has_content_emb", "i_known", "ui_cosine"] + [
    f"{name}[{k}]" for name in ("u_history_emb", "i_content_emb") for k in range(4)
]
COL = {c: k for k, c in enumerate(COLUMNS)}


def _matrix(n=600, seed=0):
    """Known users and items only (flags 1) and a content flag that is 1 in every row, as in training."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, len(COLUMNS)), np.float32)
    x[:, COL["u_clicks"]] = rng.poisson(3, n)
    x[:, COL["u_num_age"]] = rng.integers(18, 70, n)
    x[:, COL["i_ctr"]] = rng.random(n) * 0.3
    x[:, [COL["u_known"], COL["i_known"], COL["i_has_content_emb"]]] = 1
    for name in ("u_history_emb", "i_content_emb"):  # unit vectors with a common direction, as a text encoder's
        emb = rng.normal(size=(n, 4)) + 0.5
        x[:, COL[f"{name}[0]"] : COL[f"{name}[0]"] + 4] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    x[:, COL["ui_cosine"]] = (x[:, COL["u_history_emb[0]"] :][:, :4] * x[:, COL["i_content_emb[0]"] :][:, :4]).sum(1)
    logit = 2 * x[:, COL["ui_cosine"]] + 5 * x[:, COL["i_ctr"]] - 1.5
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)


def _train_on_matrix(shape, seed=0):
    x, y = _matrix(seed=seed)
    ids = {
        "user_ids": np.array([f"u{k % 30}" for k in range(len(x))]),
        "item_ids": np.array([f"i{k % 40}" for k in range(len(x))]),
    }
    rows = TrainingRows(x, y, np.ones(len(y), np.float32), np.zeros(len(y), bool), **ids)
    model, _ = train_preranker(
        rows,
        COLUMNS,
        x[:100],
        y[:100].astype(int),
        ModelConfig(shape=shape),
        TrainConfig(budget="epochs", epochs=3, batch_size=64, seed=seed),
        valid_user_ids=ids["user_ids"][:100],
        valid_item_ids=ids["item_ids"][:100],
        user_vocab=sorted(set(ids["user_ids"])),
        item_vocab=sorted(set(ids["item_ids"])),
    )
    return model, x, ids


def _predict(model, x, ids):
    return model.predict(x, ids["user_ids"][: len(x)], ids["item_ids"][: len(x)])


@pytest.mark.parametrize("shape", SHAPES)
def test_a_scalar_constant_in_training_cannot_saturate_a_score(shape):
    """A catalog item without a content embedding when every training item had one: the model learned
    nothing about the other value, so it scores as if the column held the training value."""
    model, x, ids = _train_on_matrix(shape)
    changed = x[:50].copy()
    changed[:, COL["i_has_content_emb"]] = 0
    np.testing.assert_allclose(_predict(model, changed, ids), _predict(model, x[:50], ids), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_unknown_ids_get_the_training_mean_inputs(shape):
    """A row of an unknown item scores as the same row with the item's inputs at the training mean,
    whatever the contract's defaults were (zeros); an unknown user's rows likewise."""
    model, x, ids = _train_on_matrix(shape)
    item_cols = [k for k, c in enumerate(COLUMNS) if c.startswith("i_")]
    user_cols = [k for k, c in enumerate(COLUMNS) if c.startswith("u_")]
    unknown = x[:50].copy()
    unknown[:, item_cols] = 0  # the contract's defaults for an id the store does not have
    unknown[:, COL["ui_cosine"]] = 0
    scores = _predict(model, unknown, ids)
    other = unknown.copy()
    other[:, COL["i_ctr"]], other[:, COL["i_content_emb[0]"]] = 0.5, 3.0  # what an unknown item holds is not read
    np.testing.assert_array_equal(_predict(model, other, ids), scores)
    known = _predict(model, x, ids)
    assert np.all((scores > known.min()) & (scores < known.max()))
    users = x[:50].copy()
    users[:, user_cols] = 0
    user_scores = _predict(model, users, ids)
    assert np.all((user_scores > 0) & (user_scores < 1)) and np.ptp(user_scores) > 1e-4


def test_models_saved_before_the_unknown_id_defaults_still_load(tmp_path, caplog):
    """model.json without the embedding means and two_tower weights without the unknown vectors: the
    scalars still get the training mean, the embeddings the contract's zeros; a warning says so."""
    for shape in ("mlp", "two_tower"):
        model, x, ids = _train_on_matrix(shape)
        out = model.save(tmp_path / shape, {"version": shape})
        meta = json.loads((out / "model.json").read_text())
        del meta["layout"]["user_emb_mean"], meta["layout"]["item_emb_mean"]
        (out / "model.json").write_text(json.dumps(meta))
        state = torch.load(out / "model.pt", weights_only=True)
        torch.save({k: v for k, v in state.items() if not k.startswith("unknown_")}, out / "model.pt")
        with caplog.at_level(logging.WARNING, logger="gpl_platform.prerank.model"):
            caplog.clear()
            old, _ = PreRanker.load(out)
        assert "predates" in caplog.text
        np.testing.assert_allclose(_predict(old, x[:50], ids), _predict(model, x[:50], ids), rtol=1e-6)
        unknown = x[:50].copy()
        unknown[:, [k for k, c in enumerate(COLUMNS) if c.startswith("i_")]] = 0
        assert np.all(np.isfinite(_predict(old, unknown, ids)))
        assert InputLayout(**meta["layout"]).item_emb_mean == []
