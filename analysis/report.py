"""A sweep's trial table -> trials.csv / trials.parquet, paper-ready plots and report.md.

`write_report(table, out)` writes, into the local folder or storage URI `out`:

- `trials.csv`, `trials.parquet`: the table (analysis.table);
- `val_acc_per_task.png`: validation accuracy after each task, one line per trial (stopped early and
  failed trials grey, the best and the baseline highlighted);
- `params_vs_val_acc.png`: each tuned parameter against the final `val_acc_avg` of the completed
  trials (log axis for log distributions; stopped-early trials as grey ticks on the axis);
- `param_importance.png`: Optuna's fANOVA importances on a study rebuilt from the table (>= 2
  completed trials besides the baseline, else a note in the report);
- `parallel_coordinates.png`: Optuna's parallel-coordinates plot of the same study;
- with a confirmation (SWEEP/confirm/): `confirmation.csv` (analysis.stats) and `confirmation.png`;
- `report.md`: what was searched, status counts, the top-k table, the plots, what the numbers show.
"""

from __future__ import annotations

import json
import math
import shlex
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import stats
from analysis.table import ALL_STATUSES, FINAL_METRICS, UNFINISHED, is_log, n_tasks, param_specs
from tune_bir.record import FINGERPRINT_FIELDS
from tune_bir.sweep.status import COMPLETED, DIVERGED, ERRORED, SELECTION_METRIC, STOPPED_EARLY, rank_trials
from tune_bir.sweep.storage import CONFIRM_FILE, RESULTS_FILE

TABLE_CSV, TABLE_PARQUET, REPORT_FILE = "trials.csv", "trials.parquet", "report.md"
TASK_PLOT, PARAMS_PLOT, IMPORTANCE_PLOT, PARALLEL_PLOT = (
    "val_acc_per_task.png", "params_vs_val_acc.png", "param_importance.png", "parallel_coordinates.png")
CONFIRM_CSV, CONFIRM_PLOT = "confirmation.csv", "confirmation.png"
SWEEP_PROG = "python -m tune_bir.sweep"
DPI = 150


@dataclass
class Confirmation:
    """A confirmation run of the sweep: confirm.json and its results.csv (one row per config and seed)."""

    spec: dict[str, Any]
    results: pd.DataFrame


@dataclass
class Report:
    """What `write_report` wrote and found."""

    out: str
    files: list[str]
    top: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    importances: dict[str, float] | None = None
    confirmation: pd.DataFrame | None = None
    rung_correlations: list = field(default_factory=list)   # tune_bir.sweep.rungs.RungCorrelation per rung


# ---------------------------------------------------------------------------------------------
# ranking
def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Completed trials, best `val_acc_avg` first (tune_bir.sweep.status.rank_trials, the sweep's own rule)."""
    rows = table.rename(columns={"trial_status": "status"}).to_dict("records")
    order = [r["trial_id"] for r in rank_trials(rows, SELECTION_METRIC)]
    return table.set_index("trial_id").loc[order].reset_index()[table.columns]


def top_k(table: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The k best completed trials: rank, trial, baseline, tuned parameters, final metrics."""
    plan = table.attrs["plan"]
    best = ranked(table).head(k)
    top = best[["trial_id", "baseline", *param_specs(plan), *FINAL_METRICS, "time_total_s"]].copy()
    top.insert(0, "rank", range(1, len(top) + 1))
    top.attrs = {}
    return top.reset_index(drop=True)


def status_counts(table: pd.DataFrame) -> dict[str, int]:
    counts = {s: int((table["trial_status"] == s).sum()) for s in ALL_STATUSES}
    if not counts[UNFINISHED]:
        del counts[UNFINISHED]
    return counts


def _baseline(table: pd.DataFrame) -> pd.Series | None:
    rows = table[table["baseline"]]
    return rows.iloc[0] if len(rows) else None


def _completed(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table["trial_status"] == COMPLETED) & table[SELECTION_METRIC].notna()]


# ---------------------------------------------------------------------------------------------
# Optuna: the study rebuilt from the table
def _distribution(spec: Mapping[str, Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kind = spec["distribution"]
    if kind == "choice":
        return CategoricalDistribution(list(spec["choices"]))
    if kind in ("int", "logint"):
        return IntDistribution(int(spec["low"]), int(spec["high"]), log=kind == "logint")
    return FloatDistribution(float(spec["low"]), float(spec["high"]), log=kind == "loguniform")


def _present(value: Any) -> bool:
    return value is not None and value is not pd.NA and not (isinstance(value, float) and math.isnan(value))


def rebuild_study(table: pd.DataFrame):
    """An Optuna study holding the table's searched trials (the baseline samples nothing: left out).

    Completed trials are COMPLETE with their final val_acc_avg; stopped-early ones PRUNED with their
    per-task values as intermediate values; diverged and errored ones FAIL.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    plan = table.attrs["plan"]
    specs = param_specs(plan)
    tasks = n_tasks(plan)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name=plan.get("name"))
    trials = []
    for row in table[~table["baseline"]].to_dict("records"):
        params = {n: row[n] for n in specs if _present(row[n])}
        params = {n: (v if specs[n]["distribution"] == "choice" else
                      int(v) if specs[n]["distribution"] in ("int", "logint") else float(v))
                  for n, v in params.items()}
        distributions = {n: _distribution(specs[n]) for n in params}
        value = row[SELECTION_METRIC]
        attrs = {"trial_id": row["trial_id"], "trial_status": row["trial_status"]}
        if row["trial_status"] == COMPLETED and _present(value):
            state, value = TrialState.COMPLETE, float(value)
        elif row["trial_status"] in (STOPPED_EARLY, UNFINISHED):
            state, value = TrialState.PRUNED, None
        else:
            state, value = TrialState.FAIL, None
        intermediate = {t: float(row[f"val_acc_avg_after_task_{t}"]) for t in range(1, tasks + 1)
                        if _present(row[f"val_acc_avg_after_task_{t}"])} if state != TrialState.FAIL else {}
        trials.append(create_trial(state=state, value=value, params=params, distributions=distributions,
                                   user_attrs=attrs, intermediate_values=intermediate))
    study.add_trials(trials)
    return study


def param_importances(table: pd.DataFrame, study: Any = None) -> tuple[dict[str, float] | None, str]:
    """(Optuna fANOVA importances of the tuned parameters, seed 0; a note) - None when they cannot be computed."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    study = study if study is not None else rebuild_study(table)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, (f"parameter importance needs >= 2 completed trials besides the baseline; "
                      f"this sweep has {len(complete)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return None, f"parameter importance could not be computed: {err}"
    if not importances or not all(math.isfinite(v) for v in importances.values()):
        return None, "parameter importance is undefined here (no parameter varies over every completed trial)"
    return dict(importances), (f"fANOVA (Optuna, seed 0) on {len(complete)} completed trials; parameters "
                               "sampled in only some trials (conditional ones) are left out")


# ---------------------------------------------------------------------------------------------
# plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)


def _zoomed_limits(values: np.ndarray, min_span: float, pad: float = 0.08) -> tuple[float, float] | None:
    """Axis limits around the finite values, at least `min_span` wide (equal values get a readable axis)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    low, high = float(finite.min()), float(finite.max())
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    span = high - low
    return low - pad * span, high + pad * span


def plot_task_curves(table: pd.DataFrame, path: Path) -> None:
    """Validation accuracy after each task, one line per trial, on an axis zoomed to the trials' range; beside it
    each trial's difference to the baseline in points. An x marks where ASHA stopped a trial, dotted lines the
    rungs; the best trial red, the baseline black."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    plan = table.attrs["plan"]
    tasks = np.arange(1, n_tasks(plan) + 1)
    columns = [f"val_acc_avg_after_task_{t}" for t in tasks]
    best = ranked(table)
    best_id = best["trial_id"].iloc[0] if len(best) else None
    baseline = _baseline(table)
    base_curve = None if baseline is None else baseline[columns].to_numpy(dtype=float)
    panels = 2 if base_curve is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.2), squeeze=False)
    acc_ax, diff_ax = axes[0, 0], (axes[0, 1] if panels == 2 else None)
    styles = {COMPLETED: dict(color="tab:blue", alpha=0.45, lw=1.2),
              STOPPED_EARLY: dict(color="0.55", alpha=0.8, lw=1.0),
              DIVERGED: dict(color="0.55", alpha=0.8, lw=1.0, ls=":"),
              ERRORED: dict(color="0.55", alpha=0.8, lw=1.0, ls=":"),
              UNFINISHED: dict(color="0.55", alpha=0.8, lw=1.0, ls="--")}

    stops: list[tuple[Any, int, float]] = []   # (axis, task, value) of each ASHA stop, to count overlaps

    def draw(curve: np.ndarray, status: str, style: dict, zorder: float) -> None:
        # ASHA's stop: the last task the trial trained (stopped trials only)
        last = int(np.flatnonzero(np.isfinite(curve))[-1]) if np.isfinite(curve).any() else None
        for ax, values in ((acc_ax, curve), (diff_ax, None if base_curve is None else 100 * (curve - base_curve))):
            if ax is None:
                continue
            ax.plot(tasks, values, zorder=zorder, **({"marker": "o", "ms": 2.5} | style))
            if status == STOPPED_EARLY and last is not None:
                ax.plot(tasks[last], values[last], marker="x", ms=7, mew=1.6, color="tab:orange", zorder=6)
                stops.append((ax, int(tasks[last]), round(float(values[last]), 9)))

    for row in table.to_dict("records"):
        if row["trial_id"] == best_id or row["baseline"]:
            continue
        draw(np.array([row[c] for c in columns], dtype=float), row["trial_status"], styles[row["trial_status"]], 2)
    if base_curve is not None:
        draw(base_curve, COMPLETED, dict(color="black", ls="--", lw=2.2, marker="s", ms=4), 4)
    if best_id is not None:
        draw(best.iloc[0][columns].to_numpy(dtype=float), COMPLETED, dict(color="tab:red", lw=2.6, ms=4), 5)
    from collections import Counter

    for (ax, task, value), count in Counter(stops).items():
        if count > 1:   # stopped trials with equal scores sit on one mark
            ax.annotate(f"{count}x", (task, value), xytext=(6, -3), textcoords="offset points", fontsize=7,
                        color="tab:orange")
    every = table[columns].to_numpy(dtype=float)
    limits = _zoomed_limits(every, min_span=0.02)
    if limits:
        acc_ax.set_ylim(*limits)
    rungs = asha_rungs(plan)
    for ax in (acc_ax, diff_ax):
        if ax is None:
            continue
        for task in rungs:
            ax.axvline(task, color="tab:orange", ls=":", lw=1.2, zorder=1)
        ax.set_xticks(tasks)
        ax.set_xlabel("tasks trained")
        ax.grid(alpha=0.3)
    acc_ax.set_ylabel("validation accuracy (mean over tasks so far)")
    acc_ax.set_title(f"{plan.get('name')}: {len(table)} trials, space {plan['space']['name']}", fontsize=10)
    if diff_ax is not None:
        diffs = 100 * (every - base_curve)
        limits = _zoomed_limits(diffs, min_span=1.0)   # points
        if limits:
            diff_ax.set_ylim(*limits)
        diff_ax.axhline(0, color="black", lw=1.0)
        diff_ax.set_ylabel("validation accuracy minus the baseline's (points)")
        diff_ax.set_title("difference to the baseline (same seed, same task 1)", fontsize=10)
    legend = [Line2D([], [], color="tab:blue", alpha=0.6, label=f"{COMPLETED} trial"),
              Line2D([], [], color="0.55", label="stopped early"),
              Line2D([], [], color="tab:orange", marker="x", ls="", mew=1.6, label="stopped here by ASHA"),
              Line2D([], [], color="0.55", ls=":", label="diverged / errored")]
    if rungs:
        legend.append(Line2D([], [], color="tab:orange", ls=":", label="ASHA rung"))
    if base_curve is not None:
        legend.append(Line2D([], [], color="black", ls="--", lw=2.2, marker="s", label="baseline"))
    if best_id is not None:
        label = "best (= baseline)" if best.iloc[0]["baseline"] else f"best ({best_id})"
        legend.append(Line2D([], [], color="tab:red", lw=2.6, marker="o", label=label))
    acc_ax.legend(handles=legend, fontsize=7, frameon=False)
    fig.tight_layout()
    _save(fig, path)


def _categorical_positions(values: pd.Series, choices: list[Any], seed: int = 0) -> np.ndarray:
    index = {str(c): i for i, c in enumerate(choices)}
    jitter = np.random.default_rng(seed).uniform(-0.12, 0.12, len(values))
    return np.array([index[str(v)] for v in values], dtype=float) + jitter


def plot_params(table: pd.DataFrame, path: Path) -> bool:
    """Each tuned parameter against the final val_acc_avg of the completed trials; False when nothing to show."""
    plt = _pyplot()
    plan = table.attrs["plan"]
    specs = param_specs(plan)
    done = _completed(table)
    searched = done[~done["baseline"]]
    if searched.empty or not specs:
        return False
    stopped = table[table["trial_status"] == STOPPED_EARLY]
    best = ranked(table)
    best_id = best["trial_id"].iloc[0] if len(best) else None
    baseline = _baseline(table)
    ncols = min(3, len(specs))
    nrows = math.ceil(len(specs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, (name, spec) in zip(axes.flat, specs.items(), strict=False):
        have = searched.loc[searched[name].map(_present).astype(bool)]
        rug = stopped.loc[stopped[name].map(_present).astype(bool), name]
        if spec["distribution"] == "choice":
            choices = list(spec["choices"])
            x = _categorical_positions(have[name], choices)
            rug_x = _categorical_positions(rug, choices, seed=1)
            ax.set_xticks(range(len(choices)), [str(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:
            x, rug_x = have[name].to_numpy(dtype=float), rug.to_numpy(dtype=float)
            low, high = float(spec["low"]), float(spec["high"])
            if is_log(spec):
                ax.set_xscale("log")
                pad = (high / low) ** 0.03
                ax.set_xlim(low / pad, high * pad)
            elif spec["distribution"] == "int":
                ax.set_xlim(low - 0.5, high + 0.5)
                ax.xaxis.get_major_locator().set_params(integer=True)
            else:
                ax.set_xlim(low - 0.03 * (high - low), high + 0.03 * (high - low))
        ax.scatter(x, have[SELECTION_METRIC], s=28, color="tab:blue", alpha=0.8, edgecolor="white", lw=0.5,
                   label="completed trial", zorder=3)
        is_best = (have["trial_id"] == best_id).to_numpy()
        if is_best.any():
            ax.scatter(x[is_best], have.loc[is_best, SELECTION_METRIC], s=140, marker="*", color="tab:red",
                       label="best", zorder=4)
        if len(rug_x):
            ax.scatter(rug_x, np.full(len(rug_x), 0.02), transform=ax.get_xaxis_transform(), marker="|", s=120,
                       color="0.55", label="stopped early (value only)", zorder=2)
        if baseline is not None and _present(baseline[SELECTION_METRIC]) and baseline["trial_status"] == COMPLETED:
            ax.axhline(baseline[SELECTION_METRIC], color="black", ls="--", lw=1.2, label="baseline")
        when = spec.get("when") or {}
        ax.set_xlabel(name + (f"  (when {', '.join(f'{k}={v}' for k, v in when.items())})" if when else ""),
                      fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"final {SELECTION_METRIC}")
    for ax in list(axes.flat)[len(specs):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(specs)]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(f"{plan.get('name')}: tuned parameters vs final {SELECTION_METRIC} "
                 f"({len(searched)} completed trials)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_importances(importances: Mapping[str, float], path: Path, title: str) -> None:
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(5.6, 0.45 * len(names) + 1.4))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1.0, max(importances.values()) * 1.15))
    ax.set_xlabel(f"importance for final {SELECTION_METRIC} (fANOVA, sums to 1)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_parallel(study: Any, path: Path, title: str) -> None:
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Optuna's matplotlib plots are "experimental"
        ax = plot_parallel_coordinate(study, target_name=f"final {SELECTION_METRIC}")
    for collection in ax.collections:   # Optuna draws in "Blues": the worst trials would be near-white
        collection.set_cmap("viridis")
    fig = ax.figure
    fig.set_size_inches(max(6.4, 1.6 * len(study.best_trial.params) + 2), 4.2)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def paired_curves(results: pd.DataFrame, config: str, n_tasks: int) -> pd.DataFrame:
    """Per seed, `config` minus the baseline in test acc_avg after each task (rows: seeds, columns: tasks)."""
    done = results[results["status"] == COMPLETED]
    columns = [f"acc_avg_after_task_{t}" for t in range(1, n_tasks + 1) if f"acc_avg_after_task_{t}" in done]
    mine = done[done["config"] == config].set_index("seed")[columns]
    base = done[done["config"] == stats.BASELINE].set_index("seed")[columns]
    seeds = mine.index.intersection(base.index)
    diff = mine.loc[seeds].astype(float) - base.loc[seeds].astype(float)
    diff.columns = [int(c.rsplit("_", 1)[1]) for c in columns]
    return diff.sort_index()


def plot_confirmation(curves: pd.DataFrame, path: Path, title: str, results: pd.DataFrame | None = None) -> None:
    """Top row: mean test acc_avg after each task with its 95 % t-band, baseline against each confirmed config.
    Bottom row (with `results`): each seed's paired difference to the baseline, in points, and their mean with
    its 95 % t-interval: how many seeds agree, not only the mean."""
    plt = _pyplot()
    configs = [c for c in dict.fromkeys(curves["config"]) if c != stats.BASELINE]
    ncols = max(1, len(configs))
    nrows = 2 if results is not None else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.2 * nrows), squeeze=False)
    base = curves[curves["config"] == stats.BASELINE]
    tasks = sorted(curves["task"].unique())
    for ax, config in zip(axes[0], configs, strict=False):
        mine = curves[curves["config"] == config]
        for data, colour, label, ls in ((base, "black", "baseline", "--"), (mine, "tab:red", config, "-")):
            n = int(data["n"].max()) if len(data) else 0
            ax.plot(data["task"], data["mean"], color=colour, ls=ls, marker="o", ms=3, label=f"{label} (n={n})")
            ax.fill_between(data["task"], data["low"], data["high"], color=colour, alpha=0.18, lw=0)
        ax.set_xticks(tasks)
        ax.set_xlabel("tasks trained")
        ax.set_title(config, fontsize=10)
        ax.legend(fontsize=8, frameon=False)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test acc_avg (mean, 95 % CI)")
    shared = [ax.get_ylim() for ax in axes[0]]
    low, high = min(y[0] for y in shared), max(y[1] for y in shared)
    for ax in axes[0]:
        ax.set_ylim(low, high)
    if results is not None:
        n_tasks = int(max(tasks))
        for ax, config in zip(axes[1], configs, strict=False):
            diff = 100 * paired_curves(results, config, n_tasks)
            for seed, row in diff.iterrows():
                ax.plot(row.index, row.to_numpy(), color="tab:red", alpha=0.35, lw=0.9, marker="o", ms=2)
                ax.annotate(str(seed), (row.index[-1], row.iloc[-1]), xytext=(3, 0), textcoords="offset points",
                            fontsize=6, color="0.35", va="center")
            mean = diff.mean()
            band = np.array([stats.t_interval(diff[t].dropna().to_numpy()) for t in diff.columns])
            ax.plot(diff.columns, mean.to_numpy(), color="tab:red", lw=2.2, label=f"mean of {len(diff)} seeds")
            if len(band):
                ax.fill_between(diff.columns, band[:, 0], band[:, 1], color="tab:red", alpha=0.15, lw=0,
                                label="95 % CI of the mean")
            final = diff[diff.columns[-1]] if len(diff.columns) else pd.Series(dtype=float)
            above = int((final > 0).sum())
            ax.axhline(0, color="black", lw=1.0, ls="--")
            ax.set_xticks(tasks)
            ax.set_xlabel("tasks trained")
            ax.set_title(f"{config} - baseline, per seed ({above} of {len(final)} above 0 at the end)", fontsize=9)
            ax.legend(fontsize=7, frameon=False, loc="lower left")
            ax.grid(alpha=0.3)
        axes[1, 0].set_ylabel("paired difference (points of test acc_avg)")
        limits = [ax.get_ylim() for ax in axes[1]]
        for ax in axes[1]:   # one scale: configs compare at a glance
            ax.set_ylim(min(y[0] for y in limits), max(y[1] for y in limits))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _fmt(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f"{value:.4g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-markdown table (pandas' to_markdown needs `tabulate`, which the project does not install)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _space_section(plan: Mapping[str, Any]) -> list[str]:
    space, base = plan["space"], plan["resolved_base_config"]
    rows = []
    for name, spec in param_specs(plan).items():
        values = (", ".join(map(str, spec["choices"])) if spec["distribution"] == "choice"
                  else f"[{spec['low']:g}, {spec['high']:g}]")
        when = ", ".join(f"{k}={v}" for k, v in (spec.get("when") or {}).items())
        rows.append({"parameter": name, "distribution": spec["distribution"], "values": values, "when": when or "-"})
    asha = plan.get("asha", {})
    args = (plan.get("cli") or {}).get("args", {})
    lines = [f"Space **{space['name']}**: {space.get('description', '')}.",
             f"Fixed in every searched trial: {', '.join(f'`{k}={v}`' for k, v in space.get('fixed', {}).items())}"
             " (the baseline has every exaggeration off and samples nothing).", "",
             markdown_table(pd.DataFrame(rows)) if rows else "(no sampled parameter)", "",
             f"Base config: experiment `{base.get('experiment')}`, {base.get('tasks')} tasks, {base.get('iters')} "
             f"iterations per task, seed {base.get('seed')}, validation fraction {base.get('val_fraction')}. "
             f"{args.get('num_samples', '?')} trials asked; selection on `{plan.get('metric', SELECTION_METRIC)}` "
             f"(validation); ASHA on `{asha.get('metric', '?')}`, grace period {asha.get('grace_period', '?')}, "
             f"reduction factor {asha.get('reduction_factor', '?')}."]
    return lines


def _caveats(table: pd.DataFrame, sweep_ref: str, confirmed: bool) -> list[str]:
    plan = table.attrs["plan"]
    done = _completed(table)
    seed = plan["resolved_base_config"].get("seed")
    seeds = (plan.get("cli") or {}).get("args", {}).get("seeds_per_trial", 1)
    lines = [f"Every trial trained {'one seed' if seeds == 1 else f'{seeds} seeds'} (seed {seed}), and the best "
             f"is the maximum of {len(done)} noisy validation scores: its margin over the baseline is biased upward "
             "(the winner's curse). A single-seed winner is a candidate, not a finding.",
             "Selection used validation accuracy (`val_acc_avg`); test accuracy (`acc_avg`) is reported beside it "
             "and was not used to choose. Trials stopped early were judged after fewer tasks, when class-incremental "
             "accuracy is still high, so they are never ranked against completed ones.",
             "Parameter importances and the scatter plots describe this sweep's sample of configs: with few trials "
             "they are rough, and they say nothing about parameter values the sampler never tried."]
    if not confirmed:
        lines.append(f"To turn the candidate into a finding, retrain the top configs and the baseline on fresh "
                     f"seeds: `{SWEEP_PROG} --confirm {shlex.quote(sweep_ref)}`, then run "
                     f"`python -m analysis {shlex.quote(sweep_ref)}` again for paired statistics.")
    return lines


def _verdict_line(row: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    source = next((c for c in spec.get("configs", []) if c.get("config") == row["config"]), {})
    origin = f"trial {source['source_trial_id']}" if source.get("source_trial_id") else "sweep trial"
    sweep_val = source.get("sweep_val_acc_avg")
    sweep_part = f", sweep {SELECTION_METRIC} {_fmt(sweep_val)}" if sweep_val is not None else ""
    return (f"- **{row['config']}** ({origin}{sweep_part}): **{row['verdict']}** - test acc_avg difference "
            f"{_fmt(row['diff_vs_baseline'])} [95 % CI {_fmt(row['diff_ci_low'])}, {_fmt(row['diff_ci_high'])}], "
            f"paired t p = {_fmt(row['p_t'])}, Holm p = {_fmt(row['p_holm'])}, Wilcoxon p = "
            f"{_fmt(row['p_wilcoxon'])}, d_z = {_fmt(row['effect_size'])}, {_fmt(row['n_pairs'])} paired seeds"
            + (f" ({row['note']})" if row.get("note") else ""))


def recorded_machine_fields(results: pd.DataFrame) -> list[str]:
    """The CPU fields (tune_bir.record.FINGERPRINT_FIELDS) that a results table holds, in their order."""
    return [f for f in FINGERPRINT_FIELDS if f in results.columns]


def machine_kinds(results: pd.DataFrame) -> pd.Series:
    """Each run's CPU kind and thread count as one label (its recorded machine fields joined)."""
    return results[recorded_machine_fields(results)].astype(str).agg(" / ".join, axis=1)


def machines_note(results: pd.DataFrame) -> str | None:
    """What the CPUs of a confirmation's runs mean for its pairing: None when every run recorded the same CPU
    kind and thread count; a paragraph when they differ, or when no run recorded one (an older results.csv)."""
    fields = recorded_machine_fields(results)
    if not fields:
        return ("the runs record no CPU (a results.csv from before tune_bir recorded one): whether they all came "
                "from one kind of CPU and thread count is unknown; their per-seed numbers reproduce bit for bit "
                "only on the kind that made them (docs/results.md \"Which numbers reproduce where\").")
    kinds = machine_kinds(results)
    if kinds.nunique() <= 1:
        return None
    label = {kind: chr(ord("A") + i) for i, kind in enumerate(kinds.value_counts().index)}
    legend = "; ".join(f"{label[kind]} = {kind} ({n} runs)" for kind, n in kinds.value_counts().items())
    spans = pd.DataFrame({"seed": results["seed"], "kind": kinds}).groupby("seed")["kind"].nunique()
    mix = pd.crosstab(results["config"], kinds.map(label))
    per_config = "; ".join(f"{config}: " + " + ".join(f"{n} {k}" for k, n in row.items() if n)
                           for config, row in mix.iterrows())
    # the same share of each kind in every config (configs of a sequential confirmation stop at different looks)
    balanced = bool((mix.div(mix.sum(axis=1), axis=0).round(12).nunique(axis=0) == 1).all())
    return (f"the runs came from {len(label)} kinds of CPU or thread count ({' / '.join(fields)}: {legend}). "
            f"Per config: {per_config}. "
            + (f"In {int((spans > 1).sum())} of {len(spans)} seeds the runs of that seed span kinds: such a pair "
               "shares its seed (data order, replay draws, initial weights) but not its rounding, which over "
               "thousands of steps moves a run's accuracy like a change of seed (docs/results.md \"Which numbers "
               "reproduce where\"), so pairing removes less of the seed-to-seed spread and the test loses power. "
               if (spans > 1).any() else "Every seed's runs computed on one kind, so each pair is like for like. ")
            + ("Every config ran the same mix of kinds, so the CPU adds noise, not bias." if balanced else
               "The configs did not run the same mix of kinds: a paired difference then also holds the "
               "difference between the CPUs, a bias no number of seeds removes.")
            + " Bit-reproducible pairs need one kind of node for the whole confirmation (docs/results.md "
            "\"Which numbers reproduce where\").")


def _confirmation_section(confirmation: Confirmation, table: pd.DataFrame, plot: bool) -> list[str]:
    spec = confirmation.spec
    shown = table[["config", "n_seeds", "acc_avg_mean", "acc_avg_ci_low", "acc_avg_ci_high", "forgetting_mean",
                   "diff_vs_baseline", "diff_ci_low", "diff_ci_high", "p_t", "p_wilcoxon", "p_holm", "effect_size"]]
    lines = ["## Confirmation on fresh seeds", "",
             f"{len(spec.get('configs', []))} configs (the baseline and the sweep's top ones) retrained on seeds "
             f"{', '.join(map(str, spec.get('seeds', [])))}, to the full budget, no early stopping. Test accuracy "
             "`acc_avg`, paired by seed against the baseline (seeds where both completed).", "",
             markdown_table(shown), "",
             "Verdicts (Holm-adjusted paired t-test across the confirmed configs, family-wise alpha 0.05):", ""]
    lines += [_verdict_line(r, spec) for r in table.to_dict("records") if r["config"] != stats.BASELINE]
    lines += ["", "How to read it: `diff_vs_baseline` is the mean over seeds of (config - baseline); its interval "
              "is a 95 % t-interval; `p_holm` controls the chance of any false 'better'/'worse' among the "
              "configs; `effect_size` is Cohen's d_z = mean(diff) / sd(diff). A config that was the sweep's best "
              "but shows no significant difference here was most likely lucky in the sweep. 'No significant "
              "difference' is not evidence of no effect: with few seeds only large effects can be detected."]
    if (note := machines_note(confirmation.results)) is not None:
        lines += ["", f"CPUs: {note}"]
    if plot:
        lines += ["", f"![test acc_avg after each task, 95 % bands]({CONFIRM_PLOT})"]
    return lines


# ---------------------------------------------------------------------------------------------
def asha_rungs(plan: Mapping[str, Any]) -> list[int]:
    """The tasks at which the sweep's ASHA compared trials (none for a sweep.json without ASHA settings)."""
    from tune_bir.sweep.rungs import rung_tasks

    asha = plan.get("asha") or {}
    if "grace_period" not in asha or "reduction_factor" not in asha:
        return []
    # max_t: the last task's step (sweep.json of older versions may lack it)
    return rung_tasks({"max_t": n_tasks(plan) * int(asha.get("segments_per_task", 1)), **asha})


def early_stopping(table: pd.DataFrame) -> list:
    """Spearman's rho between val_acc_avg at each ASHA rung and at the end, over the completed trials: the
    weaker, range-restricted estimate (trials ASHA stopped have no final score; docs/sweep.md
    "Is early stopping informative?")."""
    from tune_bir.sweep.rungs import rung_correlations

    plan = table.attrs["plan"]
    tasks, last = asha_rungs(plan), n_tasks(plan)
    done = _completed(table)
    curves = {row["trial_id"]: {t: row[f"{SELECTION_METRIC}_after_task_{t}"] for t in range(1, last + 1)}
              for row in done.to_dict("records")}
    final = {t: c[last] for t, c in curves.items()}
    return rung_correlations(curves, final, tasks, restricted=True,
                             seed=int(plan.get("resolved_base_config", {}).get("seed", 0)))


def _early_stopping_section(correlations: list) -> list[str]:
    from tune_bir.sweep.rungs import LOW_RHO, MIN_TRIALS

    lines = ["## Is early stopping informative?", "",
             f"Spearman's rho between `{SELECTION_METRIC}` at each ASHA rung and at the end, over the completed "
             "trials, with a 95 % bootstrap interval. Only trials that passed every rung have a final score, so "
             "this is a **range-restricted, weaker estimate**: the stopped trials are missing. A full-budget "
             "reference (every config to the end, `benchmarks/asha_reference.py`) measures it properly.", "",
             "| rung (task) | trials | rho | 95 % interval |", "|---|---|---|---|"]
    for c in correlations:
        lines.append(f"| {c.task} | {c.n} | {_fmt(c.rho)} | {_fmt(c.low)} to {_fmt(c.high)} |")
    low = [c for c in correlations if c.n >= MIN_TRIALS and c.is_low]
    if low:
        lines += ["", f"rho below {LOW_RHO} at task(s) {', '.join(str(c.task) for c in low)}: stops there are "
                  "close to a coin toss; give a later `--grace-period` or `--seeds-per-trial` > 1."]
    elif correlations and all(c.n < MIN_TRIALS for c in correlations):
        lines += ["", f"Fewer than {MIN_TRIALS} completed trials: too few to say."]
    return lines + [""]


def _write_table(table: pd.DataFrame, out: Path) -> None:
    plain = table.copy()
    plain.attrs = {}
    plain.to_csv(out / TABLE_CSV, index=False)
    # a choice column mixing types (e.g. numbers and strings) fits no single Arrow type: Parquet gets it as text
    mixed = [c for c in plain.columns if plain[c].dtype == object
             and len({type(v) for v in plain[c] if v is not None}) > 1]
    plain.astype({c: "string" for c in mixed}).to_parquet(out / TABLE_PARQUET, index=False)


def write_report(table: pd.DataFrame, out: str | Path, *, k: int = 5, sweep_ref: str | None = None,
                 source: str = "", confirmation: Confirmation | None = None) -> Report:
    """Write the table, plots and report.md into `out` (a local folder or a storage URI); return what was written.

    `sweep_ref` is how the user names the sweep in the suggested commands (its folder); `source` says
    where the table came from (one line in the report).
    """
    out = str(out)
    if "://" in out:
        with tempfile.TemporaryDirectory() as tmp:
            report = _write_local(table, Path(tmp), k=k, sweep_ref=sweep_ref, source=source, confirmation=confirmation)
            _upload(Path(tmp), out)
        report.out = out
        return report
    local = Path(out).expanduser()
    local.mkdir(parents=True, exist_ok=True)
    return _write_local(table, local, k=k, sweep_ref=sweep_ref, source=source, confirmation=confirmation)


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def _write_local(table: pd.DataFrame, out: Path, *, k: int, sweep_ref: str | None, source: str,
                 confirmation: Confirmation | None) -> Report:
    plan = table.attrs["plan"]
    name = plan.get("name", "sweep")
    sweep_ref = sweep_ref or plan.get("sweep_dir") or name
    _write_table(table, out)
    files = [TABLE_CSV, TABLE_PARQUET]
    top = top_k(table, k)
    notes: list[str] = []
    done = _completed(table)

    plot_task_curves(table, out / TASK_PLOT)
    files.append(TASK_PLOT)
    plots = [(TASK_PLOT, "Left: validation accuracy (mean over the tasks seen so far) after each task, one line per "
              "trial, on an axis zoomed to the trials' range; right: each trial minus the baseline, in points. "
              "Stopped-early and failed trials grey, an orange x where ASHA stopped a trial, dotted lines at its "
              "rungs; the best completed trial red, the baseline black dashed.")]
    if plot_params(table, out / PARAMS_PLOT):
        files.append(PARAMS_PLOT)
        plots.append((PARAMS_PLOT, f"Each tuned parameter against the final `{SELECTION_METRIC}` of the completed "
                      "trials (log axis where the space samples log-uniformly); grey ticks: values of trials stopped "
                      "early; dashed line: the baseline."))
    else:
        notes.append("no completed trial besides the baseline: no parameter plot")
    study = rebuild_study(table)
    importances, importance_note = param_importances(table, study)
    if importances is not None:
        plot_importances(importances, out / IMPORTANCE_PLOT, f"{name}: parameter importance")
        files.append(IMPORTANCE_PLOT)
        plots.append((IMPORTANCE_PLOT, f"Parameter importance: {importance_note}."))
    else:
        notes.append(importance_note)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(complete) >= 2:
        plot_parallel(study, out / PARALLEL_PLOT, f"{name}: completed trials")
        files.append(PARALLEL_PLOT)
        plots.append((PARALLEL_PLOT, "Parallel coordinates of the completed trials (Optuna), coloured by final "
                      f"`{SELECTION_METRIC}`."))
    else:
        notes.append("parallel coordinates need >= 2 completed trials besides the baseline")

    confirm_table = None
    if confirmation is not None:
        confirm_table = stats.confirmation_table(confirmation.results)
        confirm_table.to_csv(out / CONFIRM_CSV, index=False)
        files.append(CONFIRM_CSV)
        tasks = int(confirmation.spec.get("n_tasks") or n_tasks(plan))
        has_curves = any(c.startswith("acc_avg_after_task_") for c in confirmation.results.columns)
        if has_curves and len(confirm_table) > 1:
            seeds = ", ".join(map(str, confirmation.spec.get("seeds", [])))
            plot_confirmation(stats.curves(confirmation.results, tasks), out / CONFIRM_PLOT,
                              f"{name}: confirmation on seeds {seeds}", results=confirmation.results)
            files.append(CONFIRM_PLOT)

    counts = status_counts(table)
    lines = [f"# Sweep `{name}`", "", f"Source: {source or sweep_ref}. Sweep id `{plan.get('sweep_id', '?')}`, "
             f"created {plan.get('created', '?')}.", "", "## What was searched", "", *_space_section(plan), "",
             "## Trials", "", markdown_table(pd.DataFrame([counts])), ""]
    if done.empty:
        lines += [f"**No trial trained every task**: there is no best config. The table (`{TABLE_CSV}`) and the "
                  "per-task curves show how far each trial got.", ""]
    if counts.get("unfinished"):
        lines += [f"{counts['unfinished']} trial(s) have no recorded status: the sweep was interrupted or is "
                  "still running (`python -m tune_bir.sweep --resume --name NAME` continues it).", ""]
    lines += [f"## Top {k} (completed trials, by validation `{SELECTION_METRIC}`)", ""]
    if len(top):
        lines += [markdown_table(top), ""]
        best = top.iloc[0]
        baseline = _baseline(table)
        if baseline is not None and baseline["trial_status"] == COMPLETED and not best["baseline"]:
            gain = best[SELECTION_METRIC] - baseline[SELECTION_METRIC]
            lines += [f"Best minus baseline: {SELECTION_METRIC} {_fmt(gain)}, test acc_avg "
                      f"{_fmt(best['acc_avg'] - baseline['acc_avg'])} (single seed).", ""]
        elif best["baseline"]:
            lines += ["The baseline (every exaggeration off) is the best completed trial.", ""]
    else:
        lines += ["(none)", ""]
    lines += ["## Plots", ""]
    for file, caption in plots:
        lines += [f"![{file}]({file})", "", caption, ""]
    if notes:
        lines += ["Not shown: " + "; ".join(notes) + ".", ""]
    correlations = early_stopping(table)
    if correlations:
        lines += _early_stopping_section(correlations)
    lines += ["## What the numbers show, and what they do not", ""]
    lines += [f"- {line}" for line in _caveats(table, sweep_ref, confirmation is not None)] + [""]
    if confirm_table is not None and confirmation is not None:
        lines += _confirmation_section(confirmation, confirm_table, CONFIRM_PLOT in files) + [""]
    (out / REPORT_FILE).write_text("\n".join(lines))
    files.append(REPORT_FILE)
    return Report(out=str(out), files=files, top=top, notes=notes, importances=importances,
                  confirmation=confirm_table, rung_correlations=correlations)


def read_confirmation(location: str) -> Confirmation | None:
    """`<location>/confirm.json` and `<location>/results.csv` (the confirm folder), None when not both exist."""
    import io

    import pyarrow.fs

    from analysis.table import _fs, _read

    fs, path = _fs(location)
    files = {}
    for name in (CONFIRM_FILE, RESULTS_FILE):
        if fs.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.File:
            return None
        files[name] = _read(fs, f"{path}/{name}")
    return Confirmation(spec=json.loads(files[CONFIRM_FILE]), results=pd.read_csv(io.StringIO(files[RESULTS_FILE])))
