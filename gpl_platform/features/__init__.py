"""Feature store layer: feature computation (DuckDB, point-in-time), parquet sources, Feast wrapper,
training retrieval and the online client. Feast itself is imported lazily (it takes seconds).

Entry points::

    from gpl_platform.features import FeastStore
    store = FeastStore(settings)                       # SQLite online store; redis_url=... for Redis
    store.historical_features(entity_df)               # training: point-in-time correct
    store.online_client().get("u1", ["i1", "i2"])      # serving: CandidateFeatures (matrix + flags)
"""

from gpl_platform.features.schema import FeatureSpec
from gpl_platform.features.serving import CandidateFeatures, OnlineFeatureClient, feature_matrix, finalize
from gpl_platform.features.store import FeastStore

__all__ = ["CandidateFeatures", "FeastStore", "FeatureSpec", "OnlineFeatureClient", "feature_matrix", "finalize"]
