"""The pre-ranker: model, training with actual + pseudo labels, training data per method."""
