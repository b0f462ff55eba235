"""Data sources. Each yields a validated :class:`~gpl_platform.contract.Dataset`."""

from __future__ import annotations

import json
import logging
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from gpl_platform.config import Settings
from gpl_platform.contract import ContractError, Dataset, contract_files, read_contract_dir

log = logging.getLogger(__name__)
_CACHE: dict[str, Dataset] = {}


def _cache_key(settings: Settings) -> str:
    key = settings.source_signature()
    if settings.source == "contract":
        folder = _contract_path(settings)
        key["files"] = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    if settings.source == "movielens-100k":
        key["dir"] = str(settings.movielens_dir())
    return json.dumps(key, sort_keys=True, default=str)


def _contract_path(settings: Settings) -> Path:
    if settings.contract.path is None:
        raise ContractError("<config>", "contract.path", None,
                            "is not set: point GPL_CONTRACT__PATH (or --path) at a directory of items/users/events files")
    return Path(settings.contract.path).expanduser().resolve()


def load_source(settings: Settings, allow_fetch: bool = True) -> Dataset:
    """The configured source's dataset, validated; cached per process (sources are deterministic)."""
    key = _cache_key(settings)
    if key not in _CACHE:
        if settings.source == "movielens-100k":
            from gpl_platform.sources.movielens import ensure_movielens, load_movielens

            directory = ensure_movielens(settings.movielens_dir(), allow_fetch=allow_fetch)
            dataset = load_movielens(directory, settings.movielens, settings.seed)
        elif settings.source == "simulator":
            from gpl_platform.sources.simulator import simulate

            dataset = simulate(settings.simulator, settings.seed)
        else:
            dataset = read_contract_dir(_contract_path(settings))
        _CACHE.clear()  # one dataset at a time: they can be large
        _CACHE[key] = dataset
    return _CACHE[key]


def source_day_span(settings: Settings) -> tuple[date, date]:
    """First and last UTC day with events, cheaply where the source allows (used to build partitions)."""
    if settings.source == "simulator":
        start = date.fromisoformat(settings.simulator.start_date)
        return start, start + timedelta(days=settings.simulator.n_days - 1)
    if settings.source == "movielens-100k":
        from gpl_platform.sources.movielens import ATOMIC_FILES, detect_layout

        directory = settings.movielens_dir()
        try:
            layout = detect_layout(directory)
        except FileNotFoundError:
            # Not fetched yet: MovieLens-100K's known span, so definitions load before the fetch.
            return date(1997, 9, 20), date(1998, 4, 22)
        if layout == "recbole":
            ts = pd.read_csv(directory / ATOMIC_FILES[0], sep="\t", usecols=[3]).iloc[:, 0].to_numpy()
        else:
            ts = pd.read_csv(directory / "u.data", sep="\t", header=None, usecols=[3]).iloc[:, 0].to_numpy()
        first, last = pd.to_datetime([np.min(ts), np.max(ts)], unit="s", utc=True)
        return first.date(), last.date()
    dataset = load_source(settings)
    if dataset.events.empty:
        raise ContractError(str(_contract_path(settings)), "event_time", 0, "no events: nothing to partition")
    return min(dataset.events["day"]), max(dataset.events["day"])


__all__ = ["load_source", "source_day_span", "contract_files"]
