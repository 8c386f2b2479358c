"""An interrupted sweep (Ctrl+C) resumed with --resume: nothing re-run, no duplicate MLflow runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.cluster_fixtures import ray_subprocess_env
from tests.sweep_helpers import child_runs

pytestmark = pytest.mark.slow

SWEEP = [sys.executable, "-m", "tune_bir.sweep"]


def results(sweep_dir: Path) -> dict[str, list[dict]]:
    """Tune trial id -> every result line the trial wrote."""
    out = {}
    for path in sweep_dir.glob("BIRTrainable_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            out[lines[0]["trial_id"]] = lines
    return out


def checkpointed_iterations(sweep_dir: Path) -> dict[str, int]:
    """Tune trial id -> the training iteration its newest checkpoint holds (0: none yet)."""
    out = {}
    for trial_dir in sweep_dir.glob("BIRTrainable_*"):
        path = trial_dir / "result.json"
        lines = path.read_text().splitlines() if path.exists() else []
        if lines:
            # checkpoint_00000k is written after iteration k + 1
            kept = [int(c.name.rsplit("_", 1)[1]) + 1 for c in trial_dir.glob("checkpoint_*")]
            out[json.loads(lines[0])["trial_id"]] = max(kept, default=0)
    return out


def saved_trial_statuses(sweep_dir: Path) -> dict[str, str]:
    """Tune trial id -> status in the newest experiment state Tune saved ({} while none is readable); `sweep_dir`
    is a Path or anything with its glob and read_text (tests/s3_fixtures.py ArrowPath)."""
    files = sorted(sweep_dir.glob("experiment_state-*.json"))
    try:
        data = json.loads(files[-1].read_text())
        return {t["trial_id"]: t["status"] for t in (json.loads(entry[0]) for entry in data["trial_data"])}
    except (IndexError, OSError, ValueError, KeyError):
        return {}


def registered_checkpoints(sweep_dir: Path) -> dict[str, int]:
    """Tune trial id -> the training iteration of the newest checkpoint Tune had registered (0: none).

    Tune writes a checkpoint folder before it records it in the experiment state: a Ctrl+C between the two
    leaves a folder on disk that a resume does not know, and the trial goes on from the one before. A killed
    driver's state can lag further: Tune saves it every few seconds. `sweep_dir`: a Path or an ArrowPath (S3)."""
    from ray.tune import ExperimentAnalysis

    fs = getattr(sweep_dir, "fs", None)   # tests/s3_fixtures.py ArrowPath: the bucket's pyarrow filesystem
    analysis = ExperimentAnalysis(str(sweep_dir), storage_filesystem=fs)
    out = {}
    for trial in analysis.trials:
        checkpoint = analysis.get_last_checkpoint(trial)
        out[trial.trial_id] = int(Path(checkpoint.path).name.rsplit("_", 1)[1]) + 1 if checkpoint else 0
    return out


def test_resume_after_an_interrupt_finishes_without_rerunning_completed_trials(tmp_path):
    env = {**ray_subprocess_env(), "TUNE_BIR_CACHE_DIR": str(tmp_path / "cache")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--storage-path", str(tmp_path / "rr"), "--name", "r", "--num-cpus", "2"]
    # tasks of a few seconds: the window "one trial done, another half-way" must outlast the polling below
    first = subprocess.Popen([*SWEEP, "--iters", "120", "--batch", "32", "--num-samples", "4", "--max-concurrent",
                              "2", "--grace-period", "2", "--reduction-factor", "2", "--mlflow-uri", uri, *common],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sweep_dir = tmp_path / "rr" / "r"
    deadline, done_earlier = time.monotonic() + 400, set()
    while time.monotonic() < deadline and first.poll() is None:
        seen, kept = results(sweep_dir), checkpointed_iterations(sweep_dir)
        half_way = [tid for tid, lines in seen.items() if not lines[-1].get("done") and kept.get(tid, 0) > 0]
        done = {tid for tid, lines in seen.items() if lines[-1].get("done")}
        # one finished, one half-way; the finished one's last line seen a poll ago, so that Tune has also
        # recorded the trial as ended (it writes the line first)
        if half_way and done & done_earlier:
            break
        done_earlier = done
        time.sleep(0.25)
    assert first.poll() is None, first.communicate()[0][-3000:]
    first.send_signal(signal.SIGINT)        # Ctrl+C: Tune saves the experiment state and stops
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 130, output[-3000:]
    assert "--resume --name r" in output

    before, statuses = results(sweep_dir), saved_trial_statuses(sweep_dir)
    on_disk, checkpointed = checkpointed_iterations(sweep_dir), registered_checkpoints(sweep_dir)
    for trial_id, iteration in checkpointed.items():      # the newest folder, or the one before it (see above)
        assert iteration <= on_disk.get(trial_id, 0) and (iteration or not on_disk.get(trial_id)
                                                          or on_disk[trial_id] == 1), (on_disk, checkpointed)
    # finished: what Tune saved as such at Ctrl+C. A trial whose last result line came just before the Ctrl+C,
    # before Tune recorded its end, is resumed: it trains its last step again from its newest registered
    # checkpoint (checked below with the half-way ones)
    finished_before = {tid: len(before[tid]) for tid, status in statuses.items() if status == "TERMINATED"}
    assert finished_before and len(finished_before) < 4, statuses
    assert all(before[tid][-1].get("done") for tid in finished_before)

    second = subprocess.run([*SWEEP, "--resume", *common], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    # the baseline trains every task (ASHA never stops it): there is always a best config to print
    assert "best config: " in second.stdout and "no trial trained" not in second.stdout

    after = results(sweep_dir)
    assert len(after) == 4 and all(lines[-1].get("done") for lines in after.values())
    for trial_id, count in finished_before.items():
        assert len(after[trial_id]) == count          # completed trials were not run again
    resumed = []
    for trial_id, lines in after.items():
        old, new = before.get(trial_id, []), lines[len(before.get(trial_id, [])):]
        iterations = [r["training_iteration"] for r in new]
        if new and checkpointed.get(trial_id, 0) > 0:
            # a trial that was half-way goes on from its newest registered checkpoint, not from scratch (a
            # step whose result was written but whose checkpoint was not when Ctrl+C came is trained again)
            assert iterations[0] == checkpointed[trial_id] + 1, (trial_id, checkpointed, old, iterations)
            resumed.append(trial_id)
        if new:
            assert iterations == list(range(iterations[0], iterations[0] + len(new)))
    assert resumed, (checkpointed, {t: len(lines) for t, lines in before.items()})

    client = MlflowClient(uri)
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    parent_id = plan["mlflow"]["parent_run_id"]
    runs = child_runs(plan)
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(after)      # one run per trial
    assert all(r.info.status != "RUNNING" and "trial_status" in r.data.tags for r in runs)
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc_avg")]
        assert steps == list(range(1, len(steps) + 1))                          # no step logged twice
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert len(client.search_runs([plan["mlflow"]["experiment_id"]])) == len(runs) + 1
