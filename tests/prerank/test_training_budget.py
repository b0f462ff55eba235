"""One training budget for every method: under budget="steps" a row set ten times larger gets the same
optimizer steps and the same validation steps; a run reports whether it stopped by patience or at the
cap; budget="epochs" is the former schedule (a validation per pass, patience in passes); the settings
reach the trainer through one mapping."""

import math
from dataclasses import fields

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gpl_platform.config import TrainingConfig
from gpl_platform.prerank.train import TrainConfig, TrainingRows, train_config_from, train_preranker

COLUMNS = ["u_clicks", "i_ctr", "ui_cosine"] + [f"u_history_emb[{k}]" for k in range(4)]
KEYS = {
    "budget",
    "steps",
    "epochs_run",
    "best_step",
    "best_epoch",
    "best_valid_auc",
    "hit_cap",
    "history",
    "seconds",
    "n_rows",
    "n_pseudo",
    "train_config",
    "shape",
    "n_rows_out_of_vocabulary",
}


def _data(n, seed=0, noise=0.7, random_labels=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(COLUMNS))).astype(np.float32)
    y = x[:, 0] - x[:, 2] + rng.normal(scale=noise, size=n) > 0
    if random_labels:
        y = rng.random(n) < 0.5
    return x, y.astype(np.float32)


def _rows(n, seed=0, **kw):
    x, y = _data(n, seed, **kw)
    return TrainingRows(x, y, np.ones(n, np.float32), np.zeros(n, bool))


VALID_X, VALID_Y = _data(300, seed=99)


def _train(rows, config, valid=(VALID_X, VALID_Y)):
    return train_preranker(rows, COLUMNS, valid[0], valid[1].astype(int), config=config)


def _check_consistent(hist, config, n_rows):
    assert KEYS <= set(hist), KEYS - set(hist)
    steps = [e["step"] for e in hist["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == hist["steps"]
    assert 1 <= hist["best_step"] <= hist["steps"] and hist["best_step"] in steps
    assert 0 <= hist["best_epoch"] <= hist["epochs_run"]
    assert hist["budget"] == config.budget and hist["train_config"]["budget"] == config.budget
    assert hist["n_rows"] == n_rows
    best = next(e for e in hist["history"] if e["step"] == hist["best_step"])
    assert hist["best_valid_auc"] == pytest.approx(best["valid_auc"])
    assert hist["best_valid_auc"] == pytest.approx(max(e["valid_auc"] for e in hist["history"]))
    if n_rows % config.batch_size == 0:  # full batches only: passes and the best pass follow from steps
        per_pass = n_rows // config.batch_size
        assert hist["epochs_run"] == pytest.approx(round(hist["steps"] / per_pass, 2))
        assert hist["best_epoch"] == (hist["best_step"] - 1) // per_pass


def test_row_sets_of_very_different_sizes_get_the_same_steps_and_validation_steps():
    """5 vs 50 steps per pass: the same cap, the same validation steps (one at the cap too), so a
    method with ten times the rows is compared after the same amount of training, not ten times more."""
    config = TrainConfig(batch_size=64, max_steps=110, eval_every_steps=20, patience_evals=1000, seed=1)
    small, large = _rows(320, seed=1), _rows(3200, seed=2)
    _, hs = _train(small, config)
    _, hl = _train(large, config)
    for hist, n in ((hs, 320), (hl, 3200)):
        _check_consistent(hist, config, n)
        assert hist["steps"] == 110 and hist["hit_cap"]
        assert [e["step"] for e in hist["history"]] == [20, 40, 60, 80, 100, 110]
    # the passes differ tenfold, the training does not
    assert hs["epochs_run"] == pytest.approx(22.0) and hl["epochs_run"] == pytest.approx(2.2)


def test_stopping_by_patience_is_not_hitting_the_cap():
    """Random labels: validation AUC does not keep improving, so the run stops a patience window
    after its best step, far below the cap."""
    config = TrainConfig(batch_size=64, max_steps=5000, eval_every_steps=5, patience_evals=3, seed=0)
    rows = _rows(640, seed=3, random_labels=True)
    _, hist = _train(rows, config)
    _check_consistent(hist, config, 640)
    assert hist["steps"] < config.max_steps and not hist["hit_cap"]
    assert hist["steps"] == hist["best_step"] + config.patience_evals * config.eval_every_steps

    # the same run capped exactly where patience stopped it: patience decided, so still not the cap
    capped = TrainConfig(**{**config.__dict__, "max_steps": hist["steps"]})
    _, again = _train(rows, capped)
    assert again["steps"] == hist["steps"] and again["best_step"] == hist["best_step"]
    assert not again["hit_cap"]
    # one validation earlier the cap stops it while the best is still within patience
    early = hist["steps"] - config.eval_every_steps
    _, short = _train(rows, TrainConfig(**{**config.__dict__, "max_steps": early}))
    assert short["steps"] == early and short["best_step"] == hist["best_step"] and short["hit_cap"]


def test_a_tiny_cap_is_reported_as_hit():
    config = TrainConfig(batch_size=64, max_steps=3, eval_every_steps=20, patience_evals=2, seed=0)
    _, hist = _train(_rows(640, seed=4), config)
    _check_consistent(hist, config, 640)
    assert hist["steps"] == 3 and hist["hit_cap"] and hist["best_step"] == 3
    assert [e["step"] for e in hist["history"]] == [3]  # validated at the cap, not skipped
    assert hist["epochs_run"] == pytest.approx(0.3) and hist["best_epoch"] == 0


def test_the_epochs_budget_is_the_former_schedule():
    """A validation after every pass, patience in passes, the epoch cap (max_steps plays no part)."""
    rows = _rows(600, seed=5)  # 600 / 64: nine full batches and a partial one per pass
    per_pass = math.ceil(600 / 64)
    long = TrainConfig(budget="epochs", epochs=4, patience=10, batch_size=64, max_steps=1, seed=0)
    _, hist = _train(rows, long)
    _check_consistent(hist, long, 600)
    assert [e["step"] for e in hist["history"]] == [per_pass * k for k in (1, 2, 3, 4)]
    assert [e["epochs_run"] for e in hist["history"]] == [1.0, 2.0, 3.0, 4.0]
    assert hist["epochs_run"] == 4 and hist["steps"] == 4 * per_pass and hist["hit_cap"]

    noisy = _rows(600, seed=6, random_labels=True)
    stop = TrainConfig(budget="epochs", epochs=50, patience=2, batch_size=64, seed=0)
    _, hist = _train(noisy, stop)
    _check_consistent(hist, stop, 600)
    assert hist["epochs_run"] < 50 and not hist["hit_cap"]
    assert hist["epochs_run"] == hist["best_epoch"] + 1 + stop.patience  # stopped `patience` passes after the best
    assert hist["best_step"] == (hist["best_epoch"] + 1) * per_pass


def test_the_returned_model_has_the_best_validation_weights():
    config = TrainConfig(batch_size=64, max_steps=400, eval_every_steps=10, patience_evals=4, seed=2)
    model, hist = _train(_rows(640, seed=7), config)
    _check_consistent(hist, config, 640)
    assert roc_auc_score(VALID_Y, model.predict(VALID_X)) == pytest.approx(hist["best_valid_auc"])
    assert hist["best_valid_auc"] > 0.8  # it learned


def test_without_validation_labels_the_score_is_the_training_loss():
    config = TrainConfig(batch_size=64, max_steps=60, eval_every_steps=20, patience_evals=5, seed=0)
    one_class = (VALID_X[:50], np.zeros(50, np.float32))
    _, hist = _train(_rows(640, seed=8), config, valid=one_class)
    assert all(np.isnan(e["valid_auc"]) for e in hist["history"])
    best = min(hist["history"], key=lambda e: e["train_loss"])
    assert hist["best_step"] == best["step"] and hist["best_valid_auc"] == pytest.approx(-best["train_loss"])


def test_settings_reach_the_trainer_through_one_mapping():
    cfg = TrainingConfig(
        budget="epochs",
        max_steps=123,
        eval_every_steps=7,
        patience_evals=4,
        epochs=9,
        patience=3,
        batch_size=256,
        lr=1e-3,
        weight_decay=0.01,
    )
    out = train_config_from(cfg, seed=5)
    for f in fields(TrainConfig):
        assert getattr(out, f.name) == (5 if f.name == "seed" else getattr(cfg, f.name)), f.name
    assert TrainingConfig().budget == "steps" and TrainConfig().budget == "steps"  # the new protocol by default
    defaults = train_config_from(TrainingConfig(), seed=0)
    assert defaults.__dict__ == TrainConfig().__dict__  # one set of defaults
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(budget="passes")
