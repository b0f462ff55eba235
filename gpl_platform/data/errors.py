"""Errors every per-day stage raises (ingestion, pseudo-labels, features)."""


class MissingUpstreamDays(RuntimeError):
    """A per-day computation needs earlier days that have not been ingested yet."""
