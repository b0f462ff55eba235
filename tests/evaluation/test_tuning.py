"""The tuning rule: the same number of trials for every tuned method, the current settings first, the best mean
validation score wins (ties to the earlier trial), controls and ablations follow gpl's choice."""

import numpy as np
import pytest

from gpl_platform.config import ConfidenceConfig, TrainingConfig
from gpl_platform.evaluation import tuning
from gpl_platform.evaluation.method_runs import MethodConfig


@pytest.mark.parametrize("name", sorted(tuning.METHOD_SPACE))
def test_every_tuned_method_gets_the_same_budget_starting_from_its_settings(name):
    cfg, confidence = TrainingConfig(), ConfidenceConfig()
    trials = tuning.trials(name, cfg, confidence)
    assert len(trials) == tuning.TRIALS
    assert trials[0] == MethodConfig(cfg, confidence)
    assert len({repr(tuning.describe(t)) for t in trials}) == tuning.TRIALS  # all different
    assert trials == tuning.trials(name, cfg, confidence)  # deterministic
    own = set(tuning.METHOD_SPACE[name]) - {"confidence"}
    varied = {k for t in trials[1:] for k, v in tuning.describe(t).items() if v != tuning.describe(trials[0])[k]}
    assert varied <= set(tuning.SHARED_SPACE) | own | {"confidence"}  # only the method's own knobs move


def test_the_best_mean_validation_score_wins_and_followers_take_gpls_choice():
    cfg, confidence = TrainingConfig(), ConfidenceConfig()
    planted = {"gpl": 5, "ips": 3}  # the trial index that scores best for each method

    def evaluate(name, config):
        index = tuning.trials(name, cfg, confidence).index(config)
        best = planted.get(name, 0)
        per_seed = [0.70 if index == best else 0.60, 0.72 if index == best else 0.61]
        return {"runs": {name: [{tuning.SELECTION_METRIC: v} for v in per_seed]}}

    names = ["exposed_only", "ips", "gpl", "gpl_request_permuted", "gpl_sid"]
    chosen = tuning.select(evaluate, names, cfg, confidence)
    assert chosen["configs"]["gpl"] == tuning.trials("gpl", cfg, confidence)[5]
    assert chosen["configs"]["ips"] == tuning.trials("ips", cfg, confidence)[3]
    assert chosen["configs"]["exposed_only"] == tuning.trials("exposed_only", cfg, confidence)[0]
    assert chosen["configs"]["gpl_request_permuted"] == chosen["configs"]["gpl"] == chosen["configs"]["gpl_sid"]
    record = chosen["trials"]["gpl"]
    assert [row["chosen"] for row in record].index(True) == 5
    assert record[5]["score"] == pytest.approx(0.71) and len(record) == tuning.TRIALS
    assert set(chosen["trials"]) == {"exposed_only", "ips", "gpl"}  # controls and ablations are not searched


def test_ties_go_to_the_earlier_trial_and_a_failed_trial_never_wins():
    cfg, confidence = TrainingConfig(), ConfidenceConfig()

    def evaluate(name, config):
        index = tuning.trials(name, cfg, confidence).index(config)
        if index == 2:
            return {"runs": {}}  # the method had nothing to learn from under this configuration
        return {"runs": {name: [{tuning.SELECTION_METRIC: 0.65 if index in (3, 6) else 0.6}]}}

    chosen = tuning.select(evaluate, ["ips"], cfg, confidence)
    assert chosen["configs"]["ips"] == tuning.trials("ips", cfg, confidence)[3]
    assert chosen["trials"]["ips"][2]["score"] == -np.inf
