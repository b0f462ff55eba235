"""The Dagster layer: thin assets over gpl_platform. Load with `dagster dev -m assets.definitions`."""

import warnings

# BackfillPolicy is marked beta in Dagster 1.13; we rely on it deliberately (single-run backfills).
warnings.filterwarnings("ignore", message=".*backfill_policy.*is currently in beta.*")
