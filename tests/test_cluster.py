"""A real two-node Ray cluster on 127.0.0.1 (tests/cluster_fixtures.py): nodes, tasks and Ray Tune trials
land on both nodes, and trial checkpoints written on either node reach the shared storage path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests import cluster_fixtures
from tests.cluster_fixtures import LocalRayCluster, connected

two_node_ray_cluster = cluster_fixtures.two_node_ray_cluster   # the module-scoped fixture, used here

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _alive_nodes(want: int, timeout: float = 60.0) -> list[dict]:
    import ray

    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_two_alive_nodes_and_a_task_pinned_to_each(two_node_ray_cluster: LocalRayCluster) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with connected(two_node_ray_cluster):
        nodes = _alive_nodes(2)
        assert len(nodes) == 2, f"expected 2 alive Ray nodes, got {len(nodes)}: {nodes}"
        assert all(n["Resources"].get("CPU") == 1 and not n["Resources"].get("GPU") for n in nodes), nodes
        assert ray.cluster_resources().get("CPU") == 2

        @ray.remote(num_cpus=1)
        def where() -> tuple[str, int]:
            return ray.get_runtime_context().get_node_id(), os.getpid()

        refs = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in nodes]
        ran_on = ray.get(refs, timeout=180)
        assert [node for node, _ in ran_on] == [n["NodeID"] for n in nodes], ran_on
        assert len({pid for _, pid in ran_on}) == 2


def test_subprocess_driver_with_address_auto_joins_this_cluster(two_node_ray_cluster: LocalRayCluster) -> None:
    """What the sweep tests do: a driver subprocess with the fixture's env and `--address auto`."""
    script = textwrap.dedent("""
        import ray
        ray.init(address="auto", log_to_driver=False)
        print(ray.get_runtime_context().gcs_address, sum(n["Alive"] for n in ray.nodes()))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=two_node_ray_cluster.env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    gcs_address, alive = done.stdout.split()[-2:]
    # Ray reports 127.0.0.1 as this machine's routable IP, so compare the GCS port
    assert gcs_address.rsplit(":", 1)[1] == two_node_ray_cluster.address.rsplit(":", 1)[1], done.stdout
    assert alive == "2", done.stdout


def test_tune_trials_run_on_both_nodes(two_node_ray_cluster: LocalRayCluster, tmp_path: Path) -> None:
    import ray
    from ray import tune

    barrier_name = "tune_bir_test_barrier"

    @ray.remote(num_cpus=0)
    class Barrier:
        """Both trials must run at the same time; with 1 CPU per node, that means one trial per node."""

        def __init__(self) -> None:
            self.arrived: set[str] = set()

        def arrive(self, trial_id: str) -> int:
            self.arrived.add(trial_id)
            return len(self.arrived)

    def trainable(config: dict) -> None:
        import tempfile

        barrier = ray.get_actor(barrier_name)
        deadline = time.monotonic() + 120
        while ray.get(barrier.arrive.remote(tune.get_context().get_trial_id())) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the other trial never started: are both nodes schedulable?")
            time.sleep(0.2)
        node_id = ray.get_runtime_context().get_node_id()
        with tempfile.TemporaryDirectory() as d:
            Path(d, "node_id").write_text(node_id)
            tune.report({"node_id": node_id, "i": config["i"]}, checkpoint=tune.Checkpoint.from_directory(d))

    storage = tmp_path / "ray_results"
    with connected(two_node_ray_cluster):
        node_ids = {n["NodeID"] for n in _alive_nodes(2)}
        barrier = Barrier.options(name=barrier_name).remote()  # noqa: F841 - kept alive by this reference
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"i": tune.grid_search([0, 1])},
            run_config=tune.RunConfig(name="two_node", storage_path=str(storage), verbose=0),
        )
        results = tuner.fit()
        errors = [r.error for r in results if r.error]
        assert not errors, errors
        assert len(results) == 2
        seen = {r.metrics["node_id"] for r in results}
        assert seen == node_ids, f"trials ran on {seen}, the cluster's nodes are {node_ids}"
        for r in results:   # the checkpoint of the trial on the worker node reached the storage path too
            assert r.checkpoint is not None and Path(r.checkpoint.path).is_relative_to(storage), r.checkpoint
            assert Path(r.checkpoint.path, "node_id").read_text() == r.metrics["node_id"]
