"""A tiny real sweep on a real two-node Ray cluster (tests/cluster_fixtures.py): trials land on both nodes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import cluster_fixtures
from tests.cluster_fixtures import LocalRayCluster
from tests.sweep_helpers import child_runs

two_node_ray_cluster = cluster_fixtures.two_node_ray_cluster   # the module-scoped fixture, used here

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_sweep_with_address_auto_spreads_trials_over_both_nodes(two_node_ray_cluster: LocalRayCluster,
                                                                tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-m", "tune_bir.sweep", "--address", "auto", "--iters", "8",
                          "--batch", "32", "--num-samples", "4", "--max-concurrent", "2", "--name", "two",
                          "--storage-path", str(tmp_path / "rr"), "--mlflow-uri", uri],
                         cwd=tmp_path, env=two_node_ray_cluster.env, capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    sweep_dir = tmp_path / "rr" / "two"
    nodes, checkpoints = set(), 0
    for trial_dir in sweep_dir.glob("BIRTrainable_*"):
        for line in (trial_dir / "result.json").read_text().splitlines():
            nodes.add(json.loads(line)["worker/node"])
        checkpoints += len(list(trial_dir.glob("checkpoint_*/learner.pt")))
    assert len(nodes) == 2                       # trials ran on the head and on the worker node
    assert checkpoints >= 4                      # checkpoints from both nodes reached the storage path
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    runs = child_runs(plan)
    assert len(runs) == 4 and all("trial_status" in r.data.tags for r in runs)
