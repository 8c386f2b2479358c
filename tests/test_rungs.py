"""Is early stopping informative: ASHA's rungs as Ray places them, Spearman's rho with its bootstrap interval, the
sweep summary's warning, and the full-budget reference's numbers in docs/sweep.md (docs/sweep.md "Is early
stopping informative?")."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray.tune.schedulers import ASHAScheduler

from tune_bir.sweep.rungs import (
    LOW_RHO,
    RungCorrelation,
    rung_correlations,
    rung_tasks,
    spearman_with_interval,
    warnings_for,
)

ROOT = Path(__file__).resolve().parent.parent
REPULSION = ROOT / "docs" / "results" / "repulsion"


@pytest.mark.parametrize(("grace", "rf", "tasks", "per_task"), [(2, 4, 5, 1), (2, 4, 10, 1), (1, 2, 5, 1),
                                                                 (2, 2, 5, 3), (5, 4, 5, 1)])
def test_rungs_are_where_rays_asha_compares_trials(grace, rf, tasks, per_task):
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=tasks * per_task,
                              grace_period=grace * per_task, reduction_factor=rf)
    milestones = sorted(int(m) for m, _ in scheduler._brackets[0]._rungs)   # no public accessor
    expected = sorted({math.ceil(m / per_task) for m in milestones if m < tasks * per_task})
    asha = {"grace_period": grace * per_task, "reduction_factor": rf, "max_t": tasks * per_task,
            "segments_per_task": per_task}
    assert rung_tasks(asha) == expected


def test_spearman_and_its_bootstrap_interval():
    x = np.arange(12.0)
    assert spearman_with_interval(x, 2 * x + 1) == pytest.approx((1.0, 1.0, 1.0))
    assert spearman_with_interval(x, -x)[0] == -1.0
    rng = np.random.default_rng(3)
    rho, low, high = spearman_with_interval(x, x + rng.normal(0, 6, len(x)))
    assert -1 <= low < rho < high <= 1
    assert all(math.isnan(v) for v in spearman_with_interval([1, 1, 1, 1], [1, 2, 3, 4]))   # no ranking at all


def test_the_summary_warns_about_a_barely_informative_rung_and_says_what_to_do():
    rng = np.random.default_rng(0)
    curves = {f"t{i}": {2: float(rng.uniform()), 5: float(rng.uniform())} for i in range(12)}
    (noisy,) = rung_correlations(curves, {t: c[5] for t, c in curves.items()}, [2], restricted=True)
    assert noisy.n == 12 and noisy.rho < LOW_RHO
    (line,) = warnings_for([noisy], seeds_per_trial=1, grace_period=2, n_tasks=5)
    assert "task 2" in line and "--grace-period (e.g. 3)" in line and "--seeds-per-trial 3" in line
    assert "range-restricted" in line
    good = RungCorrelation(2, 12, 0.9, 0.7, 0.97, restricted=False)
    few = RungCorrelation(2, 3, -0.5, -1, 1, restricted=True)
    assert warnings_for([good, few], seeds_per_trial=1, grace_period=2, n_tasks=5) == []


def test_the_reference_reproduces_the_sweeps_stopped_trials_and_gives_the_numbers_in_the_docs(tmp_path):
    reference = pd.read_csv(REPULSION / "reference.csv", dtype={"trial_id": str})
    trials = pd.read_csv(REPULSION / "trials.csv", dtype={"trial_id": str})
    stopped = set(trials.loc[trials["trial_status"] == "stopped_early", "trial_id"])
    # every reference run of a stopped config reproduces the sweep's numbers for the tasks it trained there
    assert set(reference["trial_id"]) <= stopped and len(reference) >= 12 and reference["reproduces_sweep"].all()
    out = tmp_path / "reference.csv"
    reference.to_csv(out, index=False)
    subprocess.run([sys.executable, "benchmarks/asha_reference.py", str(REPULSION), "--out", str(out), "--summarise"],
                   cwd=ROOT, check=True, capture_output=True)
    computed = json.loads((tmp_path / "reference_summary.json").read_text())
    assert computed == json.loads((REPULSION / "reference_summary.json").read_text())
    (rung,) = computed["rungs"]
    docs = (ROOT / "docs" / "sweep.md").read_text()
    for value in (rung["rho"], rung["low"], rung["high"]):
        assert f"{value:.2f}" in docs
