"""Feast definitions for the `feast` CLI run on this folder (`feast -c feature_repo plan|apply`).

The objects are built by gpl_platform.features.definitions from the FeatureSpec that the
feast_registry Dagster asset saved (<data_dir>/feast/spec.json), with absolute source paths from
Settings: the same objects the pipeline applies. Export GPL_FEAST_DIR first (see feature_store.yaml).
"""

from gpl_platform.config import load_settings
from gpl_platform.features.definitions import build_definitions
from gpl_platform.features.store import sources_dir, spec_path
from gpl_platform.features.schema import FeatureSpec

_settings = load_settings()
for _obj in build_definitions(FeatureSpec.load(spec_path(_settings)), sources_dir(_settings)):
    globals()[f"{type(_obj).__name__.lower()}_{_obj.name}"] = _obj
