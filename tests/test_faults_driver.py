"""The sweep's driver is killed (SIGKILL: no handler runs, nothing is saved on the way out) and --resume
finishes the sweep. The Ctrl+C case is tests/test_sweep_resume.py; this one reuses its helpers.

After SIGKILL the MLflow parent run and the running trials' runs are left RUNNING and Ray's experiment
state is whatever Tune saved last. Ray Tune promises that trials the saved state records as finished are
not run again and that the others go on from their newest checkpoint; the sweep adds one MLflow run per
trial (re-used, never duplicated) and a parent run that ends FINISHED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.cluster_fixtures import cluster_pids, kill_cluster_processes, ray_subprocess_env
from tests.sweep_helpers import child_runs
from tests.test_sweep_resume import checkpointed_iterations, registered_checkpoints, results, saved_trial_statuses

pytestmark = pytest.mark.slow

SWEEP = [sys.executable, "-m", "tune_bir.sweep"]


def resumable_half_way(sweep_dir: Path) -> bool:
    """The state Tune saved holds a finished trial and a running one with a registered checkpoint: a driver
    killed now leaves a sweep whose resume must skip one trial and go on from a checkpoint in another. Tune
    saves the state every few seconds, after it has written a checkpoint folder, so the folders on disk run
    ahead of it (cheap to look at: checked first). `sweep_dir`: a Path or an ArrowPath (S3)."""
    statuses, kept = saved_trial_statuses(sweep_dir), checkpointed_iterations(sweep_dir)
    half_way = [t for t, s in statuses.items() if s == "RUNNING" and kept.get(t, 0) > 0]
    if not (half_way and "TERMINATED" in statuses.values()):
        return False
    try:
        registered = registered_checkpoints(sweep_dir)
    except Exception:   # noqa: BLE001 - a state file being rewritten: look again
        return False
    return any(registered.get(t, 0) > 0 for t in half_way)


def check_resumed_sweep(sweep_dir: Path, plan: dict, finished: set[str], before: dict[str, list[dict]],
                        checkpointed: dict[str, int], n_trials: int) -> None:
    """A sweep killed with `finished` trials saved as such, `before` their result lines and `checkpointed` their
    newest registered checkpoints (`registered_checkpoints`), then resumed: every trial done, none run again or
    from scratch, one MLflow run per trial with each task logged once, one parent run, FINISHED. `sweep_dir`: a
    Path or an ArrowPath (S3)."""
    after = results(sweep_dir)
    assert len(after) == n_trials and all(lines[-1].get("done") for lines in after.values())
    assert any(n > 0 for t, n in checkpointed.items() if t not in finished), checkpointed   # a resume to check
    for trial_id in finished:                       # saved as finished: not run again
        assert len(after[trial_id]) == len(before[trial_id])
    for trial_id, lines in after.items():
        new = lines[len(before.get(trial_id, [])):]
        iterations = [r["training_iteration"] for r in new]
        if new and checkpointed.get(trial_id, 0) > 0:
            # from its newest checkpoint, not from scratch
            assert 1 < iterations[0] <= checkpointed[trial_id] + 1, (trial_id, checkpointed, iterations)
        if new:
            assert iterations == list(range(iterations[0], iterations[0] + len(new)))

    client = MlflowClient(plan["mlflow"]["tracking_uri"])
    runs = child_runs(plan)
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(after)          # one run per trial
    assert all(r.info.status != "RUNNING" and "trial_status" in r.data.tags for r in runs)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc_avg")]
        assert steps == list(range(1, len(steps) + 1))                              # none twice, none missing
    assert client.get_run(plan["mlflow"]["parent_run_id"]).info.status == "FINISHED"
    assert len(client.search_runs([plan["mlflow"]["experiment_id"]])) == len(runs) + 1   # no second parent
    rows = (sweep_dir / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + n_trials

    # the Optuna study (its database outlives the driver): one trial per Tune trial, each told once; a trial
    # the study began after Tune's last save was never run and is told FAIL
    import optuna

    study = optuna.load_study(study_name=plan["optuna"]["study_name"], storage=plan["optuna"]["storage"])
    ran = [t for t in study.trials if t.user_attrs.get("trial_status") != "never_run"]
    assert sorted(t.user_attrs["tune_trial_id"] for t in ran) == sorted(after)
    assert all(t.state.is_finished() for t in study.trials)
    statuses = {r.data.tags["trial_id"]: r.data.tags["trial_status"] for r in runs}
    assert {t.user_attrs["tune_trial_id"]: t.user_attrs["trial_status"] for t in ran} == statuses


def test_resume_after_the_driver_is_killed_finishes_without_rerunning_or_duplicating(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")    # short: Ray's socket paths live below it
    env = {**ray_subprocess_env(), "TUNE_BIR_CACHE_DIR": str(tmp_path / "cache"), "RAY_TMPDIR": ray_tmp}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--storage-path", str(tmp_path / "rr"), "--name", "k", "--num-cpus", "2"]
    sweep_dir = tmp_path / "rr" / "k"
    sessions: set[int] = set()
    try:
        # one trial at a time: "one finished (and saved as such), the next half-way" is a window of seconds
        first = subprocess.Popen([*SWEEP, "--iters", "60", "--batch", "32", "--num-samples", "3", "--max-concurrent",
                                  "1", "--grace-period", "5", "--mlflow-uri", uri, *common], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        sessions.add(first.pid)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None and not resumable_half_way(sweep_dir):
            time.sleep(0.2)
        assert first.poll() is None, "the sweep ended before it could be killed half-way"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        finished = {t for t, s in saved_trial_statuses(sweep_dir).items() if s == "TERMINATED"}
        before, checkpointed = results(sweep_dir), registered_checkpoints(sweep_dir)
        assert finished and len(finished) < 3
        plan = json.loads((sweep_dir / "sweep.json").read_text())
        client = MlflowClient(uri)
        assert client.get_run(plan["mlflow"]["parent_run_id"]).info.status == "RUNNING"   # nobody closed it
        # Ray's daemons and workers of the killed driver, if any outlive it, are this test's to stop
        survivors = kill_cluster_processes({first.pid}, ray_tmp)
        print(f"processes of the killed driver still alive after it: {len(survivors)} (stopped by the test)")

        second = subprocess.Popen([*SWEEP, "--resume", *common], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        sessions.add(second.pid)
        output = second.communicate(timeout=900)[0]
        assert second.returncode == 0, output[-3000:]

        check_resumed_sweep(sweep_dir, plan, finished, before, checkpointed, n_trials=3)
    finally:
        for session in sessions:                        # only what this test started
            kill_cluster_processes({session}, ray_tmp)
        assert not cluster_pids(sessions, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
