"""`analysis` on ONE tiny real sweep (python -m tune_bir.sweep, local Ray, sqlite MLflow), shared by the module:
the sweep folder and MLflow give the same table; `python -m analysis` prints, writes and attaches its report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import load_mlflow, load_sweep
from analysis.table import ALL_STATUSES, PER_TASK_METRICS
from tests.test_analysis_cli import png_has_content, run_analysis

pytestmark = pytest.mark.slow
NAME = "tiny"
PLOTS = ("val_acc_per_task.png", "params_vs_val_acc.png", "param_importance.png", "parallel_coordinates.png")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(sweep folder, tracking URI): 4 trials of 10 iterations per task on splitMNIST5k, 2 CPUs."""
    tmp = tmp_path_factory.mktemp("analysis-sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "tune_bir.sweep", "--iters", "10", "--num-samples", "4",
                           "--num-cpus", "2", "--storage-path", str(tmp / "rr"), "--name", NAME, "--mlflow-uri", uri],
                          capture_output=True, text=True, cwd=tmp, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "rr" / NAME, uri


@pytest.fixture(scope="module")
def analysed(sweep):
    """`python -m analysis SWEEP --top-k 3`, run once: its process and report folder."""
    folder, _ = sweep
    done = run_analysis(str(folder), "--top-k", "3", cwd=folder.parent)
    assert done.returncode == 0, done.stderr
    return done, folder / "report"


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values("trial_id").reset_index(drop=True)


def test_sweep_folder_and_mlflow_give_the_same_table(sweep):
    folder, uri = sweep
    from_folder, from_mlflow = load_sweep(str(folder)), load_mlflow(uri, NAME)
    pd.testing.assert_frame_equal(_sorted(from_folder), _sorted(from_mlflow))
    by_run_id = load_mlflow(uri, from_folder.attrs["plan"]["mlflow"]["parent_run_id"])
    pd.testing.assert_frame_equal(_sorted(from_folder), _sorted(by_run_id))


def test_the_table_has_one_row_per_trial_and_the_documented_columns(sweep):
    folder, _ = sweep
    table = load_sweep(str(folder))
    plan = table.attrs["plan"]
    tasks = plan["resolved_base_config"]["tasks"]
    assert len(table) == 4 and table["trial_id"].is_unique and table["baseline"].sum() == 1
    assert set(table["trial_status"]) <= set(ALL_STATUSES) - {"unfinished"}
    expected = {"trial_id", "trial_status", "baseline", "tasks_reached", "val_acc_avg", "acc_avg", "forgetting_avg",
                "bwt", "time_total_s", *plan["space"]["params"]}
    expected |= {f"{m}_after_task_{t}" for m in PER_TASK_METRICS for t in range(1, tasks + 1)}
    assert expected <= set(table.columns)
    completed = table[table["trial_status"] == "completed"]
    assert (completed["tasks_reached"] == tasks).all() and completed["val_acc_avg"].notna().all()
    assert (completed["val_acc_avg"] == completed[f"val_acc_avg_after_task_{tasks}"]).all()
    assert (table["time_total_s"] > 0).all()
    results = pd.read_csv(folder / "results.csv")
    assert dict(zip(results["trial_id"], results["status"], strict=True)) == dict(
        zip(table["trial_id"], table["trial_status"], strict=True))


def test_cli_prints_the_top_table_and_writes_the_report(sweep, analysed):
    folder, _ = sweep
    done, out = analysed
    table = load_sweep(str(folder))
    best = table[table["trial_status"] == "completed"].sort_values("val_acc_avg", ascending=False)
    # --top-k 3, at most as many as completed (the baseline always completes: ASHA never stops it)
    assert f"top {min(3, len(best))} completed trials by val_acc_avg" in done.stdout and len(best) >= 1
    assert best["trial_id"].iloc[0] in done.stdout
    written = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    assert list(written["trial_id"]) == list(table["trial_id"])
    assert pd.read_parquet(out / "trials.parquet").shape == table.shape
    png_has_content(out / "val_acc_per_task.png")
    text = (out / "report.md").read_text()
    for plot in PLOTS:
        if (out / plot).exists():
            png_has_content(out / plot)
            assert f"]({plot})" in text
    n_searched = ((table["trial_status"] == "completed") & ~table["baseline"]).sum()
    assert (out / "param_importance.png").exists() == (n_searched >= 2)
    assert "## What was searched" in text and "## Top 3" in text and "candidate, not a finding" in text
    assert f"python -m tune_bir.sweep --confirm {folder}" in text
    # the rung at task 2 (grace 2, rf 4), measured on the completed trials only and said to be the weaker estimate
    from analysis.report import early_stopping

    (rung,) = early_stopping(table)
    assert rung.task == 2 and rung.n == len(best) and rung.restricted
    assert "## Is early stopping informative?" in text and "range-restricted" in text
    assert f"early stopping: rung at task 2: Spearman rho {rung.rho:.3g}" in done.stdout


def test_cli_attaches_the_report_to_the_parent_run(sweep, analysed):
    folder, uri = sweep
    done, out = analysed
    run_id = load_sweep(str(folder)).attrs["plan"]["mlflow"]["parent_run_id"]
    attached = {Path(f.path).name for f in MlflowClient(uri).list_artifacts(run_id, "report")}
    assert {p.name for p in out.iterdir()} == attached and "report.md" in attached
    assert f"attached to MLflow parent run {run_id}" in done.stdout


def test_cli_from_mlflow_writes_the_same_trials_csv(sweep, analysed, tmp_path):
    _, uri = sweep
    _, out = analysed
    done = run_analysis("--mlflow-uri", uri, "--sweep", NAME, "--out", str(tmp_path / "m"), "--no-mlflow",
                        cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "m" / "trials.csv"), pd.read_csv(out / "trials.csv"))


def test_unknown_sweep_in_mlflow_is_one_line_naming_the_known_ones(sweep, tmp_path):
    _, uri = sweep
    done = run_analysis("--mlflow-uri", uri, "--sweep", "nope", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"python -m analysis: error: no sweep named 'nope' in MLflow at {uri} (known "
                                   f"sweeps: {NAME}); give --sweep a sweep name or its parent run id")
