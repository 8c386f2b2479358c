"""Where MLflow data goes by default (docs/architecture.md "Default locations"); no MLflow import here."""

from __future__ import annotations

import os
from pathlib import Path


def default_tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else MLFLOW_TRACKING_URI, else an absolute sqlite file in the working directory."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
