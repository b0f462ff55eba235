"""Distillation teachers: ranking features that never hold a row's own click, a ranker teacher stronger
than the old one where click rates carry the signal, and the UKD teacher's adversary, uncertainty
weights and determinism."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from gpl_platform.prerank.teachers import (
    RANKER_COLUMNS,
    catalog_item_categories,
    fit_ranker_teacher,
    ranker_features,
)
from gpl_platform.prerank.ukd import fit_ukd_teacher

# ---- ranking features ------------------------------------------------------------------------


def _candidates(n_requests: int = 300, seed: int = 0) -> pd.DataFrame:
    """Requests of 6 candidates (2 exposed) over 30 users and 40 items, plus the planted request of a
    user and an item seen nowhere else: one exposed, clicked row."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_requests):
        user = f"u{rng.integers(30)}"
        for k, item in enumerate(rng.choice(40, 6, replace=False)):
            exposed = k < 2
            rows.append((f"r{r}", user, f"i{item}", exposed, float(rng.random() < 0.3) if exposed else np.nan))
    rows += [("r-solo", "solo-user", "solo-item", True, 1.0), ("r-solo", "solo-user", "i1", False, np.nan)]
    return pd.DataFrame(rows, columns=["request_id", "user_id", "item_id", "exposed", "clicked"])


def _features(frame: pd.DataFrame, **kwargs):
    matrix = np.zeros((len(frame), 2), np.float32)
    out, columns, encoder = ranker_features(frame, matrix, ["a", "b"], frame["exposed"].to_numpy(), **kwargs)
    return pd.DataFrame(out[:, 2:], columns=columns[2:]), encoder


def test_a_rows_own_click_never_enters_its_ranking_features():
    frame = _candidates()
    features, encoder = _features(frame)
    assert list(features.columns) == RANKER_COLUMNS
    solo = frame.index[frame["item_id"] == "solo-item"][0]
    # out of fold, the user and item of one clicked row have no data: their rates are the prior (global CTR)
    prior = features.loc[solo, "rk_user_click_rate"]
    assert 0.1 < prior < 0.5
    assert features.loc[solo, "rk_item_click_rate"] == pytest.approx(prior)
    assert features.loc[solo, ["rk_user_exposures", "rk_item_exposures"]].tolist() == [0.0, 0.0]
    # with every fit row (how validation rows are encoded) the same click does count
    full = encoder.transform(frame.loc[[solo]], np.zeros((1, 2), np.float32))[0, 2:]
    assert full[RANKER_COLUMNS.index("rk_user_click_rate")] > prior + 0.05
    assert full[RANKER_COLUMNS.index("rk_user_exposures")] == 1.0

    # erasing the clicks of one request changes none of that request's features, but does change the
    # features of the same user's rows in other folds
    request = frame.loc[frame["exposed"] & (frame["clicked"] == 1), "request_id"].iloc[0]
    erased = frame.copy()
    in_request = (erased["request_id"] == request).to_numpy()
    erased.loc[in_request & erased["exposed"].to_numpy(), "clicked"] = 0.0
    again, _ = _features(erased)
    pd.testing.assert_frame_equal(features[in_request], again[in_request])
    same_user = (frame["user_id"] == frame.loc[in_request, "user_id"].iloc[0]).to_numpy() & ~in_request
    assert (features.loc[same_user, "rk_user_click_rate"] != again.loc[same_user, "rk_user_click_rate"]).any()

    # the folds follow the seed, and only the seed
    pd.testing.assert_frame_equal(features, _features(frame, seed=0)[0])
    assert not _features(frame, seed=1)[0].equals(features)


def test_user_category_features_follow_the_users_clicks_on_the_category():
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(40)],
            "title": [f"Film {k}" for k in range(40)],  # one value per item: not a category
            "text": "t",
            "genres": ["drama|comedy" if k % 4 == 0 else ("drama" if k % 2 else "horror") for k in range(40)],
            "year": [1990.0 + k % 3 for k in range(40)],  # numeric: not a category
        }
    )
    categories = catalog_item_categories(items)
    assert categories.name == "genres" and categories["i0"] == "drama|comedy"
    assert catalog_item_categories(items[["item_id", "text", "year"]]) is None

    frame = _candidates(n_requests=600)
    # u0 clicks every exposed drama and nothing else
    drama = frame["item_id"].map(categories).fillna("").str.contains("drama").to_numpy()
    u0 = (frame["user_id"] == "u0").to_numpy() & frame["exposed"].to_numpy()
    frame.loc[u0, "clicked"] = drama[u0].astype(float)
    _, encoder = _features(frame, item_categories=categories)
    probe = pd.DataFrame({"user_id": "u0", "item_id": ["i1", "i2", "i0", "solo-item"]})  # drama, horror, both, none
    out = pd.DataFrame(encoder.transform(probe, np.zeros((4, 2), np.float32))[:, 2:], columns=RANKER_COLUMNS)
    rate, lift = out["rk_user_category_click_rate"], out["rk_user_category_lift"]
    assert rate[0] > out["rk_user_click_rate"][0] > rate[1]
    assert lift[0] > 0 > lift[1] and rate[1] < rate[2] < rate[0]  # half drama, half comedy
    assert lift[3] == 0.0 and rate[3] == out["rk_user_click_rate"][3]  # no category: the user's own rate
    # without categories the features still exist, as the user's rate and no lift
    plain, _ = _features(frame)
    assert (plain["rk_user_category_lift"] == 0).all()


# ---- the ranker teacher ----------------------------------------------------------------------


def _planted_world(seed: int = 0, n_users: int = 150, n_items: int = 200, n_requests: int = 1500):
    """Clicks driven by a user bias, an item quality and a user x topic preference; the student's features
    hold popularity, noise and a very noisy quality, so only click rates reveal the signal. Exposure: the 5
    most popular candidates of a request under Gumbel noise. Days 0-5 train, day 6 validates."""
    rng = np.random.default_rng(seed)
    per_request = 20
    bias, quality = rng.normal(0, 1, n_users), rng.normal(0, 1, n_items)
    topic, preference = rng.integers(0, 6, n_items), rng.normal(0, 1.2, (n_users, 6))
    popularity = rng.lognormal(0, 1, n_items)
    user = np.repeat(rng.integers(0, n_users, n_requests), per_request)
    item = np.concatenate([rng.choice(n_items, per_request, replace=False) for _ in range(n_requests)])
    request = np.repeat(np.arange(n_requests), per_request)
    click = rng.random(len(user)) < 1 / (1 + np.exp(-(-2 + bias[user] + quality[item] + preference[user, topic[item]])))
    draw = pd.Series(-(np.log(popularity[item]) + rng.gumbel(size=len(user))))
    exposed = draw.groupby(request).rank(method="first").to_numpy() <= 5
    frame = pd.DataFrame(
        {
            "request_id": [f"r{r}" for r in request],
            "user_id": [f"u{u}" for u in user],
            "item_id": [f"i{i}" for i in item],
            "day": request * 7 // n_requests,
            "exposed": exposed,
            "clicked": np.where(exposed, click.astype(float), np.nan),
        }
    )
    noise = rng.normal(size=(len(user), 6))
    matrix = np.column_stack([np.log(popularity[item]), noise, quality[item] + rng.normal(0, 2, len(user))])
    columns = ["i_popularity", *[f"noise_{k}" for k in range(6)], "i_noisy_quality"]
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(n_items)], "text": "t", "topic": topic.astype(str)})
    in_train = (frame["day"] < 6).to_numpy()
    return (
        frame[in_train].reset_index(drop=True),
        matrix[in_train].astype(np.float32),
        frame[~in_train].reset_index(drop=True),
        matrix[~in_train].astype(np.float32),
        columns,
        items,
    )


def test_ranker_teacher_beats_the_old_teacher_where_click_rates_carry_the_signal():
    train, train_x, valid, valid_x, columns, items = _planted_world()
    exposed, valid_exposed = train["exposed"].to_numpy(), valid["exposed"].to_numpy()
    valid_clicks = valid.loc[valid_exposed, "clicked"].astype(int)
    # the old teacher (trees on the student's own features, as ranker_distillation used before this one);
    # one thread, as the new one, or shared cores make it crawl
    with threadpool_limits(limits=1):
        old = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.08, max_leaf_nodes=63, random_state=0)
        old.fit(train_x[exposed], train.loc[exposed, "clicked"].astype(int))
        old_auc = roc_auc_score(valid_clicks, old.predict_proba(valid_x[valid_exposed])[:, 1])

    teacher = fit_ranker_teacher(
        train, train_x, columns, valid, valid_x, seed=0, item_categories=catalog_item_categories(items)
    )
    assert teacher.scores.shape == (len(train),) and ((teacher.scores > 0) & (teacher.scores < 1)).all()
    assert teacher.valid_auc == pytest.approx(
        roc_auc_score(valid_clicks, teacher.predict(valid[valid_exposed], valid_x[valid_exposed]))
    )
    assert old_auc < 0.62 and teacher.valid_auc > old_auc + 0.08, (old_auc, teacher.valid_auc)
    # the user x topic preference is what the category features add
    no_categories = fit_ranker_teacher(train, train_x, columns, valid, valid_x, seed=0)
    assert teacher.valid_auc > no_categories.valid_auc + 0.01, (teacher.valid_auc, no_categories.valid_auc)


# ---- the UKD teacher -------------------------------------------------------------------------

N_UKD, D_UKD = 6000, 12
FAST = {"steps": 600, "ramp_steps": 150, "eval_every": 50, "patience": 4, "mc_passes": 12}


def _click_logit(x: np.ndarray) -> np.ndarray:
    return -1 + 1.5 * x[:, 1] - x[:, 2] + 0.7 * x[:, 3] * x[:, 4]


def _exposure_world(seed: int = 0):
    """Exposure depends on feature 0 only (which says nothing about clicks); clicks on features 1-4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_UKD, D_UKD)).astype(np.float32)
    exposed = rng.random(N_UKD) < 1 / (1 + np.exp(-(2.5 * x[:, 0] - 1)))
    clicked = np.where(exposed, (rng.random(N_UKD) < 1 / (1 + np.exp(-_click_logit(x)))).astype(float), np.nan)
    valid_x = rng.normal(size=(2000, D_UKD)).astype(np.float32)
    valid_clicked = (rng.random(2000) < 1 / (1 + np.exp(-_click_logit(valid_x)))).astype(int)
    return x, exposed, clicked, valid_x, valid_clicked


def test_the_adversary_hides_exposure_from_the_representation():
    x, exposed, clicked, valid_x, valid_clicked = _exposure_world()
    plain = fit_ukd_teacher(x, exposed, clicked, valid_x, valid_clicked, 0, adv_weight=0.0, **FAST)
    adversarial = fit_ukd_teacher(x, exposed, clicked, valid_x, valid_clicked, 0, adv_weight=3.0, **FAST)
    assert plain.discriminator_auc > 0.75, plain.discriminator_auc  # exposure is readable without the adversary
    assert adversarial.discriminator_auc < plain.discriminator_auc - 0.15, (
        plain.discriminator_auc,
        adversarial.discriminator_auc,
    )
    # invariance costs no click signal here: feature 0 carries none
    assert plain.valid_auc > 0.8 and adversarial.valid_auc > plain.valid_auc - 0.02
    assert adversarial.settings["adv_weight"] == 3.0 and adversarial.best_step >= FAST["ramp_steps"]


def test_uncertainty_weights_are_lower_where_the_teacher_is_less_sure():
    x, exposed, clicked, valid_x, valid_clicked = _exposure_world()
    # unexposed rows whose click-free features lie far outside the training range: the teacher's hidden units
    # see inputs they were never fitted on, so MC dropout should disagree more there (click-driving features
    # pushed out instead saturate the probability, whose variance then shrinks)
    far = np.flatnonzero(~exposed)[:300]
    x = x.copy()
    x[far, 5:] *= 5.0
    teacher = fit_ukd_teacher(x, exposed, clicked, valid_x, valid_clicked, 0, **FAST)
    unexposed = ~exposed
    assert (teacher.weights[exposed] == 1).all()
    w, v = teacher.weights[unexposed], teacher.variance[unexposed]
    assert teacher.weights[unexposed].mean() == pytest.approx(1.0)
    assert (w > 0).all() and w.max() < 3 and (v > 0).mean() > 0.99  # dropout is on in the MC passes
    order = np.argsort(v, kind="stable")
    assert (np.diff(w[order]) <= 1e-9).all()  # more variance, never more weight
    typical = np.setdiff1d(np.flatnonzero(unexposed), far)
    assert teacher.variance[far].mean() > 2 * teacher.variance[typical].mean()
    assert teacher.weights[far].mean() < 0.8 * teacher.weights[typical].mean()
    # the soft labels are the MC mean: they rank the unexposed rows' true click logits
    assert roc_auc_score(_click_logit(x[typical]) > -1, teacher.scores[typical]) > 0.8


def test_ukd_teacher_is_deterministic_under_a_seed_and_leaves_torch_as_it_was():
    x, exposed, clicked, valid_x, valid_clicked = _exposure_world()
    small = {**FAST, "steps": 300, "mc_passes": 5}
    torch.manual_seed(123)
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    a = fit_ukd_teacher(x, exposed, clicked, valid_x, valid_clicked, 7, **small)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads
    torch.rand(5)  # another global random state: the seed alone decides
    b = fit_ukd_teacher(x, exposed, clicked, valid_x, valid_clicked, 7, **small)
    c = fit_ukd_teacher(x, exposed, clicked, valid_x, valid_clicked, 8, **small)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.discriminator_auc == b.discriminator_auc and a.best_step == b.best_step
    assert not np.array_equal(a.scores, c.scores)


def test_ukd_teacher_refuses_rows_it_cannot_learn_from():
    x, exposed, clicked, valid_x, valid_clicked = _exposure_world()
    with pytest.raises(ValueError, match="exposed and unexposed"):
        fit_ukd_teacher(x, np.ones(len(x), bool), np.zeros(len(x)), valid_x, valid_clicked, 0)
    with pytest.raises(ValueError, match="needs a click"):
        fit_ukd_teacher(x, exposed, np.full(len(x), np.nan), valid_x, valid_clicked, 0)
