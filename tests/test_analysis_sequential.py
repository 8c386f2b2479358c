"""`python -m analysis CONFIRM_FOLDER` on a sequential confirmation, and `python -m analysis power`
(docs/analysis.md "Sequential confirmation", "Planning"); folders built file by file (tests/sequential_fixtures.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.sequential_report import read_sequential, recompute
from tests.sequential_fixtures import write_confirmation

ROOT = Path(__file__).resolve().parents[1]
LOOKS6 = (8, 16, 24, 32, 40, 48)


def test_report_gives_each_configs_verdict_interval_stop_orders_and_cpus(tmp_path, capsys):
    folder = write_confirmation(tmp_path / "rr" / "confirm-two", looks=LOOKS6)
    assert main([str(folder), "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "plan sha256" in out and "verified" in out
    table = pd.read_csv(folder / "report" / "sequential.csv").set_index("config")
    assert table.loc["rep", "verdict"] == "better" and table.loc["rep", "rci_low"] > 0
    assert table.loc["con", "verdict"] == "equivalent"
    assert -0.005 < table.loc["con", "tost_low"] < table.loc["con", "tost_high"] < 0.005
    looks = json.loads((folder / "looks.json").read_text())
    stop = {v["config"]: (v["look"], v["n"]) for look in looks for v in look["verdicts"]}
    for config in ("rep", "con"):
        assert (table.loc[config, "look"], table.loc[config, "n"]) == stop[config]   # recomputed = the runner's
        assert "every seed its own" in table.loc[config, "class_orders"]
        assert table.loc[config, "cpu"].startswith("every pair on the same CPU kind")
    report = (folder / "report" / "report.md").read_text()
    assert "biased away from zero" in report and "repeated confidence interval" in report
    printed = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    if stop["rep"][0] < len(LOOKS6):
        assert "biased away from 0" in printed["rep"]
    if stop["con"][0] < len(LOOKS6):
        assert "biased towards 0" in printed["con"]
    assert f"look {stop['rep'][0]}, {stop['rep'][1]} seeds (100..{99 + stop['rep'][1]})" in report
    assert "## Notes" not in report


def test_report_says_when_a_pair_ran_on_another_cpu_or_thread_count(tmp_path):
    folder = write_confirmation(tmp_path / "rr" / "c", looks=LOOKS6)
    results = pd.read_csv(folder / "results.csv")
    results.loc[(results["config"] == "baseline") & (results["seed"] == 101), "threads"] = 4
    results.loc[(results["config"] == "baseline") & (results["seed"] == 102), "cpu_model"] = "Intel Xeon"
    results.to_csv(folder / "results.csv", index=False)
    main([str(folder), "--no-mlflow"])
    cpu = pd.read_csv(folder / "report" / "sequential.csv").set_index("config")["cpu"]
    assert cpu["rep"] == "pairs differ in cpu_model (1 seed(s)), threads (1 seed(s))"
    report = (folder / "report" / "report.md").read_text()
    assert "CPUs: the runs came from 3 kinds" in report and "In 2 of " in report   # analysis.report.machines_note


def test_old_folders_without_cpu_columns_are_reported_as_not_recorded(tmp_path):
    folder = write_confirmation(tmp_path / "rr" / "c", looks=LOOKS6, cpu=False)
    main([str(folder), "--no-mlflow"])
    assert set(pd.read_csv(folder / "report" / "sequential.csv")["cpu"]) == {
        "not recorded (no cpu_* / threads columns)"}


def test_an_unfinished_confirmation_reports_go_on_and_what_it_waits_for(tmp_path, capsys):
    folder = write_confirmation(tmp_path / "rr" / "c", looks=LOOKS6, effects={"a": 0.0, "b": 0.0}, upto_look=2)
    main([str(folder), "--no-mlflow"])
    out = capsys.readouterr().out
    assert "a: go on after look 2 (16 seeds)" in out
    assert "note: look 3 (24 seeds) cannot be decided yet" in out


def test_a_looks_json_that_disagrees_with_the_results_is_noted(tmp_path):
    folder = write_confirmation(tmp_path / "rr" / "c", looks=LOOKS6)
    looks = json.loads((folder / "looks.json").read_text())
    looks[-1]["verdicts"][-1]["verdict"] = "worse"
    (folder / "looks.json").write_text(json.dumps(looks))
    main([str(folder), "--no-mlflow"])
    assert re.search(r"looks.json says con: 'worse' .* recomputed from results.csv: 'equivalent'",
                     (folder / "report" / "report.md").read_text())


def test_recompute_matches_the_runners_looks_for_many_draws(tmp_path):
    """The analysis's rule and the look loop the runner runs (tests/sequential_fixtures.py) agree."""
    for seed in range(6):
        folder = write_confirmation(tmp_path / f"s{seed}" / "c", looks=LOOKS6, seed=seed,
                                    effects={"a": 0.004 * seed - 0.01, "b": 0.002})
        conf = read_sequential(str(folder))
        last = recompute(conf).last
        recorded = {v["config"]: v for look in conf.looks for v in look["verdicts"]}
        assert {c: (v.verdict, v.look) for c, v in last.items()} == {
            c: (v["verdict"], v["look"]) for c, v in recorded.items()}


# --- planning ---------------------------------------------------------------------------------------------
DOCS_TABLE_ARGV = ["power", "--sd", "1", "--dz", "0", "0.3", "0.5", "0.8", "--margin", "0.5", "--configs", "2",
                   "--markdown"]


def test_the_docs_simulation_table_is_what_the_power_command_prints(capsys):
    """docs/analysis.md's table of average seeds comes from `python -m analysis power ... --markdown`."""
    assert main(DOCS_TABLE_ARGV) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    docs = (ROOT / "docs" / "analysis.md").read_text()
    assert "python -m analysis " + " ".join(DOCS_TABLE_ARGV) in docs
    assert "\n".join(table) in docs


PLAN_ARGV = ["power", "--pilot", "docs/results/repulsion:top2", "docs/results/contrastive:top2", "--first-seed", "100",
             "--effect", "0.009", "0.0066", "0.0045", "0.0033", "--markdown"]


def test_the_docs_plan_of_issue_19_is_what_the_power_command_prints(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(PLAN_ARGV) == 0
    out = capsys.readouterr().out
    docs = " ".join((ROOT / "docs" / "analysis.md").read_text().split())   # the command wraps over two lines
    assert "python -m analysis " + " ".join(PLAN_ARGV) in docs
    assert " ".join("\n".join(line for line in out.splitlines() if line.startswith("|")).split()) in docs
    assert "pooled over the configs: 0.01032 (14 df; 80 % upper confidence limit 0.01255" in out


def test_power_from_a_pilot_warns_of_the_winners_curse_and_other_class_orders(capsys):
    assert main(["power", "--pilot", str(ROOT / "docs" / "results" / "repulsion"), "--configs", "2",
                 "--first-seed", "100", "--sims", "2000"]) == 0
    out = capsys.readouterr().out
    assert "paired sd pooled over the configs" in out
    assert "warning: a pilot's effect is biased upward when its configs were chosen on the same seeds" in out
    assert "warning: the pilot's seeds (1-8) have all the original class order, the plan's (100-147) 48" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*[+-]\d", line)]
    assert len(rows) == 3   # one per pilot config: its own effect by default
    for row in rows:
        fixed_80, fixed_90, mean, p90 = int(row[2]), int(row[3]), float(row[4]), int(row[5])
        assert fixed_80 < fixed_90 and mean <= p90 <= 48


def test_power_with_the_plans_own_orders_gives_no_order_warning(capsys):
    main(["power", "--pilot", str(ROOT / "docs" / "results" / "repulsion"), "--first-seed", "2", "--max-seeds", "6",
          "--looks", "2", "--sims", "500"])
    assert "class order" not in capsys.readouterr().out


@pytest.mark.parametrize(("d_z", "power", "expected"), [(0.8, 0.8, 18), (0.8, 0.9, 23), (0.5, 0.8, 41)])
def test_fixed_designs_use_the_bonferroni_level(d_z, power, expected):
    from statsmodels.stats.power import TTestPower

    from analysis.simulate import fixed_seeds

    assert fixed_seeds(d_z, power, 0.05, 2) == expected
    assert TTestPower().power(d_z, expected, 0.025) >= power > TTestPower().power(d_z, expected - 1, 0.025)


def test_the_naive_means_bias_is_the_way_the_report_says():
    """A plain simulation of the stopping rule: after a difference stop the mean is pulled away from 0, after an
    equivalence stop towards 0 (what naive_mean_bias and the report say); true mean 0.002, sd 0.007, D 0.005."""
    import numpy as np
    from scipy import stats

    from analysis.sequential_report import naive_mean_bias

    true, sd, margin = 0.002, 0.007, 0.005
    x = np.random.default_rng(0).normal(true, sd, (4000, LOOKS6[-1]))
    stopped: dict[str, list[float]] = {"better": [], "equivalent": []}
    undecided = np.ones(len(x), bool)
    for n in LOOKS6[:-1]:
        mean, se = x[:, :n].mean(1), x[:, :n].std(1, ddof=1) / n ** 0.5
        half = stats.t.ppf(0.975, n - 1) * se
        better = undecided & (mean - half > 0)
        equivalent = undecided & ~better & (mean - half > -margin) & (mean + half < margin)
        stopped["better"] += list(mean[better])
        stopped["equivalent"] += list(mean[equivalent])
        undecided &= ~(better | equivalent)
    assert np.mean(stopped["better"]) > true + 0.0005 and "away from 0" in naive_mean_bias("better", True)
    assert np.mean(stopped["equivalent"]) < true - 0.0005 and "towards 0" in naive_mean_bias("equivalent", True)
    assert naive_mean_bias("equivalent", False) == naive_mean_bias("go on", True) == ""
