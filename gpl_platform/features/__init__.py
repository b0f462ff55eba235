"""Feature store layer: feature computation (DuckDB, point-in-time), parquet sources, the Feast
repository (``feature_repo/``) and its wrapper, the derived model inputs Feast computes, training
retrieval and the online client. Feast itself is imported lazily (it takes seconds).

Entry points::

    from gpl_platform.features import FeastStore
    store = FeastStore(settings)                       # the online store / registry of settings.feature_store
    store.historical_features(entity_df)               # training: point-in-time correct model inputs
    store.online_client().get("u1", ["i1", "i2"])      # serving: CandidateFeatures (matrix + flags)
"""

from gpl_platform.features.schema import FeatureSpec
from gpl_platform.features.serving import CandidateFeatures, OnlineFeatureClient, feature_matrix
from gpl_platform.features.store import DEFAULT_SERVICE, FeastStore

__all__ = ["DEFAULT_SERVICE", "CandidateFeatures", "FeastStore", "FeatureSpec", "OnlineFeatureClient", "feature_matrix"]
