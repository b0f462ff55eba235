"""The pipeline's small models train on the configured number of torch threads, and leave torch as it was."""

import numpy as np
import pytest
import torch

from gpl_platform.config import TrainingConfig
from gpl_platform.engine.threads import torch_threads
from gpl_platform.prerank import train as train_module
from gpl_platform.prerank.train import TrainConfig, TrainingRows, train_config_from, train_preranker

COLUMNS = ["a", "b", "c"]


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_torch_threads_sets_and_restores(two_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with torch_threads(None):  # None leaves torch's own setting
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a failed fit")
    assert torch.get_num_threads() == 2  # restored after an error too
    with pytest.raises(ValueError, match="threads must be >= 1"), torch_threads(0):
        pass


def test_the_preranker_trains_on_the_configured_threads(two_threads, monkeypatch):
    seen = []
    loss = train_module.weighted_bce

    def counting_loss(*args):  # the training loop's loss, recording torch's thread count at every step
        seen.append(torch.get_num_threads())
        return loss(*args)

    monkeypatch.setattr(train_module, "weighted_bce", counting_loss)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    rows = TrainingRows(x[:150], y[:150], np.ones(150, np.float32), np.zeros(150, bool))
    config = train_config_from(TrainingConfig(torch_threads=1, max_steps=5, eval_every_steps=5), seed=0)
    _, history = train_preranker(rows, COLUMNS, x[150:], y[150:].astype(int), config=config)
    assert seen and set(seen) == {1}
    assert history["train_config"]["torch_threads"] == 1
    assert torch.get_num_threads() == 2
    seen.clear()
    train_preranker(rows, COLUMNS, x[150:], y[150:].astype(int), config=TrainConfig(torch_threads=None, max_steps=5))
    assert set(seen) == {2}  # None: torch's setting, untouched
