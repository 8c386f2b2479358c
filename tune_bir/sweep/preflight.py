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

from tune_bir.errors import ServiceUnreachableError
from tune_bir.fields import check_creatable_folder
from tune_bir.tracking import CONNECT_TIMEOUT_S, check_mlflow

__all__ = ["CONNECT_TIMEOUT_S", "STORAGE_TIMEOUT_S", "ServiceUnreachableError", "check_mlflow", "check_ray_address",
           "check_storage", "ray_gcs_address"]

STORAGE_TIMEOUT_S = 15.0     # one pyarrow file-info call on a storage URI, in a child process


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
    check_creatable_folder(storage_path, "--storage-path", ServiceUnreachableError)


# --- MLflow ---------------------------------------------------------------------------------------
# check_mlflow lives in the core (tune_bir.tracking): a single run with --mlflow probes the same way.


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
    """Something listens at the Ray cluster's GCS address and answers as a gRPC server (a TCP connect and an
    HTTP/2 handshake, each bounded in time)."""
    gcs = ray_gcs_address(address)
    shown = address if address != "auto" else "auto (RAY_ADDRESS, or the last `ray start` on this machine)"
    if gcs is None:
        raise ServiceUnreachableError(f"--address {shown}: no running Ray cluster found; start one (ray start "
                                      "--head) or give the head's HOST:PORT, or drop --address to start Ray here")
    host, port = gcs
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            answers_grpc = _answers_http2(conn) if not _ray_uses_tls() else True
    except OSError as err:
        reason = f"no answer within {timeout:g} s" if isinstance(err, TimeoutError | socket.timeout) else (
            err.strerror or str(err))
        raise ServiceUnreachableError(
            f"cannot reach the Ray cluster at --address {address}{_resolved(host, port, address)}: {reason}; "
            f"start it (ray start --head --port={port}) or give the address of a running cluster (ray status "
            "on its head), or drop --address to start Ray here") from None
    if not answers_grpc:
        # ray.init would wait for minutes on a port that takes connections but is not a GCS
        raise ServiceUnreachableError(
            f"--address {address}{_resolved(host, port, address)} accepts connections but does not answer as a Ray "
            "cluster (its GCS speaks gRPC); give the head's GCS address (ray status on the head prints it; port 6379 "
            "by default), or drop --address to start Ray here")


def _resolved(host: str, port: int, address: str) -> str:
    return f" ({host}:{port})" if f"{host}:{port}" not in address else ""


# A client opens HTTP/2 (hence gRPC) with this preface and a SETTINGS frame; the server must answer with a
# SETTINGS frame of its own (RFC 9113, "Starting HTTP/2"): 9-byte header, type 0x4 at byte 3.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 0x4, 0, 0, 0, 0, 0])


def _answers_http2(conn: socket.socket) -> bool:
    """Whether the server on `conn` answers the HTTP/2 client preface with a SETTINGS frame (within its timeout)."""
    try:
        conn.sendall(_HTTP2_PREFACE)
        header = b""
        while len(header) < 9:
            chunk = conn.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except OSError:   # no answer within the timeout, or the connection was reset
        return False
    return header[3] == 0x4


def _ray_uses_tls() -> bool:
    """Ray's TLS mode (RAY_USE_TLS): the GCS then expects a TLS handshake first, which this probe does not do."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
