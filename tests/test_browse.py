"""The sweep as a team browses it, in a real headless browser (Chromium, tests/browser.py): optuna-dashboard lists
the sweep's trials from its study's database, and `mlflow ui` opens the sweep's experiment on its runs (the model-
training view) with the parent run's report and plots and each trial's per-task curves (README "Browsing a sweep")."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis.__main__ import main as analysis_main
from tests.browser import render, screenshot, screenshot_dir, serve, text
from tests.cluster_fixtures import free_port
from tests.sweep_helpers import child_runs
from tune_bir.sweep.driver import run_sweep
from tune_bir.sweep.mlflow_callback import EXPERIMENT_KIND_TAG, TRAINING_KIND, runs_page

pytestmark = pytest.mark.slow

TRIALS = 4
CURVES_DEADLINE_S = 240.0   # wall clock for the trial's charts to be drawn (one render: 3-30 s)


@pytest.fixture(scope="module")
def browsed_sweep(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A finished tiny sweep (ASHA rungs at tasks 2 and 4), analysed, its report attached to MLflow."""
    root = tmp_path_factory.mktemp("browse")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)                     # MLflow's artifacts of a sqlite store go to ./mlruns
        outcome = run_sweep(["--iters", "8", "--batch", "32", "--seed", "0", "--num-samples", str(TRIALS),
                             "--max-concurrent", "1", "--reduction-factor", "2", "--name", "browse",
                             "--storage-path", str(root / "rr"), "--mlflow-uri", f"sqlite:///{root / 'm.db'}"])
        assert analysis_main([str(root / "rr" / "browse"), "--out", str(root / "report")]) == 0
        plan = json.loads((root / "rr" / "browse" / "sweep.json").read_text())
        yield {"root": root, "outcome": outcome, "plan": plan}


def test_optuna_dashboard_lists_the_sweeps_trials(browsed_sweep, tmp_path):
    plan, outcome = browsed_sweep["plan"], browsed_sweep["outcome"]
    storage = plan["optuna"]["storage"]
    assert storage == f"sqlite:///{browsed_sweep['root'] / 'rr' / 'browse' / 'optuna.db'}"
    import optuna

    study = optuna.load_study(study_name=plan["optuna"]["study_name"], storage=storage)
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    expected = {r["trial_id"]: {"completed": "COMPLETE", "stopped_early": "PRUNED"}[r["status"]] for r in outcome.rows}
    assert states == expected

    port = free_port()
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    with serve([dashboard, storage, "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/",
               cwd=tmp_path):
        page = f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}/trials"
        shown = text(render(page))
        assert f"{len(study.trials)} Trials" in shown
        for trial in study.trials:
            assert f"Trial {trial.number}" in shown
        for state in set(states.values()):
            assert state.capitalize() in shown          # "Complete", "Pruned"
        shots = screenshot_dir()
        screenshot(page, shots and shots / "optuna_dashboard_trials.png")
        home = f"http://127.0.0.1:{port}/dashboard"
        assert plan["optuna"]["study_name"] in render(home)


def test_mlflow_ui_opens_the_sweeps_experiment_on_its_runs_with_the_report_and_the_curves(browsed_sweep, tmp_path):
    plan, root = browsed_sweep["plan"], browsed_sweep["root"]
    mlflow = plan["mlflow"]
    client = MlflowClient(mlflow["tracking_uri"])
    assert client.get_experiment(mlflow["experiment_id"]).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    children = child_runs(plan)
    assert len(children) == TRIALS
    shots = screenshot_dir()

    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    with serve([mlflow_cli, "ui", "--backend-store-uri", mlflow["tracking_uri"], "--host", "127.0.0.1", "--port",
                str(port), "--workers", "1"], f"{ui}/health", cwd=root):
        runs = runs_page(mlflow["experiment_id"], ui)
        shown = text(render(runs))
        assert plan["name"] in shown and f"{TRIALS + 1} matching runs" in shown   # the parent and every trial
        assert "Detect Issues" not in shown and "Runs" in shown                   # not the GenAI overview
        screenshot(runs, shots and shots / "mlflow_runs.png")

        parent = f"{ui}/#/experiments/{mlflow['experiment_id']}/runs/{mlflow['parent_run_id']}"
        artifacts = text(render(f"{parent}/artifacts?workflowType=machine_learning"))
        for name in ("report", "sweep.json", "results.csv"):
            assert name in artifacts
        plot = f"{parent}/artifacts/report/val_acc_per_task.png?workflowType=machine_learning"
        shown = text(render(plot))
        assert "report.md" in shown and "val_acc_per_task.png" in shown   # the report folder opened on the plot
        screenshot(plot, shots and shots / "mlflow_parent_report_plot.png")

        child = children[0]
        curves = (f"{ui}/#/experiments/{mlflow['experiment_id']}/runs/{child.info.run_id}/model-metrics"
                  "?workflowType=machine_learning")
        # MLflow draws a chart only once it is in view, and a render may end before the charts' data came (0 of
        # them drawn, seen in about half the renders on a busy machine): a window tall enough for every one of
        # the trial's charts (about 133 px each at 1600 wide; which trial is newest, and how many tasks it ran,
        # depends on the run's numbers), rendered until the names are shown or a wall-clock deadline passes
        metrics = ("val_acc_avg", "acc_avg", "acc_task_1", "forgetting_avg")
        window = f"1600,{1000 + 150 * len(child.data.metrics)}"
        deadline = time.monotonic() + CURVES_DEADLINE_S
        while True:
            shown = text(render(curves, window=window, budget_ms=60_000))
            if all(metric in shown for metric in metrics) or time.monotonic() > deadline:
                break
        for metric in metrics:
            assert metric in shown
        screenshot(curves, shots and shots / "mlflow_trial_curves.png", window=window, budget_ms=60_000)
