"""Unreachable services, produced for real on 127.0.0.1: the sweep fails fast, in one line, creating nothing.

Each case runs the real command line against a loopback port where nothing listens, or where a socket
accepts connections and never answers (what a firewalled or hung service looks like; without the probes
pyarrow's S3 client and MLflow's REST client wait there for minutes). Also the safe defaults of the Ray
dashboard (off; on 127.0.0.1 when asked for).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_fixtures import free_port, ray_subprocess_env
from tune_bir.sweep.plan import PROG, SweepOptions, build_parser
from tune_bir.sweep.run import ray_init_kwargs

FAIL_WITHIN_S = 30.0
TINY = ["--iters", "8", "--batch", "32", "--num-samples", "2"]   # no --num-cpus: refused with --address


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


def run_sweep_cli(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                          float]:
    env = {**ray_subprocess_env(), "TUNE_BIR_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tune_bir.sweep", *TINY, *argv], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - start


def assert_failed_fast_creating_nothing(out: subprocess.CompletedProcess, elapsed: float, tmp_path: Path,
                                        *names: str) -> None:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.startswith(f"{PROG}: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for name in names:
        assert name in out.stderr, out.stderr
    assert elapsed < FAIL_WITHIN_S, elapsed
    assert not (tmp_path / "rr").exists()               # no sweep folder
    assert not (tmp_path / "mlflow.db").exists()        # no MLflow store, hence no MLflow run
    assert "Ray instance" not in out.stdout + out.stderr   # Ray never started


def local_store(tmp_path: Path) -> list[str]:
    return ["--storage-path", str(tmp_path / "rr"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def test_a_ray_address_where_nothing_listens(tmp_path):
    port = free_port()
    out, elapsed = run_sweep_cli(tmp_path, "--address", f"127.0.0.1:{port}", *local_store(tmp_path))
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, f"127.0.0.1:{port}", "ray start --head",
                                        "drop --address")


def test_a_ray_address_that_takes_connections_but_never_answers(tmp_path, silent_port):
    # ray.init would retry such a port for minutes; the HTTP/2 handshake of the probe gets no answer
    out, elapsed = run_sweep_cli(tmp_path, "--address", f"127.0.0.1:{silent_port}", *local_store(tmp_path))
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, f"127.0.0.1:{silent_port}",
                                        "does not answer as a Ray cluster", "drop --address")


def test_a_ray_address_where_another_kind_of_server_answers(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out, elapsed = run_sweep_cli(tmp_path, "--address", f"127.0.0.1:{server.server_port}", *local_store(tmp_path))
    finally:
        server.shutdown()
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, "does not answer as a Ray cluster", "port 6379")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_address_auto_resolves_ray_address_like_ray_does(tmp_path):
    port = free_port()
    out, elapsed = run_sweep_cli(tmp_path, "--address", "auto", *local_store(tmp_path),
                                 env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, "--address auto", f"127.0.0.1:{port}")


def test_an_mlflow_uri_where_nothing_listens(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    out, elapsed = run_sweep_cli(tmp_path, "--mlflow-uri", uri, "--storage-path", str(tmp_path / "rr"))
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, uri, "mlflow server", "--mlflow-uri")


def test_an_mlflow_server_that_never_answers(tmp_path, silent_port):
    uri = f"http://127.0.0.1:{silent_port}"
    out, elapsed = run_sweep_cli(tmp_path, "--mlflow-uri", uri, "--storage-path", str(tmp_path / "rr"))
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, uri, "no answer within")


def test_an_mlflow_sqlite_store_in_a_missing_folder(tmp_path):
    uri = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    out, elapsed = run_sweep_cli(tmp_path, "--mlflow-uri", uri, "--storage-path", str(tmp_path / "rr"))
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, uri, "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_a_storage_scheme_pyarrow_does_not_know(tmp_path):
    out, elapsed = run_sweep_cli(tmp_path, "--storage-path", "nosuchfs://bucket/ray_results",
                                 "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, "nosuchfs://bucket/ray_results")


def test_a_storage_path_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    out, elapsed = run_sweep_cli(tmp_path, "--storage-path", str(tmp_path / "afile" / "rr"),
                                 "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, "is a file")


@pytest.mark.slow
def test_an_s3_storage_endpoint_that_never_answers(tmp_path, silent_port):
    # pyarrow's S3 client waited > 100 s on such an endpoint; the probe gives up after STORAGE_TIMEOUT_S
    uri = f"s3://bucket/ray_results?endpoint_override=127.0.0.1:{silent_port}&scheme=http&region=us-east-1"
    no_cloud = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    out, elapsed = run_sweep_cli(tmp_path, "--storage-path", uri, "--mlflow-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}", env=no_cloud)
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, uri, "no answer within")


def test_resume_probes_the_storage_path_too(tmp_path):
    out, elapsed = run_sweep_cli(tmp_path, "--resume", "--name", "x", "--storage-path", "nosuchfs://bucket/rr",
                                 "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_failed_fast_creating_nothing(out, elapsed, tmp_path, "nosuchfs://bucket/rr")


# --- the Ray dashboard: off unless asked for, then on 127.0.0.1 only --------------------------------------
def test_the_dashboard_is_off_by_default():
    assert build_parser().parse_args([]).dashboard is False
    kwargs = ray_init_kwargs(SweepOptions(num_cpus=2))
    assert kwargs == {"num_cpus": 2, "include_dashboard": False}


def test_dashboard_binds_to_loopback_when_asked_for():
    options = SweepOptions.from_namespace(build_parser().parse_args(["--dashboard", "--num-cpus", "2"]))
    assert ray_init_kwargs(options) == {"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1"}


def test_dashboard_with_a_cluster_address_is_refused_before_connecting(tmp_path, capsys):
    from tune_bir.cli import run_main
    from tune_bir.sweep.driver import main

    code = run_main(PROG, main, [*TINY, "--dashboard", "--address", f"127.0.0.1:{free_port()}",
                                 *local_store(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--dashboard starts the dashboard of a local Ray" in err and err.count("\n") == 1
    assert not (tmp_path / "rr").exists() and not (tmp_path / "mlflow.db").exists()
