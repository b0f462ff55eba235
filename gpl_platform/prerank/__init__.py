"""The pre-ranker (shapes mlp, two_tower, cold): model, training with actual + pseudo labels, training data per
method."""
