"""A real multi-node Ray cluster on 127.0.0.1 for slow tests: `ray start --head` plus `ray start --address`.

Use the `two_node_ray_cluster` fixture (module-scoped: one cluster per test module) by binding it in a
test module, ``two_node_ray_cluster = tests.cluster_fixtures.two_node_ray_cluster`` (a plain import of the
name trips ruff's F811 on the test parameters), or by listing this module in the root conftest's
``pytest_plugins``. It yields a `LocalRayCluster`:

- ``address``: the GCS address ``127.0.0.1:<port>`` for ``ray.init(address=...)`` or ``--address``;
- ``env``: an environment for drivers run as subprocesses (``python -m tune_bir.sweep --address auto``):
  the current one plus ``RAY_ADDRESS=<address>`` (so ``auto`` finds this cluster, not another Ray on the
  machine), ``RAY_AUTH_MODE=disabled`` and quiet-logging settings;
- ``temp_dir``: the cluster's short Ray temp dir (sockets, logs);
- ``node_count``: the number of nodes started.

Ray 2.60 and authentication: a new local ``ray.init()`` turns token authentication on and writes
``~/.ray/auth_token``; ``ray start --head`` turns it on whenever a token exists (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), while a joining ``ray start --address`` does not, and would be
refused. Every process of this cluster therefore runs with ``RAY_AUTH_MODE=disabled``; the cluster only
listens to this machine (``--node-ip-address=127.0.0.1``).

Isolation from other Ray instances on the same machine: each ``ray start`` runs in a new session
(``setsid``), every daemon and worker it spawns inherits that session id, and teardown signals exactly
the processes of those sessions (plus any process whose command line names this cluster's temp dir).
It never calls ``ray stop``, which would stop every Ray instance of the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest

START_TIMEOUT_S = 180.0          # one `ray start` (about 12 s on an idle 2-core machine)
NODES_TIMEOUT_S = 120.0          # until every node is registered and alive
STOP_GRACE_S = 5.0               # SIGTERM, then SIGKILL
OBJECT_STORE_BYTES = 200 * 2**20
MAX_SOCKET_DIR = 40              # AF_UNIX paths are limited to 107 bytes; Ray adds ~60 below the temp dir

# Ray variables of the caller's environment that would point our processes at another cluster or token.
_FOREIGN_RAY_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                     "RAY_AUTH_MODE", "RAY_NAMESPACE", "RAY_JOB_CONFIG_JSON_ENV_VAR")
_QUIET = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


class LocalRayCluster(NamedTuple):
    address: str
    env: dict[str, str]
    temp_dir: Path
    node_count: int


class ClusterStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_subprocess_env() -> dict[str, str]:
    """This process's environment without a foreign Ray's variables, quiet and without auth: for Ray subprocesses."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_RAY_VARS}
    env.update(_QUIET)
    return env


def _ray_cli() -> list[str]:
    # The `ray` of this interpreter (not whatever `ray` is first on PATH): the daemons and workers then run
    # the same Python and packages as the tests.
    return [sys.executable, "-m", "ray.scripts.scripts"]


# --- process bookkeeping (Linux /proc) ------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()   # after "pid (comm) "
    return fields[0], int(fields[3])             # state, ppid, pgrp, session


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cluster_pids(session_ids: set[int], marker: str) -> list[int]:
    """Live processes of this cluster: members of its `ray start` sessions, or naming its temp dir."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        if stat[1] in session_ids or marker in _cmdline(pid):
            found.append(pid)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_cluster_processes(session_ids: set[int], marker: str, grace_s: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM every process of the cluster, SIGKILL what is left after `grace_s`; return what was signalled."""
    pids = cluster_pids(session_ids, marker)
    signalled = set(pids)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = cluster_pids(session_ids, marker)
        signalled.update(pids)
    for _ in range(3):   # gcs_server may ignore SIGTERM; a dying raylet may still fork a worker
        if not pids:
            break
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.5)
        pids = cluster_pids(session_ids, marker)
        signalled.update(pids)
    return sorted(signalled)


# --- start / stop -----------------------------------------------------------------------------------------
def _log_tail(temp_dir: Path, lines: int = 15) -> str:
    """The last lines of the cluster's error logs, for a failure message."""
    parts = []
    for path in sorted(temp_dir.glob("session_*/logs/*")):
        if path.suffix in (".err", ".log") and path.name.split(".")[0] in (
                "gcs_server", "raylet", "dashboard", "monitor"):
            try:
                text = path.read_text(errors="replace").strip().splitlines()[-lines:]
            except OSError:
                continue
            if text:
                parts.append(f"--- {path.name}\n" + "\n".join(text))
    return "\n".join(parts) or "(no Ray logs)"


def _ray_start(args: list[str], env: dict[str, str], timeout: float, temp_dir: Path,
               sessions: set[int]) -> None:
    proc = subprocess.Popen(_ray_cli() + ["start", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sessions.add(proc.pid)   # a new session: its id is the pid of its leader
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise ClusterStartError(f"`ray start {' '.join(args)}` did not finish in {timeout:.0f} s\n"
                                f"{out[-3000:]}\n{_log_tail(temp_dir)}") from None
    if proc.returncode != 0:
        raise ClusterStartError(f"`ray start {' '.join(args)}` exited with {proc.returncode}\n"
                                f"{out[-3000:]}\n{_log_tail(temp_dir)}")


_WAIT_FOR_NODES = textwrap.dedent("""
    import json, sys, time
    import ray
    address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ray.init(address=address, log_to_driver=False)
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(json.dumps([{"id": n["NodeID"], "resources": n["Resources"]} for n in alive]))
    ray.shutdown()
""")


def wait_for_nodes(address: str, env: dict[str, str], count: int, timeout: float = NODES_TIMEOUT_S) -> list[dict]:
    """Wait (in a separate driver process) until `count` nodes are alive; return their ids and resources."""
    try:
        done = subprocess.run([sys.executable, "-c", _WAIT_FOR_NODES, address, str(count), str(timeout)],
                              env=env, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired as e:
        raise ClusterStartError(f"connecting to {address} took more than {timeout + 60:.0f} s") from e
    if done.returncode != 0:
        raise ClusterStartError(f"could not connect to {address}:\n{done.stderr[-3000:]}")
    nodes = json.loads(done.stdout.strip().splitlines()[-1])
    if len(nodes) < count:
        raise ClusterStartError(f"only {len(nodes)} of {count} Ray nodes alive after {timeout:.0f} s: {nodes}")
    return nodes


@contextmanager
def local_ray_cluster(worker_nodes: int = 1, cpus_per_node: int = 1) -> Iterator[LocalRayCluster]:
    """Start a head and `worker_nodes` worker nodes on 127.0.0.1 (no GPU, no dashboard); always stop them."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("the local Ray cluster fixture needs Linux /proc to find and stop its own processes")
    # /tmp, not $TMPDIR or pytest's tmp_path: Ray's socket paths below the temp dir must stay < 107 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="rt_", dir="/tmp"))
    assert len(str(temp_dir)) <= MAX_SOCKET_DIR, temp_dir
    env = ray_subprocess_env()
    sessions: set[int] = set()
    common = [f"--num-cpus={cpus_per_node}", "--num-gpus=0", f"--temp-dir={temp_dir}",
              "--node-ip-address=127.0.0.1", f"--object-store-memory={OBJECT_STORE_BYTES}",
              "--disable-usage-stats"]
    try:
        port = free_port()
        address = f"127.0.0.1:{port}"
        _ray_start(["--head", f"--port={port}", "--include-dashboard=false", *common],
                   env, START_TIMEOUT_S, temp_dir, sessions)
        for _ in range(worker_nodes):
            _ray_start([f"--address={address}", *common], env, START_TIMEOUT_S, temp_dir, sessions)
        wait_for_nodes(address, env, 1 + worker_nodes)
        yield LocalRayCluster(address=address, env={**env, "RAY_ADDRESS": address}, temp_dir=temp_dir,
                              node_count=1 + worker_nodes)
    finally:
        _disconnect_driver_from(temp_dir)
        kill_cluster_processes(sessions, str(temp_dir))
        if os.environ.get("TUNE_BIR_KEEP_RAY_TEMP") != "1":
            shutil.rmtree(temp_dir, ignore_errors=True)


def _disconnect_driver_from(temp_dir: Path) -> None:
    """If this (pytest) process is still connected to the cluster, disconnect before the cluster goes."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    except Exception:
        session_dir = ""
    if str(session_dir).startswith(str(temp_dir)):
        ray.shutdown()


@contextmanager
def connected(cluster: LocalRayCluster, **init_kwargs) -> Iterator[None]:
    """`ray.init` this process to `cluster` (with the cluster's auth settings) and always `ray.shutdown`."""
    import ray

    if ray.is_initialized():
        ray.shutdown()   # a connection leaked by an earlier test would otherwise be reused silently
    overrides = {**_QUIET, "RAY_ADDRESS": cluster.address}   # RAY_ADDRESS wins over ray.init(address=...)
    try:
        with mock.patch.dict(os.environ, overrides):
            _reload_ray_config()
            try:
                ray.init(address=cluster.address, log_to_driver=False, **init_kwargs)
                yield
            finally:
                ray.shutdown()
    finally:
        _reload_ray_config()   # after the environment is restored


def _reload_ray_config() -> None:
    """Make Ray's C++ config of this process re-read RAY_AUTH_MODE.

    A local ``ray.init()`` earlier in the same process (another test) sets RAY_AUTH_MODE=token and caches
    it; a driver left in token mode then refuses the unauthenticated calls of this cluster's workers
    ("Missing authorization header"), and actors such as Tune trials die before they start. Re-reading the
    config and dropping the cached token is what Ray itself does when it switches modes
    (ray._private.authentication.authentication_token_setup); both are private, hence the guard.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:   # a Ray without token authentication: nothing is cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def two_node_ray_cluster() -> Iterator[LocalRayCluster]:
    """A head and one worker node on 127.0.0.1, 1 CPU and no GPU each; stopped after the module's tests."""
    try:
        with local_ray_cluster(worker_nodes=1, cpus_per_node=1) as cluster:
            yield cluster
    except ClusterStartError as e:
        pytest.fail(f"could not start a two-node Ray cluster on 127.0.0.1: {e}", pytrace=False)
