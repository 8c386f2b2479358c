"""Provenance of a run or sweep: package versions, git commit, device."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("tune_bir", "torch", "torchvision", "kornia", "torchmetrics", "ray", "optuna", "mlflow", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: str | Path | None = None) -> str | None:
    """Commit of the checkout holding this package, with "-dirty" when tracked files differ from it (the run's
    code is then not that commit's); None for an installed wheel or without git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        changed = subprocess.run(["git", "-C", str(where), "diff", "--quiet", "HEAD", "--"], capture_output=True,
                                 timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if changed.returncode == 1 else "")
