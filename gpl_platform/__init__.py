"""gpl-platform: Generative Pseudo-Labeling for recommendation pre-rankers."""

__version__ = "0.1.0"
