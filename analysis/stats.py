"""Statistics of a confirmation run: each confirmed config against the baseline, paired by seed.

`python -m tune_bir.sweep --confirm SWEEP` retrains the baseline and the sweep's top configs with
several seeds and writes `SWEEP/confirm/results.csv`, one row per (config, seed). `confirmation_table`
turns that table into one row per config:

- `acc_avg_mean` with a 95 % t-interval over the config's completed seeds (scipy.stats.t);
- against the baseline, on the seeds where BOTH completed (a seed fixes data order and initialisation,
  so the pairs share their noise): the mean difference with its 95 % t-interval, the paired t-test
  (scipy.stats.ttest_rel), the Wilcoxon signed-rank test (scipy.stats.wilcoxon; NaN when every
  difference is zero, where it is undefined), Cohen's d_z = mean(diff) / sd(diff);
- `p_holm`: the t-test p-values adjusted by Holm's step-down method across the K confirmed configs
  (family-wise error <= alpha); `verdict` reads it at `alpha` (0.05).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

BASELINE = "baseline"
ALPHA = 0.05
CONFIDENCE = 0.95
METRIC = "acc_avg"
COMPLETED = "completed"
COLUMNS = ["config", "n_seeds", "acc_avg_mean", "acc_avg_ci_low", "acc_avg_ci_high", "forgetting_mean",
           "n_pairs", "diff_vs_baseline", "diff_ci_low", "diff_ci_high", "p_t", "p_wilcoxon", "p_holm",
           "p_wilcoxon_holm", "effect_size", "verdict", "note"]
BETTER, WORSE = "better", "worse"
NO_DIFFERENCE = f"no significant difference at {ALPHA:g} after Holm"
TOO_FEW = "too few paired seeds (need >= 2)"


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean of `values`; (nan, nan) for fewer than 2 values."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    sem = x.std(ddof=1) / math.sqrt(len(x))
    if sem == 0:
        return float(x.mean()), float(x.mean())
    low, high = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=sem)
    return float(low), float(high)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order.

    With the m defined p-values sorted, p_(1) <= ... <= p_(m): adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    The result is monotone in the raw p-values and capped at 1; NaN stays NaN and does not count in m.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    defined = np.flatnonzero(~np.isnan(p))
    m = len(defined)
    order = defined[np.argsort(p[defined], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return out


def _completed(results: pd.DataFrame) -> pd.DataFrame:
    if "status" not in results.columns:
        return results
    return results[results["status"] == COMPLETED]


def _paired(completed: pd.DataFrame, config: str, metric: str) -> pd.DataFrame:
    """Columns `config` and `baseline` of `metric`, one row per seed where both completed (finite values)."""
    mine = completed[completed["config"] == config].set_index("seed")[metric]
    base = completed[completed["config"] == BASELINE].set_index("seed")[metric]
    pairs = pd.DataFrame({"config": mine, "baseline": base}).dropna()
    return pairs.sort_index()


def _paired_tests(diff: np.ndarray, config_values: np.ndarray, base_values: np.ndarray) -> dict[str, Any]:
    from scipy import stats

    row: dict[str, Any] = {"n_pairs": len(diff), "diff_vs_baseline": float(diff.mean()) if len(diff) else math.nan}
    notes = []
    if len(diff) < 2:
        row |= {"diff_ci_low": math.nan, "diff_ci_high": math.nan, "p_t": math.nan, "p_wilcoxon": math.nan,
                "effect_size": math.nan}
        notes.append(TOO_FEW)
        return row | {"note": "; ".join(notes)}
    row["diff_ci_low"], row["diff_ci_high"] = t_interval(diff)
    sd = diff.std(ddof=1)
    if np.all(diff == 0):
        row |= {"p_t": math.nan, "p_wilcoxon": math.nan, "effect_size": math.nan}
        notes.append("every paired difference is zero: t-test and Wilcoxon undefined")
        return row | {"note": "; ".join(notes)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # constant differences: scipy warns, t = +-inf
        row["p_t"] = float(stats.ttest_rel(config_values, base_values).pvalue)
        row["p_wilcoxon"] = float(stats.wilcoxon(diff).pvalue)
    if sd == 0:
        row["effect_size"] = math.copysign(math.inf, float(diff.mean()))
        notes.append("every paired difference is the same: sd 0, d_z infinite")
    else:
        row["effect_size"] = float(diff.mean() / sd)
    if np.any(diff == 0):
        notes.append(f"{int(np.sum(diff == 0))} zero difference(s) dropped by Wilcoxon")
    return row | {"note": "; ".join(notes)}


def verdict(diff: float, p_holm: float, n_pairs: int, alpha: float = ALPHA) -> str:
    """`better` / `worse` than the baseline when the Holm-adjusted p is below alpha, else no difference."""
    if n_pairs < 2:
        return TOO_FEW
    if not math.isnan(p_holm) and p_holm < alpha:
        return BETTER if diff > 0 else WORSE
    return f"no significant difference at {alpha:g} after Holm"


def confirmation_table(results: pd.DataFrame, metric: str = METRIC, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per config of a confirmation's results.csv (baseline first), with the columns of COLUMNS.

    `results` has at least `config`, `seed`, `metric` and `forgetting_avg`; a `status` column, when
    present, keeps the `completed` rows only. The baseline row carries its own mean and interval; its
    comparison columns are NaN. Raises ValueError when there is no baseline.
    """
    missing = {"config", "seed", metric} - set(results.columns)
    if missing:
        raise ValueError(f"confirmation results lack the column(s) {sorted(missing)}")
    if BASELINE not in set(results["config"]):
        raise ValueError(f"confirmation results have no {BASELINE!r} config to compare against")
    completed = _completed(results)
    configs = [BASELINE] + [c for c in dict.fromkeys(results["config"]) if c != BASELINE]
    rows = []
    for config in configs:
        values = completed.loc[completed["config"] == config, metric].dropna().to_numpy(dtype=float)
        low, high = t_interval(values)
        forgetting = (completed.loc[completed["config"] == config, "forgetting_avg"].dropna()
                      if "forgetting_avg" in completed.columns else pd.Series(dtype=float))
        row: dict[str, Any] = {
            "config": config, "n_seeds": len(values),
            f"{metric}_mean": float(values.mean()) if len(values) else math.nan,
            f"{metric}_ci_low": low, f"{metric}_ci_high": high,
            "forgetting_mean": float(forgetting.mean()) if len(forgetting) else math.nan}
        if config == BASELINE:
            row |= {"n_pairs": math.nan, "diff_vs_baseline": math.nan, "diff_ci_low": math.nan,
                    "diff_ci_high": math.nan, "p_t": math.nan, "p_wilcoxon": math.nan, "effect_size": math.nan,
                    "note": "reference"}
        else:
            pairs = _paired(completed, config, metric)
            diff = (pairs["config"] - pairs["baseline"]).to_numpy(dtype=float)
            row |= _paired_tests(diff, pairs["config"].to_numpy(dtype=float), pairs["baseline"].to_numpy(dtype=float))
        rows.append(row)
    table = pd.DataFrame(rows)
    compared = table["config"] != BASELINE
    table["p_holm"] = math.nan
    table["p_wilcoxon_holm"] = math.nan
    table.loc[compared, "p_holm"] = holm(table.loc[compared, "p_t"].to_numpy(dtype=float))
    table.loc[compared, "p_wilcoxon_holm"] = holm(table.loc[compared, "p_wilcoxon"].to_numpy(dtype=float))
    table["verdict"] = [
        "" if r.config == BASELINE else verdict(r.diff_vs_baseline, r.p_holm, int(r.n_pairs), alpha)
        for r in table.itertuples()]
    table["n_pairs"] = table["n_pairs"].astype("Int64")
    columns = [c.replace("acc_avg", metric) if c.startswith("acc_avg") else c for c in COLUMNS]
    return table[columns + [c for c in table.columns if c not in columns]]


def curves(results: pd.DataFrame, n_tasks: int, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Mean `acc_avg` after each task per config with its t-interval: columns config, task, mean, low, high, n."""
    completed = _completed(results)
    rows = []
    for config in dict.fromkeys(results["config"]):
        mine = completed[completed["config"] == config]
        for task in range(1, n_tasks + 1):
            column = f"acc_avg_after_task_{task}"
            values = mine[column].dropna().to_numpy(dtype=float) if column in mine.columns else np.array([])
            low, high = t_interval(values, confidence)
            rows.append({"config": config, "task": task, "mean": float(values.mean()) if len(values) else math.nan,
                         "low": low, "high": high, "n": len(values)})
    return pd.DataFrame(rows)
