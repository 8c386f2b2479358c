"""A real sweep logging to a real `mlflow server` on 127.0.0.1 (MLFLOW_TRACKING_URI), queried over REST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.cluster_fixtures import free_port, ray_subprocess_env
from tests.sweep_helpers import child_runs

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120           # ~30 s on a loaded 2-core machine
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_sweep_logs_every_trial_to_an_mlflow_server(mlflow_server, tmp_path):
    env = {**ray_subprocess_env(), "MLFLOW_TRACKING_URI": mlflow_server, "TUNE_BIR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "tune_bir.sweep", "--iters", "8", "--batch", "32",
                          "--num-samples", "3", "--num-cpus", "2", "--name", "srv",
                          "--storage-path", str(tmp_path / "rr")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert f"mlflow ui --backend-store-uri {mlflow_server}" in out.stdout
    assert not (tmp_path / "mlflow.db").exists()           # nothing went to the local default store

    client = MlflowClient(mlflow_server)
    plan = json.loads((tmp_path / "rr" / "srv" / "sweep.json").read_text())
    assert plan["mlflow"]["tracking_uri"] == mlflow_server
    parent_id = plan["mlflow"]["parent_run_id"]
    runs = child_runs(plan)
    assert len(runs) == 3
    for run in runs:
        assert run.data.tags["trial_status"] in ("completed", "stopped_early", "diverged")
        assert run.info.status in ("FINISHED", "FAILED")
        assert run.data.params["iters"] == "8" and "lamda_rep" in run.data.params
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc_avg")]
        assert steps and steps == list(range(1, len(steps) + 1))
    assert client.get_run(parent_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"sweep.json", "results.csv"} <= artifacts
