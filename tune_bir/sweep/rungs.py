"""Is early stopping informative? How well the scores at ASHA's rungs rank the trials' final scores.

ASHA stops a trial at a rung on its score there. That is only as good as the rank correlation between the
rung's scores and the final ones: in class-incremental learning every learner scores high on the first
tasks and they differ later, so a rung at task 2 may rank trials almost at random (docs/sweep.md
"Is early stopping informative?"). Measured here with Spearman's rho and a bootstrap interval over trials.

From a sweep alone only the trials that passed every rung have final scores: their correlation is range-
restricted (the stopped trials, often the most different ones, are missing) and weaker evidence than a
full-budget reference, where every config trains to the end (benchmarks/asha_reference.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

LOW_RHO = 0.5          # below this a rung's stops are closer to a coin toss than to a ranking
MIN_TRIALS = 5         # fewer trials say nothing about a correlation
N_BOOT = 2000
CONFIDENCE = 0.95
# accuracies closer than this are one score: a validation image moves val_acc_avg by at least 1e-6 (docs/sweep.md
# "ASHA rungs and ties"), while the same accuracy summed in another order differs by float rounding (~1e-9)
RESOLUTION_DIGITS = 6


@dataclass(frozen=True)
class RungCorrelation:
    """Spearman's rho between the scores at one rung and the final scores, over `n` trials."""

    task: int              # the rung: tasks trained when it compares trials
    n: int
    rho: float
    low: float             # bootstrap percentile interval (CONFIDENCE)
    high: float
    restricted: bool       # True: only trials that passed every rung (a sweep's completed trials)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_low(self) -> bool:
        return math.isfinite(self.rho) and self.rho < LOW_RHO


def rung_tasks(asha: Mapping[str, float]) -> list[int]:
    """The tasks at which ASHA compares trials, as Ray's ASHAScheduler places its rungs (grace * rf^k < max_t),
    from the `asha` entry of sweep.json (steps converted to tasks)."""
    grace, rf, max_t = int(asha["grace_period"]), float(asha["reduction_factor"]), int(asha["max_t"])
    per_task = int(asha.get("segments_per_task", 1))
    n_rungs = int(math.log(max_t / grace) / math.log(rf) + 1)
    steps = [int(grace * rf**k) for k in range(n_rungs)]
    return sorted({math.ceil(s / per_task) for s in steps if s < max_t})


def spearman_with_interval(rung: Sequence[float], final: Sequence[float], *, n_boot: int = N_BOOT,
                           seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of paired scores (ties share ranks) and its bootstrap percentile interval over pairs."""
    from scipy.stats import spearmanr

    x = np.round(np.asarray(rung, dtype=float), RESOLUTION_DIGITS)
    y = np.round(np.asarray(final, dtype=float), RESOLUTION_DIGITS)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, math.nan
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), size=(n_boot, len(x)))
    boot = []
    for idx in draws:
        bx, by = x[idx], y[idx]
        if np.ptp(bx) > 0 and np.ptp(by) > 0:   # a resample of all-tied values has no rank correlation
            boot.append(spearmanr(bx, by).statistic)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(boot, [tail, 1 - tail]) if boot else (math.nan, math.nan)
    return rho, float(low), float(high)


def rung_correlations(curves: Mapping[str, Mapping[int, float]], final: Mapping[str, float], tasks: Sequence[int],
                      *, restricted: bool, seed: int = 0) -> list[RungCorrelation]:
    """One RungCorrelation per rung task; `curves[trial][task]` = the trial's score after that task, `final[trial]`
    its final score (only trials with both count)."""
    out = []
    for task in tasks:
        pairs = [(curves[t][task], final[t]) for t in final if task in curves.get(t, {})]
        rho, low, high = spearman_with_interval([p[0] for p in pairs], [p[1] for p in pairs], seed=seed)
        out.append(RungCorrelation(task, len(pairs), rho, low, high, restricted))
    return out


def warnings_for(correlations: Sequence[RungCorrelation], seeds_per_trial: int, grace_period: int,
                 n_tasks: int) -> list[str]:
    """What the sweep's summary says about rungs whose scores barely rank the final ones, and what to do."""
    lines = []
    for c in correlations:
        if c.n < MIN_TRIALS or not c.is_low:
            continue
        kind = "among the completed trials only (range-restricted)" if c.restricted else "over every config"
        later = min(c.task + 1, n_tasks - 1)
        fix = [f"a later --grace-period (e.g. {later})"] if later > grace_period else []
        fix.append(f"--seeds-per-trial {max(3, seeds_per_trial + 2)} (less noise in each trial's score)")
        lines.append(f"warning: ASHA's rung at task {c.task} is barely informative: its validation scores rank-"
                     f"correlate with the final ones at Spearman rho {c.rho:.2f} (95 % bootstrap interval "
                     f"{c.low:.2f} to {c.high:.2f}, {c.n} trials {kind}), so trials it stops are close to a coin "
                     f"toss; use " + " or ".join(fix))
    return lines
