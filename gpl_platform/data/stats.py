"""Dataset statistics (docs/EVALUATION.md is generated from these) and contract export."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gpl_platform.data.contract import Dataset


def dataset_statistics(dataset: Dataset) -> dict:
    ev = dataset.events
    exposed, unexposed = ev[ev["exposed"]], ev[~ev["exposed"]]
    per_request = ev.groupby("request_id").size()
    oracle_exp = exposed["oracle_label"].astype("Float64")
    oracle_unexp = unexposed["oracle_label"].astype("Float64")
    return {
        "dataset": dataset.name,
        "items": len(dataset.items),
        "users": len(dataset.users),
        "users_with_requests": int(ev["user_id"].nunique()),
        "days_with_events": int(ev["day"].nunique()),
        "first_day": str(ev["day"].min()),
        "last_day": str(ev["day"].max()),
        "requests": int(len(per_request)),
        "candidates": int(len(ev)),
        "candidates_per_request_median": float(per_request.median()),
        "candidates_per_request_mean": round(float(per_request.mean()), 2),
        "exposure_rate": round(float(ev["exposed"].mean()), 4),
        "exposed_candidates": int(len(exposed)),
        "positive_rate_exposed (clicked)": round(float(exposed["clicked"].astype("Float64").mean()), 4),
        "positive_rate_exposed (oracle)": round(float(oracle_exp.mean()), 4) if oracle_exp.notna().any() else None,
        "positive_rate_unexposed (oracle)": round(float(oracle_unexp.mean()), 4)
        if oracle_unexp.notna().any()
        else None,
        "items_ever_exposed": int(exposed["item_id"].nunique()),
        "items_ever_candidates": int(ev["item_id"].nunique()),
        "items_never_exposed_share": round(1 - exposed["item_id"].nunique() / max(ev["item_id"].nunique(), 1), 4),
    }


def export_contract_dir(dataset: Dataset, out: Path, csv: bool = False, by_day: bool = False) -> list[Path]:
    """Write items/users/events in the contract format (atomically per file).

    ``by_day``: the events as a daily delivery, ``events/day=YYYY-MM-DD/part-0.parquet`` (each day written
    atomically), which ingestion reads one day at a time; into a directory without events only, parquet only.
    A table file of the other format from an earlier export is removed once the new one is in place
    (both would be read as one table); a ``<table>/`` folder is never touched: the export refuses."""
    from gpl_platform.data.contract import ContractError
    from gpl_platform.data.delivery import READERS, write_event_day

    out = Path(out)
    if by_day and csv:
        raise ValueError("a by-day export writes parquet day folders: drop --csv or --by-day")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("items", "users", "events"):
        if (out / name).is_dir():
            raise ContractError(
                str(out / name),
                None,
                None,
                "is a table folder: export into another directory "
                "(a folder and a file of the same table would be read together)",
            )
    if by_day and any((out / f"events{ext}").exists() for ext in READERS):
        raise ContractError(
            str(out),
            None,
            None,
            "has an events file: a by-day export needs a directory without "
            "events (the file and the day folders would be read together)",
        )
    written = []
    tables = [("items", dataset.items), ("users", dataset.users)]
    if not by_day:
        tables.append(("events", dataset.events.drop(columns=["day"])))
    for name, frame in tables:
        target = out / f"{name}.{'csv' if csv else 'parquet'}"
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        os.close(fd)
        try:
            if csv:
                frame = frame.copy()
                if "event_time" in frame:
                    frame["event_time"] = frame["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
                frame.to_csv(tmp, index=False)
            else:
                frame.to_parquet(tmp, index=False)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for ext in READERS:
            stale = out / f"{name}{ext}"
            if stale != target and stale.exists():
                stale.unlink()
        written.append(target)
    if by_day:
        for day, events in dataset.events.groupby("day", sort=True):
            written.append(write_event_day(out, day, events.drop(columns=["day"])))
    return written
