"""The Feast repository ``feature_repo/`` as both the ``feast`` CLI and the pipeline see it.

``feature_repo/definitions.py`` declares the Feast objects literally; it asks this module for what
depends on where the data lives or on the data itself:

* :func:`source_path`: the absolute parquet glob of a view (FileSource paths are read relative to
  the current directory otherwise, and Dagster code servers run elsewhere);
* :func:`attribute_fields`: the profile attribute columns, the one generated part of the schema
  (``<data_dir>/feast/profile_attributes.json``, written by the ``feast_registry`` asset; absent on a
  fresh clone, so the profile views then hold only their fixed features);
* :func:`stored_fields`, :func:`input_fields`: Feast ``Field`` lists of the tables in
  :mod:`gpl_platform.features.schema` (one declaration, shared with the parquet writer).

When the ``feast`` CLI imports the repository, the settings come from the environment
(``GPL_DATA_DIR``...); when the pipeline applies it (:func:`load_objects`), from the settings it runs
with, so one process can apply repositories of several data directories.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from gpl_platform.config import PROJECT_ROOT, Settings, load_settings
from gpl_platform.features.feast_import import import_feast
from gpl_platform.features.schema import EMB, FLOAT, INT, KNOWN_FLAGS, STR, VIEWS, FeatureSpec, input_name

REPO_DIR = PROJECT_ROOT / "feature_repo"
SPEC_FILE = "profile_attributes.json"
_ACTIVE: ContextVar[Settings | None] = ContextVar("gpl_feature_repo_settings", default=None)
_MODULE_COUNTER = itertools.count()


def feast_dir(settings: Settings) -> Path:
    return settings.data_dir / "feast"


def sources_dir(settings: Settings) -> Path:
    return feast_dir(settings) / "sources"


def spec_path(settings: Settings) -> Path:
    return feast_dir(settings) / SPEC_FILE


def repo_settings() -> Settings:
    """The settings the repository is being loaded for."""
    return _ACTIVE.get() or load_settings()


def source_path(view: str) -> str:
    return str(sources_dir(repo_settings()) / view / "*.parquet")


def repo_spec() -> FeatureSpec:
    path = spec_path(repo_settings())
    return FeatureSpec.load(path) if path.exists() else FeatureSpec()


def feast_type(dtype: str):
    import_feast()
    from feast.types import Array, Float32, Float64, Int64, String

    return {INT: Int64, FLOAT: Float64, STR: String, EMB: Array(Float32)}[dtype]


def dtype_name(feast_dtype) -> str:
    """Our dtype name of a Feast type (inverse of :func:`feast_type`)."""
    for name in (INT, FLOAT, STR, EMB):
        if feast_dtype == feast_type(name):
            return name
    raise ValueError(f"feature type {feast_dtype} is not one of the contract's")


def stored_fields(view: str) -> list:
    """The fixed stored features of ``view`` (schema.VIEWS) as Feast fields, with descriptions."""
    from feast import Field

    return [
        Field(name=name, dtype=feast_type(dtype), description=description)
        for name, (dtype, description) in VIEWS[view][2].items()
    ]


def attribute_fields(entity: str) -> list:
    """The generated part: ``<entity>_num_*`` / ``<entity>_cat_*`` fields of the source's attribute columns."""
    from feast import Field

    return [
        Field(name=name, dtype=feast_type(dtype), description=f"attribute column {column!r} of the {entity}s table")
        for name, (column, dtype) in repo_spec().attributes(entity).items()
    ]


def input_fields(views: Sequence, exclude: Sequence[str] = ()) -> list:
    """Model-input fields (``u_*``/``i_*``) of the stored features of ``views``, in order, without the
    known flags (they have their own view) and the names in ``exclude``. No descriptions: Feast checks
    an on-demand view's declared fields against the ones it infers by running the function, and an
    inferred field has none (the stored fields carry them)."""
    from feast import Field

    flags = set(KNOWN_FLAGS.values())
    return [
        Field(name=input_name(f.name), dtype=f.dtype)
        for view in views
        for f in view.features
        if f.name not in flags and input_name(f.name) not in exclude
    ]


@contextmanager
def active(settings: Settings) -> Iterator[None]:
    token = _ACTIVE.set(settings)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def repo_files() -> list[Path]:
    """The .py files ``feast apply`` would import (honoring ``.feastignore``)."""
    import_feast()
    from feast.repo_operations import get_repo_files

    return sorted(get_repo_files(REPO_DIR))


def load_objects(settings: Settings) -> list:
    """Every Feast object the repository declares, for ``settings`` (what ``feast apply`` collects).

    Each call executes the files afresh (a module import would be cached for the first settings)."""
    import_feast()
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource

    kinds = (Entity, DataSource, FeatureView, OnDemandFeatureView, FeatureService)
    objects: list = []
    with active(settings):
        for path in repo_files():
            name = f"gpl_feature_repo_{path.stem}_{next(_MODULE_COUNTER)}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            for value in vars(module).values():
                if isinstance(value, kinds) and not any(value is o for o in objects):
                    objects.append(value)
    # Data sources are applied through their feature views; listing them twice would duplicate them.
    return [o for o in objects if not isinstance(o, DataSource)]
