"""Data sources. Each yields a validated :class:`~gpl_platform.data.contract.Dataset`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from gpl_platform.config import Settings
from gpl_platform.data.contract import ContractError, Dataset
from gpl_platform.data.delivery import contract_day_span, contract_files, plausible_time_window, read_contract_dir
from gpl_platform.data.policies import LoggingPolicies

log = logging.getLogger(__name__)
_CACHE: dict[str, Dataset] = {}


def _cache_key(settings: Settings, days: Sequence[date] | None) -> str:
    key = settings.source_signature()
    if settings.source == "contract":
        folder = _contract_path(settings)
        key["files"] = sorted(
            (str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*") if p.is_file()
        )
        key["days"] = sorted(map(str, days)) if days is not None else None
        key["window"] = [str(settings.contract.earliest_event_time), settings.contract.max_future_days]
    if settings.source == "movielens-100k":
        key["dir"] = str(settings.movielens_dir())
    return json.dumps(key, sort_keys=True, default=str)


def _contract_path(settings: Settings) -> Path:
    if settings.contract.path is None:
        raise ContractError(
            "<config>",
            "contract.path",
            None,
            "is not set: point GPL_CONTRACT__PATH (or --path) at a directory of items/users/events files",
        )
    return Path(settings.contract.path).expanduser().resolve()


def contract_time_window(settings: Settings) -> tuple[datetime, datetime]:
    return plausible_time_window(settings.contract.earliest_event_time, settings.contract.max_future_days)


def load_source(settings: Settings, allow_fetch: bool = True, days: Sequence[date] | None = None) -> Dataset:
    """The configured source's dataset, validated; cached per process (sources are deterministic).

    ``days``: a contract delivered by day folders reads only these days' events (the benchmark sources
    and flat contract files are read whole)."""
    key = _cache_key(settings, days)
    if key not in _CACHE:
        _CACHE.clear()  # one dataset at a time, and the old one freed before the new one is read: they can be large
        if settings.source == "movielens-100k":
            from gpl_platform.data.sources.movielens import ensure_movielens, load_movielens

            directory = ensure_movielens(settings.movielens_dir(), allow_fetch=allow_fetch)
            dataset = load_movielens(directory, settings.movielens, settings.seed)
        elif settings.source == "simulator":
            from gpl_platform.data.sources.simulator import simulate

            dataset = simulate(settings.simulator, settings.seed)
        else:
            dataset = read_contract_dir(
                _contract_path(settings),
                days=days,
                time_window=contract_time_window(settings),
                policies=LoggingPolicies.from_settings(settings.evaluation),
            )
        _CACHE[key] = dataset
    return _CACHE[key]


def delivered_day_events(settings: Settings, days: Sequence[date]):
    """For each of ``days``: the day and the validated events of its folder in the contract directory
    (``events/day=YYYY-MM-DD/``), ``streaming.batch_candidates`` rows of whole requests at a time (a day of any
    size in bounded memory); the catalog is validated once for all of them."""
    from gpl_platform.data.delivery_chunks import delivered_event_chunks

    return delivered_event_chunks(
        _contract_path(settings),
        days,
        settings.streaming.batch_candidates,
        contract_time_window(settings),
        settings.streaming.duckdb_memory_limit,
        LoggingPolicies.from_settings(settings.evaluation),
    )


#: MovieLens-100K's ratings span these UTC days (the files are fixed and sha256-verified).
MOVIELENS_100K_SPAN = (date(1997, 9, 20), date(1998, 4, 22))


def contract_last_day(settings: Settings) -> date | None:
    """The last delivered day of a contract directory, when known without reading rows."""
    span = contract_day_span(_contract_path(settings), contract_time_window(settings))
    return span[1] if span else None


def partition_span(settings: Settings, today: date | None = None) -> tuple[date, date | None]:
    """First and last daily partition of the configured source, without reading its rows: the
    benchmark sources have a fixed span; a contract directory starts at ``contract.start_date`` (or
    the data's first day, from day-folder names or parquet statistics) and is open-ended (None)."""
    if settings.source == "simulator":
        start = date.fromisoformat(settings.simulator.start_date)
        return start, start + timedelta(days=settings.simulator.n_days - 1)
    if settings.source == "movielens-100k":
        return MOVIELENS_100K_SPAN
    today = today or datetime.now(UTC).date()
    start = settings.contract.start_date
    if start is None:
        folder = _contract_path(settings)
        if not folder.is_dir():
            raise ContractError(str(folder), None, None, "is not a directory")
        span = contract_day_span(folder, contract_time_window(settings))  # a clock-error day folder is refused here
        if span is None:
            raise ContractError(
                str(folder),
                None,
                None,
                "has no day folders, and its events (CSV, parquet without statistics, or none "
                "yet) do not tell their first day without reading every row: set "
                "GPL_CONTRACT__START_DATE=YYYY-MM-DD or deliver events/day=YYYY-MM-DD/ folders",
            )
        start = min(max(span[0], settings.contract.earliest_event_time), today)
    return start, None


__all__ = [
    "load_source",
    "delivered_day_events",
    "partition_span",
    "contract_last_day",
    "contract_files",
    "contract_time_window",
    "MOVIELENS_100K_SPAN",
]
