"""Trial status vocabulary and ranking of a sweep's trials (docs/sweep.md "Trial statuses"); no Ray, no MLflow."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

COMPLETED, STOPPED_EARLY, ERRORED, DIVERGED = "completed", "stopped_early", "errored", "diverged"
STATUSES = (COMPLETED, STOPPED_EARLY, ERRORED, DIVERGED)
SELECTION_METRIC = "val_acc_avg"


def is_finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def status_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many trials ended in each of STATUSES."""
    statuses = [r["status"] for r in rows]
    return {s: statuses.count(s) for s in STATUSES}


def trial_status(last_result: Mapping[str, Any] | None, errored: bool, n_tasks: int) -> str:
    """What happened to a finished trial, from its last result: one of STATUSES."""
    if errored:
        return ERRORED
    if last_result and last_result.get("diverged"):
        return DIVERGED
    if last_result and int(last_result.get("task", 0)) >= n_tasks:
        return COMPLETED
    return STOPPED_EARLY


def rank_trials(rows: Iterable[Mapping[str, Any]], metric: str = SELECTION_METRIC) -> list[Mapping[str, Any]]:
    """Trials that trained every task (status `completed`), best `metric` first.

    Trials stopped early are never candidates: class-IL accuracy after one or two tasks is high and
    would win against every finished trial.
    """
    def score(row: Mapping[str, Any]) -> float:
        value = row.get(metric)
        return value if is_finite_number(value) else -math.inf

    candidates = [r for r in rows if r.get("status") == COMPLETED and score(r) > -math.inf]
    return sorted(candidates, key=score, reverse=True)
