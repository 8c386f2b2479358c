"""Helpers shared by the sweep tests that read back what a sweep wrote to MLflow."""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient


def child_runs(plan_json: dict[str, Any]) -> list:
    """The trial runs under a sweep's MLflow parent run, found through its sweep.json."""
    mlflow = plan_json["mlflow"]
    return MlflowClient(mlflow["tracking_uri"]).search_runs(
        [mlflow["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{mlflow['parent_run_id']}'")
