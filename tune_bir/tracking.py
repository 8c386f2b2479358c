"""Where MLflow data goes by default (docs/architecture.md "Default locations"), and a probe of it that is
bounded in time; no MLflow import here."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tune_bir.errors import ServiceUnreachableError

CONNECT_TIMEOUT_S = 5.0      # TCP connect to the Ray GCS, HTTP request to MLflow


def default_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else an absolute sqlite file in the working directory."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def check_mlflow(tracking_uri: str, timeout: float = CONNECT_TIMEOUT_S,
                 where: str = "--mlflow-uri (or MLFLOW_TRACKING_URI)") -> None:
    """An http(s) tracking server answers its health check; a sqlite store's folder exists.

    MLflow's REST client retries an unreachable server for minutes; this fails within `timeout`, in one line
    that names the fix (`where` says how this command is given its tracking URI).
    """
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    if scheme == "sqlite":
        _check_sqlite(tracking_uri, where)
    elif scheme in ("http", "https"):
        _check_mlflow_server(tracking_uri, timeout, where)


def _check_sqlite(tracking_uri: str, where: str) -> None:
    path = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return
    folder = Path(path).parent
    if not folder.is_dir():
        raise ServiceUnreachableError(f"MLflow tracking URI {tracking_uri}: the folder {folder} does not exist; "
                                      f"create it or pass another {where}")


def _check_mlflow_server(tracking_uri: str, timeout: float, where: str) -> None:
    url = tracking_uri.rstrip("/") + "/health"
    fix = ("start it (e.g. mlflow server --host 127.0.0.1 --port PORT --backend-store-uri sqlite:////ABS/mlflow.db) "
           f"or pass a reachable {where}")
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
