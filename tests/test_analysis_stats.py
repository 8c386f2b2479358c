"""analysis.stats against numbers computed by hand formulas (not by the functions under test)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.stats import BASELINE, COLUMNS, NO_DIFFERENCE, confirmation_table, curves, holm, t_interval

BASE = np.array([0.50, 0.52, 0.48, 0.51, 0.49, 0.50])
SEEDS = [11, 12, 13, 14, 15, 16]
UP = np.array([0.03, 0.05, 0.04, 0.06, 0.02, 0.045])           # a clear gain on every seed
NOISE = np.array([0.011, -0.009, 0.004, -0.006, 0.002, -0.003])  # no effect, distinct |d| (no ties)


def _results(diffs: dict[str, np.ndarray], status: dict[tuple[str, int], str] | None = None) -> pd.DataFrame:
    rows = []
    for config, diff in {BASELINE: np.zeros(len(BASE)), **diffs}.items():
        for seed, base, d in zip(SEEDS, BASE, diff, strict=True):
            rows.append({"config": config, "seed": seed, "trial_id": f"{config}-{seed}",
                         "status": (status or {}).get((config, seed), "completed"),
                         "acc_avg": base + d, "forgetting_avg": 0.3 - d, "bwt": -0.3 + d})
    return pd.DataFrame(rows)


def hand_t(diff: np.ndarray) -> dict[str, float]:
    """Paired t by the textbook formulas: t = mean / (sd / sqrt(n)), two-sided p, 95 % interval, d_z."""
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1))
    se = sd / math.sqrt(n)
    t = mean / se
    q = sps.t.ppf(0.975, n - 1)       # the t quantile (a table value)
    return {"mean": mean, "p": 2 * sps.t.sf(abs(t), n - 1), "low": mean - q * se, "high": mean + q * se,
            "dz": mean / sd}


def hand_wilcoxon_exact(diff: np.ndarray) -> float:
    """Exact two-sided signed-rank p by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = {abs(d): r for r, d in enumerate(sorted(abs(x) for x in diff), start=1)}
    w_plus = sum(ranks[abs(d)] for d in diff if d > 0)
    n = len(diff)
    total = n * (n + 1) / 2
    sums = [sum(r for r, s in zip(range(1, n + 1), signs, strict=True) if s) for signs in
            itertools.product((0, 1), repeat=n)]
    w = min(w_plus, total - w_plus)
    return min(1.0, 2 * sum(1 for s in sums if s <= w) / len(sums))


def test_holm_matches_the_step_down_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # capped at 1 and monotone: 3 x 0.02 = 0.06; min(1, 2 x 0.5) = 1; max(1, 0.6) = 1
    assert holm([0.5, 0.6, 0.02]) == pytest.approx([1.0, 1.0, 0.06])
    # NaN stays NaN and does not count in m: m = 2 -> 2 x 0.01, max(0.02, 0.04)
    adjusted = holm([0.01, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    p = np.random.default_rng(0).uniform(0, 0.3, 12)
    adjusted = holm(p)
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted <= 1) and np.all(adjusted >= p)


def test_t_interval_by_hand():
    x = np.array([1.0, 2.0, 4.0])
    mean, sd = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.302652729749464 * sd / math.sqrt(3)     # t_{0.975, 2} from a t table
    assert t_interval(x) == pytest.approx((mean - half, mean + half))
    assert all(math.isnan(v) for v in t_interval([1.0]))


def test_known_effect_no_effect_and_a_loss_with_holm_across_three_configs():
    table = confirmation_table(_results({"top1": UP, "top2": NOISE, "top3": -UP}))
    assert list(table.columns[:len(COLUMNS)]) == COLUMNS
    assert list(table["config"]) == [BASELINE, "top1", "top2", "top3"]
    rows = table.set_index("config")
    base = rows.loc[BASELINE]
    b = hand_t(BASE)   # the baseline's own mean and interval (a one-sample interval of its values)
    assert base["acc_avg_mean"] == pytest.approx(BASE.mean())
    assert (base["acc_avg_ci_low"], base["acc_avg_ci_high"]) == pytest.approx((b["low"], b["high"]))
    assert math.isnan(base["p_holm"]) and base["n_seeds"] == 6

    expected = {name: hand_t(diff) for name, diff in (("top1", UP), ("top2", NOISE), ("top3", -UP))}
    for name, hand in expected.items():
        row = rows.loc[name]
        assert row["n_seeds"] == 6 and row["n_pairs"] == 6
        assert row["diff_vs_baseline"] == pytest.approx(hand["mean"])
        assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((hand["low"], hand["high"]))
        assert row["p_t"] == pytest.approx(hand["p"], rel=1e-9)
        assert row["effect_size"] == pytest.approx(hand["dz"])
        assert row["forgetting_mean"] == pytest.approx(0.3 - hand["mean"])
    # Wilcoxon, exact: all six differences positive -> 2 / 2^6; NOISE: W+ = 10 of 21 -> p = 1
    assert rows.loc["top1", "p_wilcoxon"] == pytest.approx(hand_wilcoxon_exact(UP)) == pytest.approx(1 / 32)
    assert rows.loc["top2", "p_wilcoxon"] == pytest.approx(hand_wilcoxon_exact(NOISE)) == pytest.approx(1.0)
    # Holm over the three t-test p-values, by hand: top1 and top3 share the smallest p (mirror images)
    p1, p2 = expected["top1"]["p"], expected["top2"]["p"]
    assert expected["top3"]["p"] == pytest.approx(p1)
    assert rows.loc["top1", "p_holm"] == pytest.approx(3 * p1)
    assert rows.loc["top3", "p_holm"] == pytest.approx(max(3 * p1, 2 * p1))
    assert rows.loc["top2", "p_holm"] == pytest.approx(min(1.0, max(2 * p1, p2)))
    assert rows.loc["top1", "verdict"] == "better" and rows.loc["top3", "verdict"] == "worse"
    assert rows.loc["top2", "verdict"] == NO_DIFFERENCE
    assert NO_DIFFERENCE == "no significant difference at 0.05 after Holm"


def test_no_effect_at_all_gives_nan_tests_with_a_note():
    table = confirmation_table(_results({"top1": np.zeros(len(BASE))})).set_index("config")
    row = table.loc["top1"]
    assert row["diff_vs_baseline"] == 0 and row["n_pairs"] == 6
    assert math.isnan(row["p_t"]) and math.isnan(row["p_wilcoxon"]) and math.isnan(row["p_holm"])
    assert "zero" in row["note"] and row["verdict"] == NO_DIFFERENCE


def test_pairs_only_seeds_where_both_completed():
    status = {("top1", 11): "errored", (BASELINE, 16): "diverged"}
    results = _results({"top1": UP}, status)
    results.loc[(results["config"] == "top1") & (results["seed"] == 11), "acc_avg"] = math.nan
    row = confirmation_table(results).set_index("config").loc["top1"]
    assert row["n_seeds"] == 5 and row["n_pairs"] == 4
    hand = hand_t(UP[1:5])          # seeds 12..15
    assert row["diff_vs_baseline"] == pytest.approx(hand["mean"])
    assert row["p_t"] == pytest.approx(hand["p"]) and row["p_holm"] == pytest.approx(hand["p"])   # K = 1
    assert confirmation_table(results).set_index("config").loc[BASELINE, "n_seeds"] == 5


def test_one_seed_is_too_few_to_test():
    results = _results({"top1": UP})
    results = results[results["seed"] == 11]
    row = confirmation_table(results).set_index("config").loc["top1"]
    assert row["n_pairs"] == 1 and math.isnan(row["p_t"]) and row["verdict"].startswith("too few")


def test_a_table_without_baseline_is_refused():
    with pytest.raises(ValueError, match="no 'baseline'"):
        confirmation_table(_results({"top1": UP}).query("config != 'baseline'"))


def test_curves_have_t_bands_per_task():
    results = _results({"top1": UP})
    for t in (1, 2):
        results[f"acc_avg_after_task_{t}"] = results["acc_avg"] + t
    band = curves(results, 2).set_index(["config", "task"])
    low, high = t_interval(BASE + UP + 2)
    assert band.loc[("top1", 2), "mean"] == pytest.approx((BASE + UP).mean() + 2)
    assert (band.loc[("top1", 2), "low"], band.loc[("top1", 2), "high"]) == pytest.approx((low, high))
    assert band.loc[(BASELINE, 1), "n"] == 6
