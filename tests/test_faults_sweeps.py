"""Real tiny sweeps under faults and at scale of steps: a trial worker killed mid-task, disk use against the
number of steps, and the same proposals from the same seed (docs/sweep.md "Resume", "Optuna reporting")."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.sweep_helpers import child_runs
from tune_bir.sweep.driver import run_sweep

pytestmark = pytest.mark.slow

TINY = ["--batch", "32", "--seed", "0"]


def store(tmp_path: Path, name: str) -> list[str]:
    return ["--name", name, "--storage-path", str(tmp_path / "rr"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]


def result_lines(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def csv_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv") as f:
        return list(csv.DictReader(f))


# --- a trial worker dies mid-task ------------------------------------------------------------------------
def test_a_worker_killed_mid_task_resumes_from_its_checkpoint_with_no_step_lost_or_logged_twice(ray_session,
                                                                                                tmp_path):
    iters, segment = 24, 8            # 3 Tune steps per task, 15 in all
    sweep_dir = tmp_path / "rr" / "kill"
    killed: list[dict] = []

    def kill_the_worker_mid_task_2() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for trial_dir in sweep_dir.glob("BIRTrainable_*"):
                lines = result_lines(trial_dir)
                if len(lines) >= 4 and not lines[-1].get("done") and lines[-1]["iters_done"] % iters:
                    killed.append(lines[-1])
                    os.kill(int(lines[-1]["worker/pid"]), signal.SIGKILL)   # the trial actor this test started
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_worker_mid_task_2, daemon=True)
    killer.start()
    outcome = run_sweep([*TINY, "--iters", str(iters), "--segment-iters", str(segment), "--num-samples", "1",
                         "--max-concurrent", "1", "--max-failures", "2", *store(tmp_path, "kill")])
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert not outcome.interrupted
    pid = killed[0]["worker/pid"]

    (row,) = csv_rows(sweep_dir)                            # one row, the trial finished every task
    assert row["status"] == "completed" and float(row["task"]) == 5
    assert float(row["training_iteration"]) == 15 and float(row["iters_done"]) == 5 * iters

    (trial_dir,) = sweep_dir.glob("BIRTrainable_*")
    lines = result_lines(trial_dir)
    before = [r for r in lines if r["worker/pid"] == pid]
    after = [r for r in lines if r["worker/pid"] != pid]
    assert before and after and len({r["worker/pid"] for r in after}) == 1   # one new actor took over
    first_new = after[0]["training_iteration"]
    # from the newest checkpoint (at most the one step whose checkpoint had not landed is trained again),
    # not from scratch
    assert 1 < first_new <= before[-1]["training_iteration"] + 1
    iterations = [r["training_iteration"] for r in after]
    assert iterations == list(range(first_new, 16))
    for r in lines:                                           # progress continues where it was
        assert r["iters_done"] == r["training_iteration"] * segment
        assert r["task"] == (r["iters_done"] // iters)
    again = {r["training_iteration"]: r for r in before if r["training_iteration"] >= first_new}
    for r in after:                                           # a step trained again gives the same numbers
        if r["training_iteration"] in again:
            assert r["val_acc_avg"] == again[r["training_iteration"]]["val_acc_avg"]

    plan = json.loads((sweep_dir / "sweep.json").read_text())
    (run,) = child_runs(plan)                                 # exactly one MLflow run for the trial
    assert run.info.status == "FINISHED" and run.data.tags["trial_status"] == "completed"
    assert run.data.tags["trial_id"] == row["trial_id"]
    client = MlflowClient(plan["mlflow"]["tracking_uri"])
    per_task = {int(r["task"]): r for r in lines if r["iters_done"] % iters == 0}
    for key in ("val_acc_avg", "acc_avg", "task"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4, 5]   # each task once: none missing, none twice
        assert [m.value for m in history] == pytest.approx([per_task[t][key] for t in range(1, 6)])
    assert client.get_run(plan["mlflow"]["parent_run_id"]).info.status == "FINISHED"


# --- bounded disk ----------------------------------------------------------------------------------------
def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes of a sweep folder by kind: checkpoints, per-step logs of the trials, everything else."""
    out = {"checkpoints": 0, "trial_logs": 0, "other": 0}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        parts = path.relative_to(folder).parts
        kind = "checkpoints" if any(p.startswith("checkpoint_") for p in parts) else (
            "trial_logs" if parts[0].startswith("BIRTrainable_") else "other")
        out[kind] += path.stat().st_size
    return out


def test_storage_grows_with_trials_not_with_steps(ray_session, tmp_path):
    sizes, steps = {}, {}
    for segments in (5, 20):
        name = f"seg{segments}"
        outcome = run_sweep([*TINY, "--iters", "20", "--segment-iters", str(20 // segments), "--num-samples", "2",
                             "--max-concurrent", "2", "--grace-period", "5", *store(tmp_path, name)])
        assert [r["status"] for r in outcome.rows] == ["completed", "completed"]
        sweep_dir = tmp_path / "rr" / name
        for trial_dir in sweep_dir.glob("BIRTrainable_*"):
            assert len(list(trial_dir.glob("checkpoint_*"))) == 2          # num_to_keep
        sizes[segments] = folder_bytes(sweep_dir)
        steps[segments] = sum(len(result_lines(d)) for d in sweep_dir.glob("BIRTrainable_*"))
    assert steps == {5: 2 * 25, 20: 2 * 100}
    print("sweep folder bytes, 5 vs 20 segments per task:", sizes)
    assert sizes[20]["checkpoints"] <= 1.05 * sizes[5]["checkpoints"]   # two checkpoints per trial either way
    # Ray Tune's per-step logs (result.json, progress.csv) grow with the steps by design; what must not is
    # anything whose size is a checkpoint's: four times the steps cost less than a tenth of the checkpoints
    extra = sum(sizes[20].values()) - sum(sizes[5].values())
    assert extra < 0.1 * sizes[5]["checkpoints"], sizes
    assert sizes[20]["other"] <= 2 * sizes[5]["other"] + 100_000, sizes


# --- the same seed proposes the same configs -------------------------------------------------------------
def test_the_same_seed_proposes_the_same_configs_in_the_same_order_past_the_random_startup(ray_session, tmp_path):
    def proposals(name: str) -> list[tuple]:
        outcome = run_sweep([*TINY, "--iters", "8", "--seed", "3", "--num-samples", "5", "--n-startup-trials", "2",
                             "--max-concurrent", "1", *store(tmp_path, name)])
        assert len(outcome.rows) == 5 and not outcome.interrupted
        trials = sorted(outcome.searcher.study.trials, key=lambda t: t.number)
        by_trial = {r["trial_id"]: r for r in outcome.rows}
        # the Optuna proposals in order, and what Tune ran for each (same values, in the same order)
        return [(t.params, t.state.name, t.user_attrs["trial_status"],
                 {k: by_trial[t.user_attrs["tune_trial_id"]][k] for k in outcome.plan.space.param_names})
                for t in trials]

    first, second = proposals("a"), proposals("b")
    assert first == second
    assert first[0][0] == {} and all(p for p, *_ in first[1:])       # the baseline, then 4 proposals
    assert len({json.dumps(p, sort_keys=True) for p, *_ in first[2:]}) == 3   # TPE's proposals differ
