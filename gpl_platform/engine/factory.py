"""The engine the settings select, one per process and configuration."""

from __future__ import annotations

from gpl_platform.config import Settings
from gpl_platform.engine.base import Engine, LocalEngine

_ENGINES: dict[tuple, Engine] = {}


def make_engine(settings: Settings) -> Engine:
    """The engine the settings select, one per process and configuration (a Ray connection is reused)."""
    key = (
        settings.engine,
        settings.streaming.model_dump_json(),
        settings.ray.model_dump_json(),
        str(settings.data_dir),
    )
    if key not in _ENGINES:
        if settings.engine == "ray":
            from gpl_platform.engine.ray_engine import RayEngine  # Ray is imported only when used

            staging = settings.ray.staging_dir or settings.data_dir / "staging"
            _ENGINES[key] = RayEngine(settings.ray.model_copy(update={"staging_dir": staging}), settings.streaming)
        else:
            _ENGINES[key] = LocalEngine(settings.streaming)
    return _ENGINES[key]


def close_engines() -> None:
    """Release what the engines of :func:`make_engine` hold (Ray actors keep their CPUs until then)."""
    for engine in _ENGINES.values():
        engine.close()
    _ENGINES.clear()
