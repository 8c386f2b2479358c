"""Finished sweeps -> tables, plots, reports and statistics (`python -m analysis SWEEP`; docs/analysis.md).

The top layer of the project: it reads what `tune_bir.sweep` wrote (the sweep folder or MLflow) and
is imported by neither `tune_bir` nor `trainables`. Public API (imported lazily: pandas, matplotlib,
Optuna and MLflow load only when used):

- `load_sweep(SWEEP)`, `load_mlflow(tracking_uri, sweep)`: one DataFrame, one row per trial;
- `write_report(table, out, ...)`: trials.csv/.parquet, plots, report.md (analysis.report);
- `confirmation_table(results)`: the statistics of a confirmation run (analysis.stats);
- `SequentialDesign`, `Verdict`, `decide`, `paired_differences`: the group-sequential confirmation's
  decision rule (analysis.sequential).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "load_sweep": "analysis.table", "load_mlflow": "analysis.table", "UNFINISHED": "analysis.table",
    "write_report": "analysis.report", "top_k": "analysis.report", "param_importances": "analysis.report",
    "confirmation_table": "analysis.stats", "holm": "analysis.stats", "t_interval": "analysis.stats",
    "SequentialDesign": "analysis.sequential", "Verdict": "analysis.sequential", "decide": "analysis.sequential",
    "paired_differences": "analysis.sequential", "VERDICTS": "analysis.sequential",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
