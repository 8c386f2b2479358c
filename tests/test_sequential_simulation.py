"""The sequential design's error guarantees, by simulation (issue #19 item 4; docs/analysis.md "Sequential
confirmation"): synthetic paired data, fixed seeds, 20,000 confirmations per scenario, decided by
the rule `decide` applies (analysis.sequential.decide_arrays). Two configs against one shared baseline, so
their differences correlate (rho 0.5); the plan of issue #19: alpha 0.05, at most 48 seeds, a look every 8,
margin D = 0.5 sd. A rate may exceed its bound by at most 2 Monte-Carlo standard errors. Each measured
number is also the one docs/analysis.md's table shows (its row `id`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from analysis.sequential import SequentialDesign
from analysis.simulate import EQUIVALENT_VERDICTS, simulate

N_SIM = 20_000
ALPHA = 0.05
MARGIN = 0.5   # D, in sd units of one paired difference


DOCS = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"


def documented(row_id: str) -> str:
    """The number docs/analysis.md's table of simulated error rates shows for its row `row_id`."""
    found = re.search(rf"^\| `{re.escape(row_id)}` \| [^|]+ \| ([^ |]+) \|", DOCS.read_text(), re.MULTILINE)
    assert found, f"docs/analysis.md has no row `{row_id}`"
    return found.group(1)


def plan(spending: str = "obrien-fleming") -> SequentialDesign:
    return SequentialDesign.even(ALPHA, MARGIN, max_seeds=48, n_looks=6, n_configs=2, spending=spending)


@pytest.mark.parametrize(("spending", "rho", "seed", "row"), [
    ("obrien-fleming", 0.5, 11, "null-obf"), ("obrien-fleming", 0.9, 12, "null-obf-rho0.9"),
    ("pocock", 0.5, 13, "null-pocock")])
def test_no_true_effect_keeps_family_wise_false_claims_at_alpha(spending, rho, seed, row):
    sim = simulate(plan(spending), [0.0, 0.0], n_sim=N_SIM, seed=seed, rho=rho)
    rate = sim.false_difference()
    assert f"{rate:.4f}" == documented(row)
    assert rate <= ALPHA + 2 * sim.mc_se(ALPHA)
    assert rate > ALPHA / 2   # Holm and the spending do use alpha: the test is not trivially conservative


@pytest.mark.parametrize("effect", [0.5, 0.8])
def test_partial_null_keeps_the_null_configs_false_claims_at_alpha(effect):
    """One config truly better: it passes its share on, and the null one is then tested at alpha."""
    sim = simulate(plan(), [effect, 0.0], n_sim=N_SIM, seed=21)
    assert sim.false_difference(config=1) <= ALPHA + 2 * sim.mc_se(ALPHA)
    assert f"{sim.false_difference(config=1):.4f}" == documented(f"partial-{effect}")
    assert sim.false_difference() <= ALPHA + 2 * sim.mc_se(ALPHA)   # a wrong sign for the better one counts too
    assert sim.rate({"better", "better, by less than D"}, config=0) > 0.8


@pytest.mark.parametrize(("effects", "row"), [
    ((MARGIN, MARGIN), "at+D+D"), ((-MARGIN, MARGIN), "at-D+D"), ((-MARGIN, -MARGIN), "at-D-D")])
def test_a_true_difference_of_d_is_rarely_called_equivalent(effects, row):
    """At exactly +-D the equivalence null holds: false `equivalent` (or `by less than D`) claims stay at
    alpha family-wise (alpha / 2 each: TOST keeps the Bonferroni share)."""
    sim = simulate(plan(), list(effects), n_sim=N_SIM, seed=31)
    assert sim.rate(EQUIVALENT_VERDICTS) <= ALPHA + 2 * sim.mc_se(ALPHA)
    assert f"{sim.rate(EQUIVALENT_VERDICTS):.4f}" == documented(row)
    for config in (0, 1):
        assert sim.rate(EQUIVALENT_VERDICTS, config) <= ALPHA / 2 + 2 * sim.mc_se(ALPHA / 2)


def test_a_large_effect_stops_early():
    """d_z = 0.8 for both configs: the confirmation (until its last config is decided) stops at 28 seeds or
    fewer on average, and both are found better."""
    sim = simulate(plan(), [0.8, 0.8], n_sim=N_SIM, seed=41)
    assert sim.stopped_at().mean() <= 28
    assert f"{sim.stopped_at().mean():.2f}" == documented("dz0.8-seeds")
    assert sim.rate({"better", "better, by less than D"}, config=0) > 0.95
