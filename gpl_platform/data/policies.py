"""Logging policies: which policy served each request, and the exploration slice (docs/DATA_CONTRACT.md).

A log may mix the production system's traffic, whose exposures follow what that system chose to show,
with a small share served by an exploration policy (for example a uniformly random choice among the
request's candidates). The exploration rows are the one part of a log whose clicks say how a model
orders candidates nobody would otherwise have shown, so evaluation tests on them and training leaves
them out by default. Events name their policy in the optional ``logging_policy`` column; a row
without one was served by the production policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from gpl_platform.data.contract_errors import ContractError, fail_rows, origin_file
from gpl_platform.data.sql import quote_literal

PRODUCTION_POLICY = "production"
UNIFORM_RANDOM_POLICY = "uniform_random"
POLICY_COLUMN = "logging_policy"


@dataclass(frozen=True)
class LoggingPolicies:
    """The policy names a log may use: ``production`` for normal traffic (always including
    :data:`PRODUCTION_POLICY`), ``exploration`` for the slice, ``uniform`` for exploration policies that
    show a uniformly random subset of each request's candidates (their propensity can be derived)."""

    exploration: tuple[str, ...] = (UNIFORM_RANDOM_POLICY,)
    production: tuple[str, ...] = (PRODUCTION_POLICY,)
    uniform: tuple[str, ...] = (UNIFORM_RANDOM_POLICY,)

    def __post_init__(self) -> None:
        both = sorted(set(self.exploration) & set(self.production) | set(self.exploration) & {PRODUCTION_POLICY})
        if both:
            raise ValueError(f"logging policies {both} are listed both as exploration and as production")
        # a uniform policy only matters where it explores (one may list exploration policies without it)
        object.__setattr__(self, "uniform", tuple(p for p in self.uniform if p in self.exploration))

    @classmethod
    def from_settings(cls, evaluation) -> LoggingPolicies:
        """From ``settings.evaluation`` (its ``exploration_policies``, ``production_policies`` and
        ``uniform_policies``)."""
        return cls(
            exploration=tuple(evaluation.exploration_policies),
            production=tuple(evaluation.production_policies),
            uniform=tuple(evaluation.uniform_policies),
        )

    @property
    def production_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((PRODUCTION_POLICY, *self.production)))

    @property
    def known(self) -> tuple[str, ...]:
        return (*self.production_names, *self.exploration)


DEFAULT_POLICIES = LoggingPolicies()


def held_out_of_training(evaluation) -> tuple[str, ...]:
    """The policies whose rows no training set holds: the exploration slice, unless
    ``evaluation.exploration_trains`` lets it train (and then it is no test set)."""
    return () if evaluation.exploration_trains else tuple(evaluation.exploration_policies)


def validated_policies(events: pd.DataFrame, file: str, policies: LoggingPolicies) -> pd.Series:
    """The ``logging_policy`` of every row (the production policy where the column is missing or
    empty). Refuses names that are not configured and requests served by more than one policy."""
    if POLICY_COLUMN not in events:
        return pd.Series(PRODUCTION_POLICY, index=events.index, dtype=object)
    column = events[POLICY_COLUMN]
    if not (ptypes.is_string_dtype(column) or ptypes.is_object_dtype(column) or column.isna().all()):
        raise ContractError(
            origin_file(events, file), POLICY_COLUMN, len(column), f"have type {column.dtype}, expected policy names"
        )
    fail_rows(
        events,
        file,
        POLICY_COLUMN,
        column.notna() & ~column.map(lambda v: isinstance(v, str)),
        "are not strings (expected a policy name or null)",
    )
    names = column.where(column.notna() & (column.astype("string").str.strip() != ""), PRODUCTION_POLICY)
    names = names.astype(str).str.strip().astype(object)
    unknown = ~names.isin(policies.known)
    if unknown.any():
        listed = sorted(set(names[unknown]))
        raise ContractError(
            origin_file(events, file, unknown),
            POLICY_COLUMN,
            int(unknown.sum()),
            f"name logging policies that are not configured: {', '.join(map(repr, listed[:5]))} (production: "
            f"{', '.join(policies.production_names)}; exploration: "
            f"{', '.join(policies.exploration) or 'none'}; list them in evaluation.production_policies or "
            "evaluation.exploration_policies)",
        )
    per_request = names.groupby(events["request_id"], sort=False).transform("nunique")
    fail_rows(events, file, POLICY_COLUMN, per_request > 1, "belong to a request served by more than one policy")
    return names


def checked_propensities(events: pd.DataFrame, file: str, policies: LoggingPolicies) -> pd.Series:
    """``propensity`` with the per-policy rule applied: within one policy either every exposed row has a
    propensity or none does; the exploration slice needs them, except under a uniform policy, where a
    missing one is the request's exposed share (each of ``n`` candidates shown with probability ``k/n``),
    on shown and unshown rows alike.
    ``events`` carries validated ``exposed``, ``propensity`` and ``logging_policy`` columns."""
    propensity = events["propensity"].astype("float64").copy()
    exposed = events["exposed"].to_numpy(bool)
    policy = events[POLICY_COLUMN]
    missing = exposed & propensity.isna().to_numpy()
    known_in_policy = (
        propensity.notna().groupby(policy, sort=False).transform("any").to_numpy(bool)
        if len(events)
        else np.zeros(0, bool)
    )
    fail_rows(
        events,
        file,
        "propensity",
        missing & known_in_policy,
        "are exposed but have no propensity while other rows of their logging policy have one (give all "
        "exposed rows of a policy one, or none)",
    )
    uniform = policy.isin(policies.uniform).to_numpy(bool)
    share = events["exposed"].groupby(events["request_id"], sort=False).transform("mean").to_numpy(float)
    derived = propensity.isna().to_numpy(bool) & uniform  # every candidate of the request had that chance
    propensity[derived] = share[derived]
    fail_rows(
        events,
        file,
        "propensity",
        missing & ~uniform & policy.isin(policies.exploration).to_numpy(bool),
        "are exposed by an exploration policy that is not uniform and have no propensity (the slice's "
        "metrics weight each shown row by 1/propensity; name uniform policies in evaluation.uniform_policies)",
    )
    return propensity


def exploration_mask(events: pd.DataFrame, policies: LoggingPolicies) -> np.ndarray:
    """True on the rows the exploration policies served (a frame without the column has none)."""
    if POLICY_COLUMN not in events:
        return np.zeros(len(events), bool)
    return events[POLICY_COLUMN].isin(policies.exploration).to_numpy(bool)


def slice_summary(events: pd.DataFrame, policies: LoggingPolicies) -> dict:
    """What a log's exploration slice holds: rows, exposed rows, requests, users, days and the rows of
    every policy the log names."""
    mask = exploration_mask(events, policies)
    part = events[mask]
    per_policy = (
        events[POLICY_COLUMN].value_counts().sort_index()
        if POLICY_COLUMN in events
        else pd.Series({PRODUCTION_POLICY: len(events)})
    )
    days = part["day"] if "day" in part else part["event_time"].dt.tz_convert("UTC").dt.date
    return {
        "rows": int(mask.sum()),
        "exposed_rows": int(part["exposed"].sum()),
        "requests": int(part["request_id"].nunique()),
        "users": int(part["user_id"].nunique()),
        "days": int(pd.Series(days).nunique()),
        "policies": {str(k): int(v) for k, v in per_policy.items()},
    }


def describe_slice(summary: dict) -> str:
    """One line for ``gpl data validate``."""
    policies = ", ".join(f"{name} {rows}" for name, rows in summary["policies"].items())
    if not summary["rows"]:
        return f"exploration slice: none (rows per logging policy: {policies})"
    return (
        f"exploration slice: {summary['rows']} rows ({summary['exposed_rows']} shown) in {summary['requests']} "
        f"requests of {summary['users']} users over {summary['days']} days (rows per logging policy: {policies})"
    )


def not_served_by(names: Iterable[str], column: str = "logging_policy") -> str:
    """A SQL ``AND`` clause keeping the events rows no policy of ``names`` served (empty: every row); the
    names are quoted literals (they come from settings)."""
    names = list(names)
    if not names:
        return ""
    listed = ", ".join(quote_literal(n) for n in names)
    return f"AND coalesce({column}, {quote_literal(PRODUCTION_POLICY)}) NOT IN ({listed})"
