"""What a finished (or interrupted) sweep found: its results table, its best config, its closing summary."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import shlex
from dataclasses import dataclass, field
from typing import Any

from search_spaces import EXAGGERATION_OFF
from tune_bir.config import BIRConfig
from tune_bir.fields import flag_name
from tune_bir.record import result_fingerprint
from tune_bir.sweep.plan import METRIC, PROG, SweepPlan
from tune_bir.sweep.run import save_to_sweep, search_alg
from tune_bir.sweep.status import COMPLETED, is_finite_number, rank_trials, status_counts, trial_status
from tune_bir.sweep.storage import BEST_FILE, RESULTS_FILE, SWEEP_FILE, is_uri, join
from tune_bir.terms import idle_fields
from tune_bir.train import PROG as TRAIN_PROG

log = logging.getLogger(__name__)

# final metrics kept in a trial's row of results.csv (besides its status, parameters and per-task accuracies)
ROW_METRICS = ("task", "training_iteration", "time_total_s", "bwt", "forgetting_avg", "iters_done")


@dataclass
class SweepOutcome:
    """What a finished (or interrupted) sweep produced."""

    plan: SweepPlan
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_values: dict[str, Any] | None
    interrupted: bool
    searcher: Any
    result_grid: Any
    rung_correlations: list = field(default_factory=list)   # tune_bir.sweep.rungs.RungCorrelation per rung

    @property
    def sweep_dir(self) -> str:
        """The sweep folder: a local path or a storage URI."""
        return self.plan.folder.location

    @property
    def tracking_uri(self) -> str:
        return self.plan.mlflow.tracking_uri

    @property
    def parent_run_id(self) -> str:
        return self.plan.mlflow.parent_run_id


def trial_rows(grid: Any, plan: SweepPlan) -> tuple[list[dict[str, Any]], bool]:
    """One row per finished trial (status, parameters, final metrics) and whether some trial is unfinished."""
    trials = grid._experiment_analysis.trials   # Trial objects carry Tune's status; no public accessor
    saved = saved_statuses(plan.folder.location)
    rows, unfinished = [], False
    for trial in trials:
        if saved.get(trial.trial_id, trial.status) not in ("TERMINATED", "ERROR"):
            unfinished = True
            continue
        metrics = dict(trial.last_result or {})
        config = trial.config or {}
        row: dict[str, Any] = {"trial_id": trial.trial_id, "trial_name": str(trial),
                               "status": trial_status(metrics, trial.status == "ERROR", plan.n_tasks),
                               "baseline": bool(config.get("baseline"))}
        row |= {k: config.get(k) for k in plan.tuned_names}
        row |= {k: v for k, v in metrics.items() if k in ROW_METRICS or k.startswith(("acc_", "val_"))}
        row |= result_fingerprint(metrics)   # what computed it (None: an older sweep)
        row["path"] = trial.path
        rows.append(row)
    return rows, unfinished


def saved_statuses(location: str) -> dict[str, str]:
    """Trial statuses in the experiment state Tune saved last.

    After Ctrl+C Tune saves the state (trials still RUNNING, to be resumed) and then stops every trial
    in memory, so the in-memory statuses no longer tell an interrupted trial from a finished one.
    """
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(location).trials}
    except Exception:   # no readable state: fall back to the in-memory statuses
        log.warning("could not read the saved experiment state of %s", location, exc_info=True)
        return {}


def best_values(plan: SweepPlan, row: dict[str, Any]) -> dict[str, Any]:
    """A trial's config as the user would type it: non-default fields only."""
    return typed_values(plan.base_config, EXAGGERATION_OFF if row["baseline"]
                        else {k: v for k, v in row.items() if k in plan.tuned_names})


def typed_values(base_config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A base config with `values` set, as the user would type it for one run: non-default fields only."""
    values = {**base_config, **values}
    # what a single run would refuse as changing nothing: how the sweep cut tasks into steps, and options of
    # terms this trial has off (the baseline keeps the base config's)
    idle = {"segment_iters", *(name for name, _ in idle_fields(BIRConfig.from_dict(values)))}
    defaults = BIRConfig().to_dict()
    return {k: values[k] for k in BIRConfig.field_names()
            if k in values and k not in idle and values[k] is not None and values[k] != defaults[k]}


def train_command(values: dict[str, Any], seed: int | None = None, threads: int | None = None) -> str:
    """A runnable `python -m tune_bir.train` line for a config dict; with `seed` and `threads` it is a trial's own
    run (the seed, and the CPU threads its worker had: on the same kind of CPU, the same numbers bit for bit)."""
    parts = TRAIN_PROG.split()
    for name, value in values.items():
        if name == "seed" and seed is not None:
            continue
        flag = flag_name(name)
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        else:
            parts.append(f"{flag}={value!r}" if isinstance(value, float) else f"{flag}={value}")
    if seed is not None:
        parts.append(f"--seed={seed}")
    if threads is not None:
        parts.append(f"--threads={threads}")
    return " ".join(shlex.quote(p) for p in parts)


def trial_threads(rows: list[dict[str, Any]], cpus_per_trial: float) -> int:
    """The CPU threads the trials of `rows` trained with (their recorded `threads`, the most common one), else
    what Ray gives a worker of `cpus_per_trial` CPUs (OMP_NUM_THREADS: the whole CPUs, at least 1)."""
    recorded = [int(float(r["threads"])) for r in rows if str(r.get("threads") or "").replace(".", "", 1).isdigit()]
    if recorded:
        return max(set(recorded), key=recorded.count)
    return max(1, int(cpus_per_trial))


def run_alone_lines(configs: dict[str, dict[str, Any]], rows: list[dict[str, Any]], seed: int,
                    cpus_per_trial: float) -> list[str]:
    """One `python -m tune_bir.train` line per labelled config of a confirmation (its typed values), with `seed`
    and the threads its runs had (`rows`' `threads` of that config)."""
    width = max(map(len, configs), default=0)
    return [f"{label:<{width}}  "
            + train_command(values, seed, trial_threads([r for r in rows if r["config"] == label], cpus_per_trial))
            for label, values in configs.items()]


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def completed_curves(grid: Any, plan: SweepPlan, rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Trial id -> {task: val_acc_avg after it} of the completed trials (from each trial's progress.csv)."""
    completed = {r["trial_id"] for r in rows if r["status"] == COMPLETED}
    iters = plan.resolved.iters
    curves: dict[str, dict[int, float]] = {}
    for result in grid:
        frame = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id not in completed or frame is None or METRIC not in frame or "iters_done" not in frame:
            continue
        ends = frame[frame["iters_done"] == frame["task"] * iters]
        curves[trial_id] = {int(t): float(v) for t, v in zip(ends["task"], ends[METRIC], strict=True)}
    return curves


def rung_check(grid: Any, plan: SweepPlan, rows: list[dict[str, Any]]) -> list:
    """How well ASHA's rung scores rank the completed trials' final scores (a range-restricted estimate)."""
    from tune_bir.sweep.rungs import rung_correlations, rung_tasks

    tasks = rung_tasks({"grace_period": plan.grace_t, "reduction_factor": plan.options.reduction_factor,
                        "max_t": plan.max_t, "segments_per_task": plan.segments_per_task})
    if not tasks:
        return []
    try:
        curves = completed_curves(grid, plan, rows)
    except Exception:   # a diagnostic: an unreadable progress file must not fail the sweep's summary
        log.warning("could not read the trials' per-task scores for the rung check", exc_info=True)
        return []
    final = {t: c[plan.n_tasks] for t, c in curves.items() if plan.n_tasks in c}
    return rung_correlations(curves, final, tasks, restricted=True, seed=plan.resolved.seed)


def summarise(plan: SweepPlan, grid: Any, tuner: Any, budget_spent: bool) -> SweepOutcome:
    """Rank the trials, write results.csv and best_config.json, and close the MLflow parent run."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    rows, unfinished = trial_rows(grid, plan)
    # Ctrl+C stops Tune quietly: trials still running, or fewer trials than asked for within the budget
    unfinished = unfinished or (len(rows) < plan.options.num_samples and not budget_spent)
    ranked = rank_trials(rows)
    best = ranked[0] if ranked else None
    values = best_values(plan, best) if best else None
    save_to_sweep(plan, RESULTS_FILE, csv_text(rows))
    client = MlflowClient(plan.mlflow.tracking_uri)
    parent_run_id = plan.mlflow.parent_run_id
    if best is not None:
        save_to_sweep(plan, BEST_FILE, json.dumps(values, indent=2))
        baseline = next((r for r in rows if r["baseline"]), None)
        now = int(dt.datetime.now().timestamp() * 1000)
        metrics = [Metric(f"best_{k}", float(best[k]), now, 0) for k in (METRIC, "acc_avg")
                   if is_finite_number(best.get(k))]
        if baseline and is_finite_number(baseline.get(METRIC)) and baseline["status"] == COMPLETED:
            metrics.append(Metric(f"baseline_{METRIC}", float(baseline[METRIC]), now, 0))
        client.log_batch(parent_run_id, metrics=metrics, tags=[
            RunTag("best_trial_id", best["trial_id"]), RunTag("best_config", json.dumps(values))])
    client.log_batch(parent_run_id, tags=[RunTag(f"trials_{k}", str(v)) for k, v in status_counts(rows).items()])
    client.set_terminated(parent_run_id, status="KILLED" if unfinished else "FINISHED")
    return SweepOutcome(plan=plan, rows=rows, best=best, best_values=values, interrupted=unfinished,
                        searcher=search_alg(tuner), result_grid=grid, rung_correlations=rung_check(grid, plan, rows))


def print_summary(outcome: SweepOutcome) -> None:
    from tune_bir.sweep.mlflow_callback import runs_page

    plan = outcome.plan
    storage = shlex.quote(plan.folder.root)
    counts = status_counts(outcome.rows)
    print()
    print(f"sweep {plan.name}: {len(outcome.rows)} finished trials ("
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")")
    if outcome.interrupted:
        print(f"the sweep was interrupted; continue it with: {PROG} --resume --name {plan.name} "
              f"--storage-path {storage}")
    best = outcome.best
    if best is None:
        print(f"no trial trained all {plan.n_tasks} tasks: no best config")
    else:
        label = "the baseline (every exaggeration off)" if best["baseline"] else best["trial_name"]
        print(f"best config: {label}, {METRIC} {best['val_acc_avg']:.4f} (test acc_avg {best['acc_avg']:.4f})")
        for name in plan.tuned_names:
            if best.get(name) is not None:
                print(f"  {name} = {best[name]}")
        print("  per-task accuracy after the last task (test / validation):")
        for k in range(1, plan.n_tasks + 1):
            print(f"    task {k}: {best.get(f'acc_task_{k}', float('nan')):.4f} / "
                  f"{best.get(f'val_acc_task_{k}', float('nan')):.4f}")
        baseline = next((r for r in outcome.rows if r["baseline"]), None)
        if baseline is not None and baseline["status"] == COMPLETED and not best["baseline"]:
            print(f"  baseline: {METRIC} {baseline['val_acc_avg']:.4f} (test acc_avg {baseline['acc_avg']:.4f})")
        n_completed = counts[COMPLETED]
        from tune_bir.sweep.rungs import warnings_for

        o = plan.options
        for line in warnings_for(outcome.rung_correlations, o.seeds_per_trial, o.grace_period, plan.n_tasks):
            print(line)
        print(f"this is a single-seed candidate, the best of {n_completed} completed configs on one validation "
              "split: the maximum of many noisy scores beats the baseline by chance alone. Confirm it on fresh "
              "seeds (top 3 and the baseline, 8 seeds each, paired test):")
        print(f"  {PROG} --confirm {shlex.quote(plan.folder.location)}")
        seeds = [plan.resolved.seed + k for k in range(plan.options.seeds_per_trial)]
        threads = trial_threads([best], plan.options.cpus_per_trial)
        print(f"run it alone (the trial's seed{'s' if len(seeds) > 1 else ''} and {threads} CPU "
              f"thread{'s' if threads > 1 else ''}: on the same kind of CPU, the trial's numbers bit for bit"
              + ("; one line per seed, the trial reported their mean" if len(seeds) > 1 else "") + "):")
        for seed in seeds:
            print(f"  {train_command(outcome.best_values, seed, threads)}")
        best_file = join(outcome.sweep_dir, BEST_FILE)
        again = f"--seed={seeds[0]} --threads={threads}"
        if is_uri(best_file):
            print(f"  or: copy {best_file} here and run {TRAIN_PROG} --config {BEST_FILE} {again}")
        else:
            print(f"  or: {TRAIN_PROG} --config {shlex.quote(best_file)} {again}")
    print(f"results: {outcome.sweep_dir} ({RESULTS_FILE}, {SWEEP_FILE}); MLflow parent run "
          f"{outcome.parent_run_id} in experiment '{plan.mlflow.experiment_name}'")
    print(f"analyse: python -m analysis {shlex.quote(outcome.sweep_dir)}")
    print(f"browse: mlflow ui --backend-store-uri {shlex.quote(outcome.tracking_uri)} --host 127.0.0.1 --port 5000, "
          f"then {runs_page(plan.mlflow.experiment_id)}")
    if plan.optuna_storage:
        print(f"  and: optuna-dashboard {shlex.quote(plan.optuna_storage)} --host 127.0.0.1 --port 8080 "
              f"(study {plan.study_name})")
