"""Great Expectations plumbing: one ephemeral context per process (created on the first validation;
``great_expectations`` takes about 3.5 s to import), a whole-dataframe pandas batch per suite, and the
translation of a GX report into :class:`~gpl_platform.quality.results.ExpectationOutcome` s."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from gpl_platform.quality.results import ExpectationOutcome, QualityResult, jsonable

log = logging.getLogger(__name__)

_GX_LOCK = threading.Lock()
_GX_STATE: dict[str, Any] = {}


def gx_state():
    """(gx module, gxe module, ephemeral context); created once per process."""
    with _GX_LOCK:
        if not _GX_STATE:
            for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
                logging.getLogger(name).setLevel(logging.WARNING)
            import great_expectations as gx
            import great_expectations.expectations as gxe

            context = gx.get_context(mode="ephemeral")
            try:  # no tqdm bars in pipeline logs
                from great_expectations.data_context.types.base import ProgressBarsConfig

                context.variables.progress_bars = ProgressBarsConfig(globally=False)
            except Exception:  # pragma: no cover - older/newer layouts
                log.debug("could not silence GX progress bars", exc_info=True)
            _GX_STATE.update(
                gx=gx,
                gxe=gxe,
                context=context,
                datasource=context.data_sources.add_pandas("gpl_quality"),
                batch_defs={},
            )
        return _GX_STATE


def _batch_definition(suite: str):
    state = gx_state()
    with _GX_LOCK:
        if suite not in state["batch_defs"]:
            asset = state["datasource"].add_dataframe_asset(suite)
            state["batch_defs"][suite] = asset.add_batch_definition_whole_dataframe(f"{suite}_whole")
        return state["batch_defs"][suite]


@dataclass
class Rule:
    name: str
    expectation: str  # class name in great_expectations.expectations
    kwargs: dict
    expected: str


def validate_rules(suite: str, frame: pd.DataFrame, rules: Sequence[Rule]) -> list[ExpectationOutcome]:
    if not rules:
        return []
    state = gx_state()
    gx, gxe = state["gx"], state["gxe"]
    expectations = [getattr(gxe, r.expectation)(**r.kwargs, meta={"rule": r.name}) for r in rules]
    gx_suite = gx.ExpectationSuite(name=suite, expectations=expectations)
    batch = _batch_definition(suite).get_batch(batch_parameters={"dataframe": frame})
    report = batch.validate(gx_suite)
    by_rule = {}
    for res in report.results:
        rule = (res.expectation_config.meta or {}).get("rule")
        observed = res.result.get("observed_value") if res.result else None
        if observed is None and res.result and "unexpected_count" in res.result:
            observed = {
                "unexpected_count": res.result["unexpected_count"],
                "unexpected_percent": res.result.get("unexpected_percent"),
            }
        if res.exception_info and res.exception_info.get("raised_exception"):
            observed = f"error: {res.exception_info.get('exception_message')}"
        checked = None
        if res.result and "element_count" in res.result and "unexpected_count" in res.result:
            checked = int(res.result["element_count"]) - int(res.result.get("missing_count") or 0)
        by_rule[rule] = (bool(res.success), observed, checked)
    out = []
    for r in rules:
        passed, observed, checked = by_rule.get(r.name, (False, "not evaluated", None))
        out.append(
            ExpectationOutcome(
                r.name, r.expectation, r.kwargs.get("column"), passed, jsonable(observed), r.expected, checked
            )
        )
    return out


def merge_chunk_outcomes(per_chunk: Sequence[Sequence[ExpectationOutcome]]) -> list[ExpectationOutcome]:
    """The outcomes of row-level rules validated chunk by chunk over one partition, as if validated whole:
    a rule passes when it passes in every chunk, its unexpected rows add up, and its percent is over every
    row it judged. Only row-level rules merge this way (a mean of chunks is not the chunks' mean), so an
    outcome without ``checked`` is refused."""
    if not per_chunk:
        return []
    merged = []
    for outcomes in zip(*per_chunk, strict=True):
        first = outcomes[0]
        if any(o.name != first.name for o in outcomes):
            raise ValueError(f"chunks validated different rules: {sorted({o.name for o in outcomes})}")
        errors = [o.observed for o in outcomes if isinstance(o.observed, str)]
        if errors:  # GX raised on some chunk: that message is the observation
            merged.append(replace(first, passed=False, observed=errors[0], checked=None))
            continue
        if any(o.checked is None for o in outcomes):
            raise ValueError(f"{first.name}: only row-level rules can be merged over chunks")
        checked = sum(o.checked for o in outcomes)
        unexpected = sum(int((o.observed or {}).get("unexpected_count") or 0) for o in outcomes)
        observed = {
            "unexpected_count": unexpected,
            "unexpected_percent": 100.0 * unexpected / checked if checked else 0.0,
        }
        merged.append(replace(first, passed=all(o.passed for o in outcomes), observed=observed, checked=checked))
    return merged


def suite_result(suite: str, outcomes: list[ExpectationOutcome], metadata: dict) -> QualityResult:
    passed = all(o.passed for o in outcomes)
    meta = {
        "passed": passed,
        **metadata,
        "failed_rules": [o.name for o in outcomes if not o.passed],
        "failures": [o.describe() for o in outcomes if not o.passed],
    }
    return QualityResult(suite, passed, outcomes, jsonable(meta))


def custom_outcome(
    name: str, passed: bool, observed: Any, expected: str, column: str | None = None
) -> ExpectationOutcome:
    return ExpectationOutcome(name, "custom", column, bool(passed), jsonable(observed), expected)


def empty_result(suite: str, allowed: bool) -> QualityResult:
    outcome = custom_outcome("rows", allowed, 0, "> 0 rows" if not allowed else "any")
    res = suite_result(suite, [outcome], {"rows": 0})
    if allowed:
        res.skipped = "empty partition"
        res.metadata["skipped"] = "empty partition"
    return res
