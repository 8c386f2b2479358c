"""analysis.sequential: the boundaries against published constants and an independent integration, and the
verdicts of `decide` against the fixed-sample tests they must reduce to (scipy, statsmodels)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import sequential as seq
from analysis.sequential import SequentialDesign, Verdict, decide, paired_differences

EVEN5 = tuple(k / 5 for k in range(1, 6))


def test_classical_pocock_and_obrien_fleming_constants():
    """The recursion's exit probabilities reproduce Pocock's (1977) and O'Brien & Fleming's (1979) constants:
    K = 5 even looks, two-sided 0.05: Pocock c = 2.413, O'Brien-Fleming c_K = 2.040 (c_k = c_K sqrt(K/k))."""
    from scipy.optimize import brentq

    pocock = brentq(lambda c: seq.exit_probabilities([c] * 5, EVEN5).sum() - 0.05, 1.5, 4.0)
    obf = brentq(lambda c: seq.exit_probabilities([c * math.sqrt(5 / k) for k in range(1, 6)], EVEN5).sum() - 0.05,
                 1.5, 4.0)
    assert pocock == pytest.approx(2.413, abs=1e-3)
    assert obf == pytest.approx(2.040, abs=1e-3)


def test_recursion_reproduces_published_lan_demets_boundaries():
    """Published Lan-DeMets boundaries, K = 5 even looks, two-sided 0.05 (ldbounds; gsDesign): O'Brien-Fleming-type
    spending alpha/2 per side (4.8769 .. 2.0310) and Pocock-type (2.4380 .. 2.3860, also what z_boundaries
    computes): their exit probabilities are what the spending functions spend."""
    from scipy.stats import norm

    per_side_obf = 4 * norm.sf(norm.isf(0.05 / 4) / np.sqrt(EVEN5))
    exits = seq.exit_probabilities((4.8769, 3.3569, 2.6803, 2.2898, 2.0310), EVEN5)
    assert np.cumsum(exits) == pytest.approx(per_side_obf, rel=2e-3, abs=1e-7)
    pocock = (2.4380, 2.4268, 2.4102, 2.3966, 2.3860)
    assert seq.z_boundaries(0.05, EVEN5, "pocock") == pytest.approx(pocock, abs=2e-4)


def test_obrien_fleming_type_boundaries_spend_as_jennison_and_turnbull_define():
    """Two-sided form 2 - 2 Phi(z_{alpha/2} / sqrt(t)): the first boundary is z_{alpha/2} / sqrt(t_1) exactly, the
    exits add up to the spending at every look, and the boundaries lie near the classical O'Brien-Fleming ones."""
    bounds = seq.z_boundaries(0.05, EVEN5, "obrien-fleming")
    assert bounds[0] == pytest.approx(1.959964 / math.sqrt(0.2), abs=1e-5)
    assert np.cumsum(seq.exit_probabilities(bounds, EVEN5)) == pytest.approx(
        seq.spent("obrien-fleming", 0.05, EVEN5), abs=1e-9)
    classical = [2.040 * math.sqrt(5 / k) for k in range(1, 6)]
    assert np.max(np.abs(np.subtract(bounds, classical))) < 0.2


def test_exit_probabilities_agree_with_the_multivariate_normal():
    """P(no crossing) from the recursion equals scipy's multivariate normal rectangle probability of
    (Z_1, Z_2, Z_3) with corr sqrt(t_j / t_k), for uneven looks."""
    t = (0.3, 0.55, 1.0)
    bounds = np.array([2.9, 2.4, 2.1])
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    inside = stats.multivariate_normal(mean=np.zeros(3), cov=cov, seed=1, maxpts=2_000_000, abseps=1e-7,
                                       releps=1e-7).cdf(bounds, lower_limit=-bounds)
    assert 1 - seq.exit_probabilities(bounds, t).sum() == pytest.approx(inside, abs=2e-5)


def test_boundaries_are_cached_and_fall_as_alpha_grows():
    fractions = tuple(k / 6 for k in range(1, 7))
    assert seq.z_boundaries(0.025, fractions) is seq.z_boundaries(0.025, fractions)
    assert np.all(np.greater(seq.z_boundaries(0.025, fractions), seq.z_boundaries(0.05, fractions)))


def _exact(mean: float, sd: float, n: int) -> np.ndarray:
    """n values with exactly this mean and sample sd."""
    z = np.linspace(-1, 1, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


def test_one_look_is_the_paired_t_test_with_holm():
    """With a single look the design is the fixed-sample paired t-test at Holm's levels, its interval the
    t-interval at 1 - alpha_i, and equivalence statsmodels' TOST (ttost_paired) at alpha_i."""
    from statsmodels.stats.weightstats import ttost_paired

    design = SequentialDesign(alpha=0.05, margin=0.3, looks=(20,), n_configs=2)
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(40):
        diffs = {"a": rng.normal(rng.uniform(-0.5, 0.5), 0.4, 20), "b": rng.normal(rng.uniform(-0.5, 0.5), 0.4, 20)}
        verdicts = decide(design, diffs, look=1)
        p = {c: stats.ttest_1samp(x, 0.0).pvalue for c, x in diffs.items()}
        first, second = sorted(p, key=p.get)
        # Holm: the smaller p at alpha/2, then (only if it rejected) the other at alpha
        expect_diff = {first: p[first] <= 0.025, second: p[first] <= 0.025 and p[second] <= 0.05}
        for config, x in diffs.items():
            v = verdicts[config]
            # a config's share: the one at which it was declared different (a pass of the step-down), else the last
            share = 0.05 if (config == second and expect_diff[first] and p[second] > 0.025) else 0.025
            assert v.alpha == share and v.p == pytest.approx(p[config])
            assert v.level == pytest.approx(share)
            assert (v.verdict in seq.DIFFERENT) == expect_diff[config]
            low, high = stats.t.interval(1 - share, 19, loc=x.mean(), scale=stats.sem(x))
            assert (v.rci_low, v.rci_high) == pytest.approx((low, high))
            tost_p = ttost_paired(x, np.zeros(20), -0.3, 0.3)[0]
            assert v.eq_alpha == 0.025
            assert (v.verdict in (seq.EQUIVALENT, seq.BETTER_SMALL, seq.WORSE_SMALL)) == (tost_p < 0.025)
            seen.add(v.verdict)
            if v.verdict not in seq.DECIDED:
                assert v.verdict == seq.UNDECIDED
    assert {seq.BETTER, seq.WORSE, seq.EQUIVALENT, seq.UNDECIDED} <= seen   # the draws reach each branch


def test_a_rejected_configs_alpha_passes_to_the_others():
    """b's t = 2.25 (19 df) lies between the alpha/2 and alpha boundaries: b is better only once a is
    declared different, at this look or an earlier one."""
    design = SequentialDesign(alpha=0.05, margin=0.01, looks=(20,), n_configs=2)
    b = _exact(2.25 * 0.4 / math.sqrt(20), 0.4, 20)
    assert decide(design, {"a": _exact(0.0, 0.4, 20), "b": b}, 1)["b"].verdict == seq.UNDECIDED
    assert decide(design, {"a": _exact(1.0, 0.4, 20), "b": b}, 1)["b"].verdict == seq.BETTER
    a_before = Verdict("a", 1, 20, seq.WORSE, -1.0, -1.2, -0.8, 0.025)
    out = decide(design, {"b": b}, 1, decided={"a": a_before})
    assert list(out) == ["b"] and out["b"].verdict == seq.BETTER and out["b"].alpha == 0.05
    a_equivalent = Verdict("a", 1, 20, seq.EQUIVALENT, 0.0, -0.001, 0.001, 0.025)
    assert decide(design, {"b": b}, 1, decided={"a": a_equivalent})["b"].verdict == seq.UNDECIDED


def test_verdicts_over_the_looks():
    design = SequentialDesign.even(alpha=0.05, margin=0.005, max_seeds=48, n_looks=6, n_configs=2)
    assert design.looks == (8, 16, 24, 32, 40, 48)
    big = {"a": _exact(0.02, 0.005, 16), "b": _exact(0.0, 0.001, 16)}
    out = decide(design, big, 2)
    assert out["a"].verdict == seq.BETTER and out["a"].rci_low > 0
    assert out["b"].verdict == seq.EQUIVALENT and -0.005 < out["b"].eq_low < out["b"].eq_high < 0.005
    small = {"a": _exact(0.003, 0.001, 48), "b": _exact(-0.003, 0.001, 48)}
    out = decide(design, small, 6)
    assert (out["a"].verdict, out["b"].verdict) == (seq.BETTER_SMALL, seq.WORSE_SMALL)
    noisy = {"a": _exact(0.002, 0.02, 8), "b": _exact(0.0, 0.02, 8)}
    assert {v.verdict for v in decide(design, noisy, 1).values()} == {seq.GO_ON}
    assert {v.verdict for v in decide(design, {c: np.resize(x, 48) for c, x in noisy.items()}, 6).values()} == {
        seq.UNDECIDED}
    zeros = decide(design, {"a": np.zeros(24), "b": np.full(24, 0.01)}, 3)   # bit-identical / constant shift
    assert zeros["a"].verdict == seq.EQUIVALENT and zeros["a"].sd == 0
    assert zeros["b"].verdict == seq.BETTER and zeros["b"].p == 0.0


def test_obrien_fleming_levels_grow_and_end_near_alpha():
    design = SequentialDesign.even(alpha=0.05, margin=0.005, max_seeds=48, n_looks=6, n_configs=1)
    levels = [seq.nominal_level(0.05, design.looks, design.spending, k) for k in range(1, 7)]
    assert np.all(np.diff(levels) > 0)
    assert levels[0] < 1e-4 and 0.035 < levels[-1] < 0.05   # the final look keeps most of alpha


@pytest.mark.parametrize(("diffs", "look", "match"), [
    ({"a": np.zeros(8)}, 1, "compares 2 config"),
    ({"a": np.zeros(7), "b": np.zeros(8)}, 1, "takes 8 paired differences"),
    ({"a": np.zeros(8), "b": [0.0] * 7 + [math.nan]}, 1, "finite"),
    ({"a": np.zeros(8), "b": np.zeros(8)}, 7, "not one of the design's looks"),
])
def test_decide_refuses_bad_input(diffs, look, match):
    design = SequentialDesign.even(alpha=0.05, margin=0.005, max_seeds=48, n_looks=6, n_configs=2)
    with pytest.raises(ValueError, match=match):
        decide(design, diffs, look)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha": 0.0}, "alpha"), ({"margin": 0.0}, "margin"), ({"looks": (8, 8)}, "increasing"),
    ({"looks": (1, 8)}, "first >= 2"), ({"n_configs": 0}, "n_configs"), ({"spending": "haybittle"}, "spending"),
])
def test_design_refuses_bad_values(kwargs, match):
    values = {"alpha": 0.05, "margin": 0.005, "looks": (8, 16), "n_configs": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        SequentialDesign(**values)


def test_design_and_verdict_round_trip_through_json():
    design = SequentialDesign.even(alpha=0.05, margin=0.005, max_seeds=48, n_looks=6, n_configs=2, spending="pocock")
    assert SequentialDesign.from_dict(json.loads(json.dumps(design.to_dict()))) == design
    with pytest.raises(ValueError, match="unknown"):
        SequentialDesign.from_dict(design.to_dict() | {"alpah": 0.1})
    verdict = decide(design, {"a": _exact(0.0, 0.01, 8), "b": _exact(0.01, 0.01, 8)}, 1)["a"]
    assert Verdict.from_dict(json.loads(json.dumps(verdict.to_dict()))) == verdict


def test_paired_differences_pairs_completed_seeds_in_order():
    rows = [("baseline", 3, "completed", 0.80), ("a", 3, "completed", 0.83), ("baseline", 1, "completed", 0.70),
            ("a", 1, "completed", 0.71), ("baseline", 2, "completed", 0.75), ("a", 2, "errored", math.nan),
            ("b", 1, "completed", 0.60), ("b", 3, "completed", 0.90)]
    results = pd.DataFrame(rows, columns=["config", "seed", "status", "acc_avg"])
    out = paired_differences(results)
    assert list(out) == ["a", "b"]
    assert out["a"] == pytest.approx([0.01, 0.03]) and out["b"] == pytest.approx([-0.10, 0.10])
    assert paired_differences(results, seeds=[3, 1])["a"] == pytest.approx([0.03, 0.01])
    with pytest.raises(ValueError, match=r"a: no completed pair .* \[2\]"):
        paired_differences(results, seeds=[1, 2])
    with pytest.raises(ValueError, match="more than once"):
        paired_differences(pd.concat([results, results.iloc[:1]]))
    with pytest.raises(ValueError, match="no 'baseline'"):
        paired_differences(results[results["config"] != "baseline"])
