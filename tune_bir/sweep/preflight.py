"""Probes of the services a sweep needs, each bounded in time, run before anything is created.

Unreachable services make the libraries hang instead of failing: `ray.init(address=...)` retries a
GCS that is not there for minutes, MLflow's REST client retries a server for minutes, and pyarrow's S3
client waits on an endpoint that accepts a connection but never answers. The sweep therefore probes,
in this order, the storage path, the MLflow tracking URI and the Ray address, each with a short
timeout, and only then starts Ray, opens the MLflow parent run and writes the sweep folder. A failed
probe is one line naming the address and the fix.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tune_bir.errors import TuneBirError

CONNECT_TIMEOUT_S = 5.0      # TCP connect to the Ray GCS, HTTP request to MLflow
STORAGE_TIMEOUT_S = 15.0     # one pyarrow file-info call on a storage URI, in a child process


class ServiceUnreachableError(TuneBirError):
    """A service the sweep needs (Ray cluster, MLflow server, storage) cannot be reached or used."""


# --- storage ----------------------------------------------------------------------------------------
_STORAGE_PROBE = """
import sys
import pyarrow.fs
try:
    fs, path = pyarrow.fs.FileSystem.from_uri(sys.argv[1])
    fs.get_file_info(path)
except Exception as err:
    print(f"{type(err).__name__}: {err}".replace("\\n", " "), file=sys.stderr)
    sys.exit(1)
"""


def check_storage(storage_path: str, timeout: float = STORAGE_TIMEOUT_S) -> None:
    """The storage path can be used: a local folder we may create, or a URI pyarrow answers for in time.

    A URI is probed in a child process: pyarrow's calls cannot be interrupted, and a stuck S3 client
    would also hold up the interpreter's exit.
    """
    if "://" not in storage_path:
        _check_local_storage(storage_path)
        return
    fix = ("check the URI, the credentials (e.g. AWS_ACCESS_KEY_ID / AWS_PROFILE for s3://) and the network, "
           "or use a local or NFS path")
    try:
        out = subprocess.run([sys.executable, "-c", _STORAGE_PROBE, storage_path], capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ServiceUnreachableError(f"--storage-path {storage_path}: no answer within {timeout:g} s; {fix}") from None
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ServiceUnreachableError(f"--storage-path {storage_path} cannot be used ({reason}); {fix}")


def _check_local_storage(storage_path: str) -> None:
    path = Path(storage_path).expanduser().resolve()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ServiceUnreachableError(f"--storage-path {storage_path}: {existing} is a file, not a folder; "
                                      "choose another --storage-path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ServiceUnreachableError(f"--storage-path {storage_path}: {existing} is not writable; "
                                      "choose another --storage-path")


# --- MLflow -----------------------------------------------------------------------------------------
def check_mlflow(tracking_uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """An http(s) tracking server answers its health check; a sqlite store's folder exists."""
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    if scheme == "sqlite":
        _check_sqlite(tracking_uri)
    elif scheme in ("http", "https"):
        _check_mlflow_server(tracking_uri, timeout)


def _check_sqlite(tracking_uri: str) -> None:
    path = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise ServiceUnreachableError(f"MLflow tracking URI {tracking_uri}: the folder {folder} does not exist; "
                                      "create it or pass another --mlflow-uri")


def _check_mlflow_server(tracking_uri: str, timeout: float) -> None:
    url = tracking_uri.rstrip("/") + "/health"
    fix = ("start it (e.g. mlflow server --host 127.0.0.1 --port PORT --backend-store-uri sqlite:////ABS/mlflow.db) "
           "or pass a reachable --mlflow-uri (or MLFLOW_TRACKING_URI)")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as response:
            response.read(64)
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise ServiceUnreachableError(f"MLflow tracking server {tracking_uri} is unhealthy (HTTP {err.code} from "
                                          f"/health); {fix}") from None
        # 401/403/404: something answers (an auth proxy, a path prefix); MLflow's own calls decide
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, socket.timeout | TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise ServiceUnreachableError(f"cannot reach the MLflow tracking server {tracking_uri} ({reason}); "
                                      f"{fix}") from None


# --- Ray --------------------------------------------------------------------------------------------
def ray_gcs_address(address: str) -> tuple[str, int] | None:
    """(host, port) that `ray.init(address=...)` would connect to; None when Ray itself finds none.

    `auto` is resolved as Ray resolves it (RAY_ADDRESS, then the address file of the last `ray start`,
    then a running GCS process); `ray://host:port` is a Ray client address.
    """
    if address.startswith("ray://"):
        target = address[len("ray://"):].split("/", 1)[0]
    elif address == "auto":
        from ray._private.services import get_ray_address_from_environment

        try:
            target = get_ray_address_from_environment(address, None)
        except ConnectionError:
            return None
        if target is None or target == "auto":
            return None
        return ray_gcs_address(target) if target.startswith("ray://") else _host_port(target, address)
    else:
        target = address
    return _host_port(target, address)


def _host_port(target: str, address: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ServiceUnreachableError(f"--address {address}: not HOST:PORT; give the Ray head's address "
                                      "(ray status on the head prints it) or auto")
    return host.strip("[]"), int(port)


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Something listens at the Ray cluster's GCS address (a TCP connect, bounded in time)."""
    gcs = ray_gcs_address(address)
    shown = address if address != "auto" else "auto (RAY_ADDRESS, or the last `ray start` on this machine)"
    if gcs is None:
        raise ServiceUnreachableError(f"--address {shown}: no running Ray cluster found; start one (ray start "
                                      "--head) or give the head's HOST:PORT, or drop --address to start Ray here")
    host, port = gcs
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = f"no answer within {timeout:g} s" if isinstance(err, TimeoutError | socket.timeout) else (
            err.strerror or str(err))
        resolved = f" ({host}:{port})" if f"{host}:{port}" not in address else ""
        raise ServiceUnreachableError(
            f"cannot reach the Ray cluster at --address {address}{resolved}: {reason}; start it (ray start --head "
            f"--port={port}) or give the address of a running cluster (ray status on its head), "
            "or drop --address to start Ray here") from None
