"""A sweep on S3 end to end, against a real S3-protocol server on 127.0.0.1 (moto's, tests/s3_fixtures.py): a trial
worker killed mid-task, the driver killed and `--resume`d, `--confirm`, and `python -m analysis` reading the sweep
from S3 and writing its report locally, with the same tables as from a local copy of the folder
(README "S3 storage"; the local versions are tests/test_faults_sweeps.py and tests/test_faults_driver.py, whose
helpers read the bucket here through ArrowPath)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.__main__ import main as analysis_main
from tests import s3_fixtures
from tests.cluster_fixtures import cluster_pids, kill_cluster_processes, ray_subprocess_env
from tests.s3_fixtures import S3_ENV, ArrowPath
from tests.sweep_helpers import child_runs
from tests.test_faults_driver import check_resumed_sweep, resumable_half_way, saved_trial_statuses
from tests.test_sweep_resume import registered_checkpoints, results

pytestmark = pytest.mark.slow

s3_server = s3_fixtures.s3_server
s3_bucket = s3_fixtures.s3_bucket

SWEEP = [sys.executable, "-m", "tune_bir.sweep"]
ITERS, SEGMENT, TRIALS = 16, 8, 3     # 2 Tune steps per task, 10 per trial


def test_a_sweep_on_s3_survives_a_killed_worker_and_driver_then_confirms_and_analyses(s3_server, s3_bucket,
                                                                                      tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")    # short: Ray's socket paths live below it
    env = {**ray_subprocess_env(), **S3_ENV, "TUNE_BIR_CACHE_DIR": str(tmp_path / "cache"), "RAY_TMPDIR": ray_tmp}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage, sweep_uri = s3_server.uri(s3_bucket, "rr"), s3_server.uri(s3_bucket, "rr/s3sweep")
    common = ["--storage-path", storage, "--name", "s3sweep", "--num-cpus", "2"]
    sweep_dir = ArrowPath.of(sweep_uri)
    sessions: set[int] = set()

    def run(*args: str) -> str:
        process = subprocess.Popen([*SWEEP, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        sessions.add(process.pid)
        output = process.communicate(timeout=900)[0]
        assert process.returncode == 0, output[-3000:]
        return output

    try:
        first = subprocess.Popen([*SWEEP, "--iters", str(ITERS), "--segment-iters", str(SEGMENT), "--batch", "32",
                                  "--num-samples", str(TRIALS), "--max-concurrent", "1", "--grace-period", "5",
                                  "--max-failures", "2", "--mlflow-uri", uri, *common], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        sessions.add(first.pid)
        killed_pid = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and first.poll() is None:
            if killed_pid is None:
                # what the bucket holds lags the trial by up to two steps (Ray syncs every num_to_keep
                # checkpoints): a trial seen 3 steps in, not done, is training one of its 10 steps
                running = [lines for lines in results(sweep_dir).values()
                           if len(lines) >= 3 and not lines[-1].get("done")]
                if running:
                    killed_pid = int(running[0][-1]["worker/pid"])
                    os.kill(killed_pid, signal.SIGKILL)     # the trial actor of this test's sweep
            elif resumable_half_way(sweep_dir):
                break
            time.sleep(0.5)
        assert killed_pid is not None, "no trial worker was killed"
        assert first.poll() is None, "the sweep ended before its driver could be killed half-way"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        kill_cluster_processes({first.pid}, ray_tmp)       # Ray's processes of the killed driver
        finished = {t for t, s in saved_trial_statuses(sweep_dir).items() if s == "TERMINATED"}
        before, checkpointed = results(sweep_dir), registered_checkpoints(sweep_dir)
        assert finished and len(finished) < TRIALS

        run("--resume", *common)
        plan = json.loads((sweep_dir / "sweep.json").read_text())
        assert plan["sweep_dir"] == sweep_uri
        check_resumed_sweep(sweep_dir, plan, finished, before, checkpointed, n_trials=TRIALS)

        # the killed worker's trial went on in a new actor from its newest checkpoint, no step lost
        after = results(sweep_dir)
        (victim,) = [lines for lines in after.values() if any(r["worker/pid"] == killed_pid for r in lines)
                     and lines[-1]["worker/pid"] != killed_pid]
        old = [r for r in victim if r["worker/pid"] == killed_pid]
        new = victim[len(old):]
        assert 1 < new[0]["training_iteration"] <= old[-1]["training_iteration"] + 1
        assert sorted({r["training_iteration"] for r in victim}) == list(range(1, 5 * ITERS // SEGMENT + 1))
        for r in victim:
            assert r["iters_done"] == r["training_iteration"] * SEGMENT

        run("--confirm", sweep_uri, "--top-k", "1", "--seeds", "2")
        confirm = pd.read_csv(io.StringIO((sweep_dir / "confirm" / "results.csv").read_text()))
        assert sorted(zip(confirm["config"], confirm["seed"], strict=True)) == [
            ("baseline", 1), ("baseline", 2), ("top1", 1), ("top1", 2)]        # each (config, seed) once
        assert set(confirm["status"]) == {"completed"}
        confirm_runs = [r for r in child_runs(plan) if "confirm_config" in r.data.tags]
        assert sorted((r.data.tags["confirm_config"], r.data.tags["confirm_seed"]) for r in confirm_runs) == [
            ("baseline", "1"), ("baseline", "2"), ("top1", "1"), ("top1", "2")]

        # analysis reads the bucket, writes locally, attaches to MLflow; a local copy gives the same tables
        assert analysis_main([sweep_uri, "--out", str(tmp_path / "report_s3")]) == 0
        local = sweep_dir.copy_to(tmp_path / "copy" / "s3sweep")
        assert analysis_main([str(local), "--out", str(tmp_path / "report_local"), "--no-mlflow"]) == 0
        for table in ("trials.csv", "confirmation.csv"):
            from_s3 = pd.read_csv(tmp_path / "report_s3" / table)
            pd.testing.assert_frame_equal(from_s3, pd.read_csv(tmp_path / "report_local" / table))
        trials = pd.read_csv(tmp_path / "report_s3" / "trials.csv")
        assert len(trials) == TRIALS and set(trials["trial_status"]) == {"completed"}
        attached = MlflowClient(uri).list_artifacts(plan["mlflow"]["parent_run_id"], "report")
        assert {"report/report.md", "report/confirmation.csv"} <= {a.path for a in attached}
    finally:
        for session in sessions:                        # only what this test started
            kill_cluster_processes({session}, ray_tmp)
        assert not cluster_pids(sessions, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_storage_locations_keep_a_uri_query_at_the_end():
    from tune_bir.sweep.storage import SweepFolder, join

    uri = "s3://b/rr?endpoint_override=127.0.0.1:9000&scheme=http"
    folder = SweepFolder.at(uri, "name")
    assert folder.location == "s3://b/rr/name?endpoint_override=127.0.0.1:9000&scheme=http"
    assert folder.sub("confirm").location == "s3://b/rr/name/confirm?endpoint_override=127.0.0.1:9000&scheme=http"
    again = SweepFolder.of(folder.location)
    assert (again.root, again.name) == (folder.root, "name")
    assert join("s3://b/rr/?x=1", "a", "b.json") == "s3://b/rr/a/b.json?x=1"
    assert join(str(Path("/tmp/a?b")), "c") == "/tmp/a?b/c"    # a local path's '?' is a character
